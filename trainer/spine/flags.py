"""The flags every stage shares: defaults, help text, path resolution."""
from __future__ import annotations

import argparse
import os

import torch

from trainer.spine.common import UserError, root_path, str2bool_int, user_path
from trainer.spine.guards import default_num_workers

# Default values of the common flags. Stage scripts override what differs (reference §1.0).
COMMON_DEFAULTS = dict(
    save_dir="out", save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=1,
    grad_clip=1.0, log_interval=100, save_interval=1000, hidden_size=512, num_hidden_layers=8, max_seq_len=340,
    data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain",
    pack=1, group_by_length=1,
)
# Flags that hold paths: given defaults resolve against the repo root, user values against the cwd.
PATH_FLAGS = ("save_dir", "data_path", "tokenizer_path", "checkpoint_dir", "eval_data_path")


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
    add("learning_rate", type=float, default=d["learning_rate"],
        help="峰值学习率 / peak learning rate (cosine to 0.1x)")
    add("device", type=str, default="cuda:0" if torch.cuda.is_available() else "cpu",
        help="训练设备 / device (under torchrun each rank uses cuda:LOCAL_RANK)")
    add("dtype", type=str, default=None, choices=["bfloat16", "float16", "float32"],
        help="混合精度 / autocast dtype; default bfloat16 on CUDA (float16 if bf16 unsupported) and on CPUs with "
             "AVX512-BF16/AMX, else float32")
    add("num_workers", type=int, default=None,
        help="数据加载进程数 / DataLoader workers per rank (default: CPU cores per rank, at most 8; 0 if <= 1)")
    add("accumulation_steps", type=int, default=d["accumulation_steps"], help="梯度累积步数 / gradient accumulation")
    add("grad_clip", type=float, default=d["grad_clip"], help="梯度裁剪阈值 / max grad norm (0 = off)")
    add("log_interval", type=int, default=d["log_interval"], help="日志间隔 / log every N optimizer steps")
    add("save_interval", type=int, default=d["save_interval"], help="保存间隔 / save every N optimizer steps")
    add("hidden_size", type=int, default=d["hidden_size"], help="隐藏层维度 / hidden size")
    add("num_hidden_layers", type=int, default=d["num_hidden_layers"], help="层数 / number of layers")
    add("max_seq_len", type=int, default=d["max_seq_len"], help="最大序列长度 / max tokens per sample")
    add("pack", type=str2bool_int, default=d["pack"], choices=[0, 1],
        help="打包: 多个样本拼进宽 <= max_seq_len 的行, 不在 padding 上计算 / pack samples into rows of <= max_seq_len "
             "(each sample attends to itself only) instead of padding them; pretraining fills rows of exactly "
             "max_seq_len and may split a document across two rows")
    add("group_by_length", type=str2bool_int, default=d["group_by_length"], choices=[0, 1],
        help="按长度分组采样 / length-grouped batches: each micro-batch holds samples that pack (or pad) well "
             "together, the data order stays one seeded permutation (resume and world size as usual)")
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
    add("max_steps", type=int, default=0,
        help="整个训练的优化器步数上限, 余弦退火在此结束 (0=由 epochs 决定) / optimizer steps of the whole run; the "
             "cosine schedule ends there (0 = --epochs decide)")
    add("seed", type=int, default=42, help="随机种子 / seed (data order uses seed+epoch)")
    add("weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only, not norms/embeddings)")
    add("optimizer", type=str, default=d.get("optimizer", "adamw"), choices=["adamw", "muon"],
        help="优化器 / adamw, or muon: Muon (torch.optim.Muon) for the decoder layers' 2-D matrices and AdamW for the "
             "embedding, norms, MoE router and value head; the same --learning_rate and --weight_decay drive both "
             "(Muon's update scaled to AdamW's RMS, Liu et al. 2025). Not with --fsdp 1 or LoRA")
    add("warmup_iters", type=int, default=0, help="线性预热步数 / linear LR warmup (optimizer steps)")
    add("use_compile", type=str2bool_int, default=0, choices=[0, 1], help="torch.compile 模型 / compile the model")
    add("grad_checkpointing", type=str2bool_int, default=0, choices=[0, 1],
        help="梯度检查点, 以计算换显存 / recompute activations in backward to save memory")
    add("fsdp", type=str2bool_int, default=0, choices=[0, 1],
        help="FSDP2 分片参数/梯度/优化器状态 (torchrun 下), 代替 DDP / shard parameters, gradients and AdamW state "
             "per decoder layer across ranks (torch fully_shard) instead of DDP replicas; for models that do not fit "
             "DDP. Same .pth and resume file as DDP (resume may switch --fsdp and the world size). Not for LoRA")
    add("max_bad_steps", type=int, default=3,
        help="连续多少个 loss/梯度非有限 (NaN/inf) 的优化器步后停止 / stop after N optimizer steps in a row with a "
             "non-finite loss or grad norm (each is skipped, not applied)")
    add("skip_bad_lines", type=str2bool_int, default=0, choices=[0, 1],
        help="跳过格式错误的数据行并计数 / skip malformed JSONL lines (counted) instead of stopping")
    add("peak_tflops", type=float, default=None,
        help="单卡峰值算力, 用于 MFU / one device's peak TFLOP/s for mfu = achieved FLOP/s / (peak x processes) "
             "(default: the bf16 dense peak of RTX 3090/4090, A100, H100, H200 by device name; CPU: no mfu); "
             "stages that count FLOPs: pretrain, SFT, LoRA, DPO, distillation")
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
    validate_args(args)
    return args


def _need(args, name: str, ok, what: str, fix: str) -> None:
    if hasattr(args, name) and getattr(args, name) is not None and not ok(getattr(args, name)):
        raise UserError(f"--{name} {getattr(args, name)} is out of range: it must be {what}; {fix}")


def validate_args(args) -> None:
    """Range checks of the shared flags, once, before anything is loaded (a stage checks its own flags)."""
    _need(args, "epochs", lambda v: v >= 1, ">= 1", "a run with no epoch trains nothing")
    _need(args, "batch_size", lambda v: v >= 1, ">= 1", "e.g. --batch_size 16")
    _need(args, "accumulation_steps", lambda v: v >= 1, ">= 1", "1 = no gradient accumulation")
    _need(args, "learning_rate", lambda v: v > 0, "> 0", "e.g. --learning_rate 5e-4")
    _need(args, "log_interval", lambda v: v >= 1, ">= 1 (optimizer steps)", "e.g. --log_interval 100")
    _need(args, "save_interval", lambda v: v >= 1, ">= 1 (optimizer steps)", "e.g. --save_interval 1000")
    _need(args, "max_steps", lambda v: v >= 0, ">= 0", "0 = no limit")
    _need(args, "max_seq_len", lambda v: v >= 2, ">= 2 (one input token and one target)",
          "e.g. --max_seq_len 340")
    _need(args, "num_hidden_layers", lambda v: v >= 1, ">= 1", "e.g. --num_hidden_layers 8")
    _need(args, "grad_clip", lambda v: v >= 0, ">= 0", "0 = no clipping")
    _need(args, "weight_decay", lambda v: v >= 0, ">= 0", "e.g. --weight_decay 0.01")
    _need(args, "warmup_iters", lambda v: v >= 0, ">= 0", "0 = no warmup")
    _need(args, "num_workers", lambda v: v >= 0, ">= 0", "0 = load data in the main process")
    _need(args, "max_bad_steps", lambda v: v >= 1, ">= 1", "e.g. --max_bad_steps 3")
    _need(args, "peak_tflops", lambda v: v > 0, "> 0 (TFLOP/s)", "e.g. --peak_tflops 989 for an H100 SXM")
    if getattr(args, "optimizer", "adamw") == "muon" and getattr(args, "fsdp", 0):
        raise UserError("--optimizer muon does not run with --fsdp 1: Muon orthogonalises whole matrices and FSDP "
                        "gives each rank a shard of them; use DDP (--fsdp 0) or --optimizer adamw")
    if isinstance(getattr(args, "device", None), str):
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device} is not a device name torch knows; pass cpu, cuda or cuda:N "
                            "(an NVIDIA GPU is called cuda)") from None
    if hasattr(args, "hidden_size"):
        check_model_size(args.hidden_size, getattr(args, "num_hidden_layers", 1))
    if getattr(args, "num_workers", 0) is None:
        args.num_workers = default_num_workers()
    data = getattr(args, "data_path", None)
    if data and os.path.isdir(data):
        found = sorted(f for f in os.listdir(data) if f.endswith(".jsonl"))[:5]
        raise UserError(f"--data_path {data} is a directory; pass a .jsonl file"
                        + (f" inside it, e.g. one of {', '.join(found)}" if found else ""))


def check_model_size(hidden_size: int, num_hidden_layers: int, hidden_flag: str = "--hidden_size",
                     layers_flag: str = "--num_hidden_layers") -> None:
    """The attention layout needs hidden_size = heads x an even head dimension (RoPE rotates pairs)."""
    from model.model_minimind import MiniMindConfig
    heads = MiniMindConfig.num_attention_heads
    if num_hidden_layers < 1:
        raise UserError(f"{layers_flag} {num_hidden_layers} is out of range: it must be >= 1")
    if hidden_size < 1 or hidden_size % (2 * heads):
        raise UserError(f"{hidden_flag} {hidden_size} does not split into {heads} attention heads of an even size: "
                        f"use a multiple of {2 * heads} (e.g. 512, 640 or 768)")


def dataset_options(dataset_cls, args) -> dict:
    """Keyword options the common flags give every dataset class: skip_bad_lines (a JSONL line that fails to parse
    or validate is skipped and counted instead of stopping the run), passed only to classes that accept it."""
    import inspect
    skip = bool(getattr(args, "skip_bad_lines", 0))
    if "skip_bad_lines" in inspect.signature(dataset_cls).parameters:
        return {"skip_bad_lines": skip}
    if skip:
        raise UserError(f"--skip_bad_lines 1 is not supported by {dataset_cls.__name__} in this version")
    return {}


def check_max_seq_len(max_seq_len: int, tokenizer, chat: bool = True) -> None:
    """--max_seq_len must leave room for at least one supervised token after the shortest chat-template prompt."""
    if not chat:
        return
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                         tokenize=False)
    start = text.rfind("y")
    prefix = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
    if max_seq_len <= prefix:
        raise UserError(f"--max_seq_len {max_seq_len} is too small: the chat template alone takes {prefix} tokens "
                        f"before the first answer token, so no token would be supervised; use at least "
                        f"{prefix + 16} (e.g. --max_seq_len 340)")
