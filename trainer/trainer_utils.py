"""The training spine shared by every trainer/train_*.py script.

Everything that repeats across stages lives here exactly once: the common flags, distributed set-up and teardown,
seeding, the learning-rate schedule, the resumable data order, weight/checkpoint I/O, rank-0 logging and wandb, and
`TrainLoop`, which owns the step mechanics (accumulation, clipping, logging, saving, resume). A stage script keeps
only what is specific to it: its dataset, its forward pass and its loss.

    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=ds, collate_fn=collate_lm, config=config)
    for batch in loop:                       # epochs, resume skip, lr schedule, device transfer, DDP no_sync
        with ctx.autocast():
            out = loop.model(batch["input_ids"], labels=batch["labels"])
        loop.backward(out.loss + out.aux_loss, logits_loss=out.loss, aux_loss=out.aux_loss)
    loop.finish()

Step semantics (deliberately unlike the reference, see ../shared/reference §7 items 1-6, 9-10, 12-13):
micro-steps are 1-indexed within an epoch; an optimizer step happens after every `accumulation_steps` micro-steps
and at the end of the epoch (a short tail window is averaged over its own length, never leaked into the next epoch);
the final step is always logged and saved; resume continues the exact global sample order (also after a change of
world size) from fp32 master weights; ETA only counts steps run in this process.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, count_params  # noqa: E402


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file). Printed as one message, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Paths and flags

def root_path(p: str | os.PathLike) -> str:
    """Defaults are written relative to the repo root; resolve them there, never against the current directory."""
    p = Path(p)
    return str(p if p.is_absolute() else ROOT / p)


def user_path(p: str | os.PathLike | None) -> str | None:
    """Paths the user typed resolve against the current directory (as any CLI would)."""
    return None if p is None else str(Path(p).expanduser().resolve())


def str2bool_int(v) -> int:
    if str(v).lower() in ("1", "true", "yes", "y"):
        return 1
    if str(v).lower() in ("0", "false", "no", "n"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {v!r}")


# Default values of the common flags. Stage scripts override what differs (reference §1.0).
COMMON_DEFAULTS = dict(
    save_dir="out", save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=1,
    grad_clip=1.0, log_interval=100, save_interval=1000, hidden_size=512, num_hidden_layers=8, max_seq_len=340,
    data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain",
)
# Flags that hold paths: given defaults resolve against the repo root, user values against the cwd.
PATH_FLAGS = ("save_dir", "data_path", "tokenizer_path", "checkpoint_dir")


def build_parser(description: str, skip: tuple[str, ...] = (), **defaults) -> argparse.ArgumentParser:
    """The flags every stage shares, with the stage's defaults. `skip` drops flags a stage does not have."""
    d = {**COMMON_DEFAULTS, **defaults}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name, **kw):
        if name not in skip:
            p.add_argument(f"--{name}", **kw)

    add("save_dir", type=str, default=d["save_dir"], help="权重输出目录 / where {weight}_{hidden}.pth is written")
    add("save_weight", type=str, default=d["save_weight"], help="输出权重名前缀 / output weight name prefix")
    add("epochs", type=int, default=d["epochs"], help="训练轮数 / epochs")
    add("batch_size", type=int, default=d["batch_size"], help="每卡 batch / per-device micro-batch size")
    add("learning_rate", type=float, default=d["learning_rate"], help="峰值学习率 / peak learning rate (cosine to 0.1x)")
    add("device", type=str, default="cuda:0" if torch.cuda.is_available() else "cpu",
        help="训练设备 / device (under torchrun each rank uses cuda:LOCAL_RANK)")
    add("dtype", type=str, default=None, choices=["bfloat16", "float16", "float32"],
        help="混合精度 / autocast dtype; default bfloat16 on CUDA (float16 if bf16 unsupported), float32 on CPU")
    add("num_workers", type=int, default=8, help="数据加载进程数 / DataLoader workers")
    add("accumulation_steps", type=int, default=d["accumulation_steps"], help="梯度累积步数 / gradient accumulation")
    add("grad_clip", type=float, default=d["grad_clip"], help="梯度裁剪阈值 / max grad norm (0 = off)")
    add("log_interval", type=int, default=d["log_interval"], help="日志间隔(步) / log every N micro-steps")
    add("save_interval", type=int, default=d["save_interval"], help="保存间隔(步) / save every N micro-steps")
    add("hidden_size", type=int, default=d["hidden_size"], help="隐藏层维度 / hidden size")
    add("num_hidden_layers", type=int, default=d["num_hidden_layers"], help="层数 / number of layers")
    add("max_seq_len", type=int, default=d["max_seq_len"], help="最大序列长度 / max tokens per sample")
    add("use_moe", type=str2bool_int, default=0, choices=[0, 1], help="是否使用 MoE / mixture of experts FFN")
    add("headwise_attn_output_gate", type=str2bool_int, default=1, choices=[0, 1],
        help="注意力头输出门控 (Qiu et al. 2025); 加载未启用门控训练的旧权重时传 0 / pass 0 for old MiniMind weights")
    add("data_path", type=str, default=d["data_path"], help="训练数据 jsonl / training data")
    add("from_weight", type=str, default=d["from_weight"], help="初始化权重名, none=随机 / init weight name or none")
    add("from_resume", type=str2bool_int, default=0, choices=[0, 1], help="断点续训 / resume from checkpoint_dir")
    add("use_wandb", action="store_true", help="使用 wandb 记录 / log to wandb (WANDB_MODE=offline works)")
    add("wandb_project", type=str, default=d["wandb_project"], help="wandb project")
    add("tokenizer_path", type=str, default="model", help="tokenizer 目录 / any HF tokenizer directory")
    add("checkpoint_dir", type=str, default="checkpoints", help="续训文件目录 / where *_resume.pth is written")
    add("max_steps", type=int, default=0, help="最多训练多少步后停止并保存 (0=不限) / stop after N micro-steps")
    add("seed", type=int, default=42, help="随机种子 / seed (data order uses seed+epoch)")
    add("weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only, not norms/embeddings)")
    add("warmup_iters", type=int, default=0, help="线性预热步数 / linear LR warmup (optimizer steps)")
    add("use_compile", type=str2bool_int, default=0, choices=[0, 1], help="torch.compile 模型 / compile the model")
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and resolve paths: defaults against the repo root, user-given values against the cwd."""
    args = parser.parse_args(argv)
    for name in PATH_FLAGS + tuple(getattr(parser, "extra_path_flags", ())):
        if not hasattr(args, name) or getattr(args, name) is None:
            continue
        given = getattr(args, name)
        if given == parser.get_default(name):
            setattr(args, name, root_path(given))
        else:
            setattr(args, name, user_path(given))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Distributed / device / precision

def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def Logger(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def init_distributed_mode(device: str = "cpu", timeout_s: float | None = None) -> int:
    """Join the torchrun process group if launched by torchrun; NCCL on CUDA, gloo on CPU. Returns local rank."""
    if int(os.environ.get("RANK", -1)) == -1 or dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", 0))
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("MINIMIND_DIST_TIMEOUT", 1800)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return local_rank


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the last checkpoint
        dist.destroy_process_group()


def setup_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@dataclass
class RunContext:
    """What a script needs to know about where and how it runs."""
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def init_run(args) -> RunContext:
    """Distributed init, device, seed and precision in one call. Every script starts with this."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} was asked for but torch.cuda.is_available() is False; "
                        "pass --device cpu, or install a CUDA build of torch")
    local_rank = init_distributed_mode(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{local_rank}" if args.device.startswith("cuda") and dist.is_initialized()
                          else args.device)
    setup_seed(getattr(args, "seed", 42) + rank)
    dtype = resolve_dtype(getattr(args, "dtype", None), device)
    if dtype != torch.float32 and device.type == "cuda" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return RunContext(device=device, rank=rank, local_rank=local_rank, world_size=world, dtype=dtype)


def run_main(main) -> None:
    """Run a script's main(); user mistakes end with one readable line instead of a traceback."""
    from dataset.lm_dataset import DataFormatError
    try:
        main()
    except (UserError, DataFormatError, FileNotFoundError) as e:
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"\n{rank}error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------------
# Learning rate and data order

def get_lr(step: int, total_steps: int, lr: float, warmup: int = 0) -> float:
    """Cosine from lr to 0.1*lr over total_steps (reference schedule), with an optional linear warmup."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))


class SkipBatchSampler(Sampler):
    """Per-rank batches of one global, seeded sample order, able to start after `skip_samples` samples.

    The epoch's order is a permutation seeded by seed+epoch, the same on every rank. Global batch k holds the next
    batch_size*world_size samples and rank r takes every world_size-th of them. Because the position in that order
    is counted in samples, a run resumed with another number of GPUs continues exactly where the last one stopped.
    With several ranks the order is padded by wrapping so every rank gets the same number of batches (no DDP hang).
    """

    def __init__(self, num_samples: int, batch_size: int, *, epoch: int = 0, seed: int = 42, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, skip_samples: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.shuffle, self.skip_samples = shuffle, min(skip_samples, num_samples)

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        order = order[self.skip_samples:]
        pad = (-len(order)) % self.world_size
        if pad and len(order):
            order = torch.cat([order, order[:pad].repeat(math.ceil(pad / len(order)))[:pad]])
        return order

    def __iter__(self):
        order = self._order()
        g = self.batch_size * self.world_size
        for start in range(0, len(order), g):
            yield order[start:start + g][self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        n = self.num_samples - self.skip_samples
        n += (-n) % self.world_size
        return math.ceil(n / (self.batch_size * self.world_size))

    def samples_after(self, batches: int) -> int:
        """Position in the epoch's order (in real samples) after this many batches of this sampler."""
        return min(self.num_samples, self.skip_samples + batches * self.batch_size * self.world_size)


# ----------------------------------------------------------------------------------------------------------------
# Weights, sidecars and checkpoints

def weight_path(save_dir: str, weight: str, hidden_size: int, use_moe) -> str:
    """MiniMind's naming: {dir}/{weight}_{hidden}{_moe}.pth"""
    return os.path.join(save_dir, f"{weight}_{hidden_size}{'_moe' if use_moe else ''}.pth")


def atomic_save(obj, path: str) -> None:
    """torch.save through a temp file and rename: a crash mid-write never destroys the previous file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def sidecar_path(pth: str) -> str:
    return os.path.splitext(pth)[0] + ".json"


def read_sidecar(pth: str) -> dict | None:
    p = sidecar_path(pth)
    if not os.path.exists(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


# Config fields that decide the state_dict layout, and the flag that sets each.
ARCH_FLAGS = {"hidden_size": "--hidden_size", "num_hidden_layers": "--num_hidden_layers", "use_moe": "--use_moe",
              "headwise_attn_output_gate": "--headwise_attn_output_gate"}


def save_weights(state_dict: dict, path: str, config: MiniMindConfig | None, **meta) -> None:
    """fp16 weights (MiniMind's convention) plus a readable sidecar JSON with the config and provenance."""
    half = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
            for k, v in state_dict.items()}
    atomic_save(half, path)
    side = {"model_config": config.to_dict() if config is not None else None, **meta,
            "saved_at": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(json.dumps(side, indent=2, ensure_ascii=False, default=str), sidecar_path(path))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and torch.compile wrappers so state_dict keys are the plain model's."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _diagnose_mismatch(model_sd: dict, file_sd: dict, path: str, config: MiniMindConfig) -> str:
    """Name the flag that makes a weight file fit, instead of a wall of missing/unexpected keys."""
    side = read_sidecar(path)
    if side and side.get("model_config"):
        fc = side["model_config"]
        wrong = [f"{flag} {int(fc[k]) if isinstance(fc[k], bool) else fc[k]}" for k, flag in ARCH_FLAGS.items()
                 if k in fc and fc[k] != getattr(config, k)]
        if wrong:
            return f"{path} was trained with a different architecture: pass {' '.join(wrong)}"
    hints = []
    q = "model.layers.0.self_attn.q_proj.weight"
    if q in file_sd and q in model_sd and file_sd[q].shape != model_sd[q].shape:
        h = config.hidden_size
        if file_sd[q].shape[0] == h + config.num_attention_heads and model_sd[q].shape[0] == h:
            hints.append("the file has the head-wise attention output gate: pass --headwise_attn_output_gate 1")
        elif file_sd[q].shape[0] == h and model_sd[q].shape[0] != h:
            hints.append("the file has no attention output gate (e.g. original MiniMind weights): "
                         "pass --headwise_attn_output_gate 0")
    file_moe = any(".mlp.experts." in k for k in file_sd)
    model_moe = any(".mlp.experts." in k for k in model_sd)
    if file_moe != model_moe:
        hints.append(f"the file is {'MoE' if file_moe else 'dense'}: pass --use_moe {int(file_moe)}")
    n_file = len({k.split('.')[2] for k in file_sd if k.startswith("model.layers.")})
    if n_file and n_file != config.num_hidden_layers:
        hints.append(f"the file has {n_file} layers: pass --num_hidden_layers {n_file}")
    emb = "model.embed_tokens.weight"
    if emb in file_sd and file_sd[emb].shape[1] != config.hidden_size:
        hints.append(f"the file has hidden size {file_sd[emb].shape[1]}: pass --hidden_size {file_sd[emb].shape[1]}")
    if hints:
        return f"{path} does not fit the model built from your flags; " + "; ".join(hints)
    missing = sorted(set(model_sd) - set(file_sd))[:5]
    unexpected = sorted(set(file_sd) - set(model_sd))[:5]
    bad = [k for k in model_sd if k in file_sd and model_sd[k].shape != file_sd[k].shape][:5]
    return (f"{path} does not match the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {bad}")


def load_weights(model: torch.nn.Module, path: str, config: MiniMindConfig) -> None:
    """Strict load of a .pth state_dict; a mismatch stops with a message naming the flag that fixes it."""
    if not os.path.exists(path):
        raise UserError(_missing_weight_message(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model_sd = model.state_dict()
    if set(sd) != set(model_sd) or any(sd[k].shape != model_sd[k].shape for k in model_sd):
        raise UserError(_diagnose_mismatch(model_sd, sd, path, config))
    model.load_state_dict(sd, strict=True)


def _missing_weight_message(path: str) -> str:
    d, name = os.path.split(path)
    stem = name.rsplit("_", 2)[0] if name.endswith("_moe.pth") else name.rsplit("_", 1)[0]
    others = sorted(p for p in os.listdir(d) if p.startswith(stem + "_") and p.endswith(".pth")) \
        if os.path.isdir(d) else []
    msg = f"weight file {path} not found."
    if others:
        msg += f" Found {', '.join(others)} in {d}: set --hidden_size/--use_moe to match one of them."
    else:
        msg += " Run the stage that produces it first (pretrain -> full_sft -> ...), or set --from_weight/--save_dir."
    return msg


def model_config_from_args(args, **overrides) -> MiniMindConfig:
    kw = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe),
              headwise_attn_output_gate=bool(args.headwise_attn_output_gate))
    kw.update(overrides)
    return MiniMindConfig(**kw)


def load_tokenizer(tokenizer_path: str):
    from transformers import AutoTokenizer
    if not os.path.isdir(tokenizer_path):
        raise UserError(f"tokenizer directory {tokenizer_path} not found; pass --tokenizer_path DIR "
                        "(a folder with tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(tokenizer_path)


def init_model(config: MiniMindConfig, from_weight: str = "pretrain", tokenizer_path: str = root_path("model"),
               save_dir: str = root_path("out"), device="cpu", log: bool = True):
    """Tokenizer + model; unless from_weight is 'none', strictly load {save_dir}/{from_weight}_{h}{_moe}.pth."""
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"tokenizer at {tokenizer_path} has {len(tokenizer)} tokens but the model vocab is "
                        f"{config.vocab_size}; use a tokenizer with at most {config.vocab_size} tokens")
    model = MiniMindForCausalLM(config)
    if from_weight != "none":
        load_weights(model, weight_path(save_dir, from_weight, config.hidden_size, config.use_moe), config)
    if log:
        total, active = count_params(model)
        Logger(f"Model Params: {total:.2f}M" + (f"-A{active:.2f}M" if config.use_moe else "")
               + f" | trainable {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M")
    return model.to(device), tokenizer


def lm_checkpoint(config, weight="full_sft", model=None, optimizer=None, epoch=0, step=0, wandb=None,
                  save_dir=root_path("checkpoints"), **kwargs):
    """Save (model given) or load (model None) {save_dir}/{weight}_{h}{_moe}_resume.pth.

    Saved: fp32 model state (trainable tensors only when part of the model is frozen, e.g. LoRA), optimizer state
    (or a list of them), epoch, step, world_size, wandb run id, and every extra kwarg (objects with state_dict()
    are stored as their state). Load returns that dict, or None when there is no resume file.
    """
    path = weight_path(save_dir, weight, config.hidden_size, config.use_moe).replace(".pth", "_resume.pth")
    if model is None:
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
    m = unwrap(model)
    state = {"model": trainable_state_dict(m), "epoch": epoch, "step": step,
             "world_size": dist.get_world_size() if dist.is_initialized() else 1,
             "wandb_id": getattr(wandb, "id", None)}
    if optimizer is not None:
        state["optimizer"] = {k: o.state_dict() for k, o in optimizer.items()} if isinstance(optimizer, dict) \
            else optimizer.state_dict()
    for k, v in kwargs.items():
        if v is not None:
            state[k] = unwrap(v).state_dict() if isinstance(v, torch.nn.Module) else \
                (v.state_dict() if hasattr(v, "state_dict") else v)
    atomic_save(state, path)
    return path


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """Full fp32 state when everything trains; only the trainable tensors when part of the model is frozen."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu().clone() for k, p in params.items() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, sd: dict, path: str) -> None:
    """Inverse of trainable_state_dict, strict about which tensors must be there."""
    expected = set(trainable_state_dict(model)) if not all(p.requires_grad for p in model.parameters()) \
        else set(model.state_dict())
    if set(sd) != expected:
        raise UserError(f"resume file {path} does not fit this model (missing {sorted(expected - set(sd))[:3]}, "
                        f"unexpected {sorted(set(sd) - expected)[:3]}); the architecture flags differ from the run "
                        "that wrote it, or pass --from_resume 0 to start over")
    current = model.state_dict()
    bad = [k for k in sd if sd[k].shape != current[k].shape]
    if bad:
        raise UserError(f"resume file {path} has other shapes for {bad[:3]} (e.g. {tuple(sd[bad[0]].shape)} vs "
                        f"{tuple(current[bad[0]].shape)}); use the flags of the run that wrote it, or --from_resume 0")
    if expected == set(current):
        model.load_state_dict(sd, strict=True)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)


def build_optimizer(model_or_params, lr: float, weight_decay: float = 0.01, device: torch.device | None = None):
    """AdamW; weight decay on matrices only (norm weights and the tied embedding are not decayed)."""
    named = list(model_or_params.named_parameters()) if isinstance(model_or_params, torch.nn.Module) \
        else list(model_or_params)
    seen, decay, no_decay = set(), [], []
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name and "lm_head" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Logging

class NoOpWandb:
    """Stands in for wandb on ranks != 0 and without --use_wandb, so call sites need no `if wandb:`."""
    id = None

    def log(self, *a, **k):
        pass

    def finish(self, *a, **k):
        pass


def init_wandb(args, run_name: str, resume_id: str | None = None):
    if not getattr(args, "use_wandb", False) or not is_main_process():
        return NoOpWandb()
    import wandb
    run = wandb.init(project=args.wandb_project, name=run_name, config=vars(args),
                     id=resume_id, resume="allow" if resume_id else None)
    return run


class MetricsFile:
    """Appends every logged metrics row to a JSONL file next to the resume checkpoint (rank 0 only)."""

    def __init__(self, path: str | None):
        self.path = path if is_main_process() else None
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def write(self, row: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def reduce_mean(values: list[float], device) -> list[float]:
    """Average scalars over ranks (one collective) so logged metrics describe the whole batch, not rank 0's."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def wrap_model(model: torch.nn.Module, ctx: RunContext, compile: bool = False) -> torch.nn.Module:
    """torch.compile (optional) then DDP. No buffers need syncing (RoPE tables are deterministic), so
    broadcast_buffers=False (the reference re-broadcast 2x8 MB of RoPE tables every forward)."""
    if compile:
        model = torch.compile(model)
    if ctx.ddp:
        model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                        broadcast_buffers=False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The loop

def _to_device(batch, device, non_blocking):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


class TrainLoop:
    """Iterate training batches and take care of every step mechanic a stage shares.

    model: the trainable module (unwrapped). `loop.model` is what to call forward on (DDP/compiled).
    optimizer: one optimizer or a dict of named ones (each clipped on its own params; a group's `initial_lr`,
        default its lr at construction, is its peak lr for the schedule).
    weights_path / weights_state: where and what the weights file holds (default: the full model state_dict at
        {save_dir}/{save_weight}_{h}{_moe}.pth); LoRA passes its own.
    resume_objects: extra things with state_dict()/load_state_dict() saved in the resume file (critic, tracker...).
    """

    def __init__(self, args, ctx: RunContext, *, model, optimizer, dataset, collate_fn, config: MiniMindConfig,
                 stage: str, tokenizer=None, weights_path: str | None = None, weights_state=None,
                 resume_objects: dict | None = None, run_name: str | None = None, checkpoint_name: str | None = None):
        self.args, self.ctx, self.config, self.stage = args, ctx, config, stage
        self.raw_model = model
        # named optimizers ({"actor": a, "critic": c}) get their own clipping and grad-norm metric
        self.optimizers = dict(optimizer) if isinstance(optimizer, dict) else {"": optimizer}
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.dataset, self.collate_fn, self.tokenizer = dataset, collate_fn, tokenizer
        self.weight_name = checkpoint_name or args.save_weight
        self.weights_path = weights_path or weight_path(args.save_dir, args.save_weight, config.hidden_size,
                                                        config.use_moe)
        self.weights_state = weights_state or (lambda m: m.state_dict())
        self.resume_objects = resume_objects or {}
        self.accum = max(1, args.accumulation_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16 and
                                           ctx.device.type == "cuda")
        self._wrapped = []
        self.model = self.wrap(model)

        # resume
        self.start_epoch, self.skip_samples, self.global_step, self.opt_step = 0, 0, 0, 0
        ckp = lm_checkpoint(config, self.weight_name, save_dir=args.checkpoint_dir) if args.from_resume else None
        resume_path = weight_path(args.checkpoint_dir, self.weight_name, config.hidden_size,
                                  config.use_moe).replace(".pth", "_resume.pth")
        if args.from_resume and ckp is None:
            Logger(f"--from_resume 1 but no {resume_path}: starting from scratch")
        if ckp is not None:
            load_trainable_state_dict(model, ckp["model"], resume_path)
            if set(ckp["optimizer"]) != set(self.optimizers):
                raise UserError(f"resume file {resume_path} holds optimizers {sorted(ckp['optimizer'])}, "
                                f"this script has {sorted(self.optimizers)}; pass --from_resume 0")
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ckp["optimizer"][name])
            if "scaler" in ckp:
                self.scaler.load_state_dict(ckp["scaler"])
            for name, obj in self.resume_objects.items():
                if name not in ckp:
                    raise UserError(f"resume file {resume_path} has no '{name}' state; pass --from_resume 0")
                obj.load_state_dict(ckp[name])
            self.start_epoch, self.skip_samples = ckp["epoch"], ckp["samples"]
            self.global_step, self.opt_step = ckp["global_step"], ckp["opt_step"]
            Logger(f"resumed from {resume_path}: epoch {self.start_epoch + 1}, {self.skip_samples} samples done, "
                   f"global step {self.global_step} (saved with world size {ckp['world_size']}, now {ctx.world_size})")
        self.wandb = init_wandb(args, run_name or f"MiniMind-{stage}-Epoch-{args.epochs}-BatchSize-"
                                f"{args.batch_size}-LearningRate-{args.learning_rate}",
                                ckp.get("wandb_id") if ckp else None)
        self.metrics_file = MetricsFile(weight_path(args.checkpoint_dir, self.weight_name, config.hidden_size,
                                                    config.use_moe).replace(".pth", "_metrics.jsonl"))
        full = SkipBatchSampler(len(dataset), args.batch_size, world_size=ctx.world_size)
        self.iters_per_epoch = len(full)
        self.total_steps = args.epochs * self.iters_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self._sums, self._count, self._tokens, self._grad_norms = {}, 0, 0, {}
        self._saved_at = None

    # -- wrapping
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP/compile-wrap a trainable module; no_sync is applied to it on accumulation micro-steps."""
        wrapped = wrap_model(module, self.ctx, compile=bool(getattr(self.args, "use_compile", 0)))
        self._wrapped.append(wrapped)
        return wrapped

    # -- iteration
    def __iter__(self):
        args, ctx = self.args, self.ctx
        self._t0 = self._t_last = time.time()
        self._steps_run = 0
        pin = ctx.device.type == "cuda"
        for epoch in range(self.start_epoch, args.epochs):
            skip = self.skip_samples if epoch == self.start_epoch else 0
            sampler = SkipBatchSampler(len(self.dataset), args.batch_size, epoch=epoch, seed=args.seed,
                                       rank=ctx.rank, world_size=ctx.world_size, skip_samples=skip)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                                num_workers=args.num_workers, pin_memory=pin,
                                persistent_workers=False)
            n = len(sampler)
            if args.max_steps:  # the run stops inside this epoch: treat that point as the epoch's end
                n = min(n, max(args.max_steps - self.global_step, 0))
            self.epoch = epoch
            done_before = self.iters_per_epoch - len(sampler)  # steps of this epoch run before a resume
            for i, batch in zip(range(1, n + 1), loader):
                self.step = done_before + i  # 1-indexed micro-step within the epoch
                # accumulation window relative to where this (possibly resumed) epoch segment started; a short
                # tail window is averaged over its own length
                w_start = ((i - 1) // self.accum) * self.accum + 1
                self._window = min(self.accum, n - w_start + 1)
                self._sync = (i - w_start + 1) == self._window
                self._backward_called = False
                ids = batch.get("input_ids") if isinstance(batch, dict) else None
                self._batch_tokens = ids.numel() if isinstance(ids, torch.Tensor) else 0
                with contextlib.ExitStack() as stack:
                    if not self._sync:
                        for m in self._wrapped:
                            if isinstance(m, DistributedDataParallel):
                                stack.enter_context(m.no_sync())
                    yield _to_device(batch, ctx.device, pin)
                if not self._backward_called:
                    raise RuntimeError("TrainLoop: call loop.backward(loss) once per batch")
                self.global_step += 1
                self._steps_run += 1
                stop = bool(args.max_steps) and self.global_step >= args.max_steps
                last = (i == n and epoch == args.epochs - 1) or stop
                self._log_pending |= self.step % args.log_interval == 0
                self._save_pending |= self.step % args.save_interval == 0
                if self._sync:
                    self._optimizer_step()
                    epoch_done = i == len(sampler)
                    if self._log_pending or i == n or last:
                        self._log()
                    if self._save_pending or epoch_done or last:
                        self.save(epoch + 1 if epoch_done else epoch, 0 if epoch_done else sampler.samples_after(i))
                    self._log_pending = self._save_pending = False
                if stop:
                    Logger(f"reached --max_steps {args.max_steps}; stopping")
                    return
            self.skip_samples = 0

    _log_pending = False
    _save_pending = False

    # -- per-step
    def backward(self, loss: torch.Tensor, num_tokens: int | None = None, **metrics) -> None:
        """Backward of one micro-batch's loss (scaled by its accumulation window) and bookkeeping of metrics."""
        self._backward_called = True
        self.scaler.scale(loss / self._window).backward()
        self.log_metrics(loss=loss, **metrics)
        self._count += 1
        self._tokens += int(num_tokens if num_tokens is not None else self._batch_tokens)

    def log_metrics(self, **metrics) -> None:
        """Add per-micro-step metrics (averaged over the steps since the last log). Tensors stay on the device
        until the log step, so logging forces no GPU sync per step."""
        for k, v in metrics.items():
            if v is None:
                continue
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self._sums[k] = self._sums.get(k, 0.0) + v

    def _optimizer_step(self) -> None:
        # The schedule counts optimizer steps, so batch 8 x accumulation 1 trains exactly like 4 x 2.
        total = self.args.epochs * math.ceil(self.iters_per_epoch / self.accum)
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = get_lr(self.opt_step, total, g["initial_lr"], getattr(self.args, "warmup_iters", 0))
            self.scaler.unscale_(opt)
            if self.args.grad_clip > 0:
                params = [p for g in opt.param_groups for p in g["params"]]
                gn = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip)
                self._grad_norms[f"grad_norm_{name}" if name else "grad_norm"] = gn.detach()
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.opt_step += 1

    def _log(self) -> None:
        count = max(self._count, 1)
        means = {k: float(v) / count for k, v in self._sums.items()}
        means.update({k: float(v) for k, v in self._grad_norms.items()})  # the last step's norm, not a mean
        keys = sorted(means)
        vals = reduce_mean([means[k] for k in keys] + [float(self._tokens)], self.ctx.device)
        row = dict(zip(keys, vals[:-1]))
        now = time.time()
        remaining = self.total_steps - self.global_step
        eta_min = (now - self._t0) / max(self._steps_run, 1) * remaining / 60  # only steps run by this process
        for name, opt in self.optimizers.items():
            row[f"lr_{name}" if name else "lr"] = opt.param_groups[0]["lr"]
        row.setdefault("lr", next(iter(self.optimizers.values())).param_groups[0]["lr"])
        row.update(epoch=self.epoch + 1,
                   step=self.step, global_step=self.global_step, eta_min=eta_min,
                   tokens_per_s=vals[-1] * self.ctx.world_size / max(now - self._t_last, 1e-9))
        self._t_last = now
        if self.ctx.is_main:
            mem = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GB" if self.ctx.device.type == "cuda" else ""
            parts = " ".join(f"{k} {row[k]:.4f}" for k in keys)
            print(f"Epoch [{self.epoch + 1}/{self.args.epochs}] step {self.step}/{self.iters_per_epoch} | {parts} "
                  f"| lr {row['lr']:.3e} | {row['tokens_per_s']:.0f} tok/s | ETA {eta_min:.1f}min{mem}", flush=True)
            self.wandb.log(row, step=self.global_step)
            self.metrics_file.write(row)
        self._sums, self._count, self._tokens, self._grad_norms = {}, 0, 0, {}

    def save(self, epoch: int, samples: int) -> None:
        """Weights (fp16 + sidecar) and the resume file (fp32 + optimizer + data position), rank 0 only."""
        if not self.ctx.is_main or self._saved_at == self.global_step:
            return
        self._saved_at = self.global_step
        m = unwrap(self.raw_model)
        was_training = m.training
        m.eval()
        save_weights(self.weights_state(m), self.weights_path, self.config, stage=self.stage,
                     weight=self.args.save_weight, epoch=epoch, global_step=self.global_step,
                     tokenizer_path=getattr(self.args, "tokenizer_path", None), args=vars(self.args))
        extras = {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, **self.resume_objects}
        lm_checkpoint(self.config, self.weight_name, model=m, optimizer=self.optimizers, epoch=epoch, step=self.step,
                      wandb=self.wandb, save_dir=self.args.checkpoint_dir, samples=samples,
                      global_step=self.global_step, opt_step=self.opt_step, **extras)
        m.train(was_training)

    def finish(self) -> None:
        if self.ctx.ddp:
            self.check_replicas_in_sync()
        Logger(f"done: {self.weights_path}")
        self.wandb.finish()
        # Free the DDP wrappers while the process group is alive: left to the garbage collector after
        # destroy_process_group, a gloo rank sometimes deadlocked at exit (seen in ~1 of 8 CPU torchrun runs).
        # A script may still hold a wrapper (e.g. PPO's critic), so drop each DDP's reducer and logger (the C++
        # objects that own the communication state) here rather than relying on the wrapper itself being freed.
        for m in self._wrapped:
            if isinstance(m, DistributedDataParallel):
                for attr in ("logger", "reducer"):
                    if attr in m.__dict__:
                        delattr(m, attr)
        self.model = unwrap(self.model)
        self._wrapped.clear()
        gc.collect()
        cleanup_distributed()

    def check_replicas_in_sync(self) -> None:
        """DDP replicas must end bit-identical; a divergence (e.g. a rank-local update) is a bug worth stopping on."""
        params = [p.detach().double() for p in self.raw_model.parameters() if p.requires_grad]
        local = torch.stack([torch.stack([p.sum(), p.abs().sum()]) for p in params]).to(self.ctx.device)
        lo, hi = local.clone(), local.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("DDP replicas diverged: trainable weights differ across ranks")
        Logger(f"weights identical on all {self.ctx.world_size} ranks")
