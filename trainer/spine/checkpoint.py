"""Weights, sidecars and resume files: atomic writes, strict loading with actionable mismatch messages."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from model.model_minimind import ARCH_FLAGS, MiniMindConfig, MiniMindForCausalLM, count_params
from trainer.spine.common import Logger, UserError, root_path
from trainer.spine.guards import SaveError, TrainingDiverged, all_finite
from trainer.spine.runtime import is_sharded, unwrap
from util.files import load_torch_file, read_sidecar, sidecar_path  # noqa: F401 (re-exported)


def weight_path(save_dir: str, weight: str, hidden_size: int, use_moe) -> str:
    """MiniMind's naming: {dir}/{weight}_{hidden}{_moe}.pth"""
    return os.path.join(save_dir, f"{weight}_{hidden_size}{'_moe' if use_moe else ''}.pth")


def _atomic_write(write, path: str) -> None:
    """write(tmp) then rename over path: a crash or a full disk mid-write never touches the previous file. A failed
    write (disk full, file size limit, no permission, I/O error) becomes one SaveError line naming the file and the
    reason; the temp file is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SaveError(f"cannot write {path}: {e.strerror or e}") from None
    except RuntimeError as e:
        # torch.save's C++ writer reports a failed write as a RuntimeError whose text depends on where it failed:
        # "[enforce fail at inline_container.cc:N] . unexpected pos ..." (EFBIG/ENOSPC mid-file), "... open file
        # failed with strerror: ...", "PytorchStreamWriter failed writing file ...", "basic_ios::clear: iostream
        # error". Anything else (e.g. an object that cannot be pickled) is a bug and keeps its traceback.
        if not _TORCH_WRITE_FAILED.search(str(e)):
            raise
        raise SaveError(f"cannot write {path}: {_write_failure_reason(str(e), path)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter|file write failed|iostream error")


def _write_failure_reason(msg: str, path: str) -> str:
    """What a user can act on: torch's strerror when it has one, else the free space (the usual cause)."""
    found = re.search(r"strerror: (.+)", msg)
    if found:
        return found.group(1).strip()
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        free = None
    where = f"{free / 2**20:.0f} MiB free there" if free is not None else "free space unknown"
    first = msg.strip().splitlines()[0] if msg.strip() else "no message"
    return f"the write failed ({where}; a full disk, a file size limit or an I/O error; torch: {first[:120]})"


def atomic_save(obj, path: str) -> None:
    """torch.save through a temp file and rename: a crash mid-write never destroys the previous file."""
    _atomic_write(lambda tmp: torch.save(obj, tmp), path)


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(write, path)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer fingerprint: weights remember which token ids they were trained on

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of the token -> id map and, for BPE, the merges: equal exactly when two tokenizers
    give the same ids to the same text (up to normalisation). Content-based, so a copied folder matches."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = json.loads(backend.to_str()).get("model", {}).get("merges")
        if merges:
            h.update(json.dumps(merges, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def check_tokenizer(weight_file: str, tokenizer, tokenizer_path: str) -> None:
    """Stop when the weights were trained with another tokenizer (their sidecar records its fingerprint); warn when
    a weights file without a sidecar meets this repo's default tokenizer (e.g. original MiniMind weights, whose
    token ids mostly differ from ours)."""
    side = read_sidecar(weight_file)
    if side is None:
        if os.path.abspath(tokenizer_path) == os.path.abspath(root_path("model")):
            Logger(f"WARNING: {weight_file} has no sidecar JSON, so its tokenizer cannot be checked. If these are "
                   "original MiniMind weights, pass --tokenizer_path pointing to MiniMind's own tokenizer folder "
                   "(this repo's tokenizer gives other ids to most tokens).")
        return
    recorded = side.get("tokenizer_hash")
    if recorded and recorded != tokenizer_fingerprint(tokenizer):
        raise UserError(f"{weight_file} was trained with another tokenizer ({side.get('tokenizer_path')}, "
                        f"fingerprint {recorded}) than --tokenizer_path {tokenizer_path} "
                        f"({tokenizer_fingerprint(tokenizer)}); pass --tokenizer_path {side.get('tokenizer_path')} "
                        "or a copy of that tokenizer")


def save_weights(state_dict: dict, path: str, config: MiniMindConfig | None, tokenizer=None, **meta) -> None:
    """fp16 weights (MiniMind's convention) plus a readable sidecar JSON with the config, the tokenizer's
    fingerprint and provenance. Non-finite weights are refused: they would overwrite a good file with a broken one."""
    if not all_finite(state_dict):
        raise TrainingDiverged(f"the weights to be saved to {path} contain NaN/inf; nothing was written")
    half = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
            for k, v in state_dict.items()}
    if not all_finite(half):
        big = next(k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all())
        raise TrainingDiverged(f"{big} exceeds the float16 range (|w| > 65504), so {path} would hold inf; nothing "
                               "was written. Lower --learning_rate or raise --weight_decay")
    if tokenizer is not None:
        meta["tokenizer_hash"] = tokenizer_fingerprint(tokenizer)
    atomic_save(half, path)
    side = {"model_config": config.to_dict() if config is not None else None, **meta,
            "saved_at": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(json.dumps(side, indent=2, ensure_ascii=False, default=str), sidecar_path(path))


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
    sd = load_torch_file(path, "weight file", "copy it again or re-run the stage that writes it (or point "
                                              "--weight/--from_weight and --save_dir at a good copy)")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weight file {path} is a torch file but not a state_dict of tensors (a resume file or "
                        "another object?); pass a weights file such as out/full_sft_512.pth")
    model_sd = model.state_dict()
    if set(sd) != set(model_sd) or any(sd[k].shape != model_sd[k].shape for k in model_sd):
        raise UserError(_diagnose_mismatch(model_sd, sd, path, config))
    check_weight_values(sd, model_sd, path, "weight file")
    model.load_state_dict(sd, strict=True)


def check_weight_values(sd: dict, model_sd: dict, path: str, what: str) -> None:
    """Refuse weights that would train or answer silently wrong: a non-float tensor where the model has floats
    (load_state_dict would cast int64 to float, and such a model trains with zero gradient norm), or NaN/inf values
    (the run would stop as "diverged" with advice to lower the learning rate)."""
    for k, v in sd.items():
        want = model_sd.get(k)
        if want is not None and want.is_floating_point() and not v.is_floating_point():
            raise UserError(f"{what} {path}: tensor {k} has dtype {str(v.dtype).replace('torch.', '')}, not a "
                            "float type, so it is not a weights file of this model (weights are float16/bfloat16/"
                            "float32); use a file written by this repo's scripts or convert_model.py")
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(f"{what} {path}: tensor {k} holds {bad} NaN/inf value(s) of {v.numel()}; the file "
                            "is damaged or comes from a run that diverged. Use an earlier good copy (e.g. the resume "
                            "file's run, or retrain that stage)")


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
        path = weight_path(save_dir, from_weight, config.hidden_size, config.use_moe)
        load_weights(model, path, config)
        check_tokenizer(path, tokenizer, tokenizer_path)
    if log:
        total, active = count_params(model)
        Logger(f"Model Params: {total:.2f}M" + (f"-A{active:.2f}M" if config.use_moe else "")
               + f" | trainable {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M")
    return model.to(device), tokenizer


def lm_checkpoint(config, weight="full_sft", model=None, optimizer=None, epoch=0, step=0, wandb=None,
                  save_dir=root_path("checkpoints"), states: dict | None = None, **kwargs):
    """Save (model given) or load (model None) {save_dir}/{weight}_{h}{_moe}_resume.pth.

    Saved: fp32 model state (trainable tensors only when part of the model is frozen, e.g. LoRA), optimizer state
    (or a list of them), epoch, step, world_size, wandb run id, and every extra kwarg (objects with state_dict()
    are stored as their state). `states`: the model and optimizer states already gathered by gather_train_state
    (full tensors keyed by names), used instead of model's and optimizer's own. Load returns that dict, or None
    when there is no resume file.
    """
    path = resume_path(save_dir, weight, config)
    if model is None:
        ckp = None
        if os.path.exists(path):
            fix = "delete it (or pass --from_resume 0) to start over; the weights in --save_dir are not affected"
            ckp = load_torch_file(path, "resume file", fix)
            missing = [k for k in ("model", "epoch", "samples") if not isinstance(ckp, dict) or k not in ckp]
            if missing:
                raise UserError(f"resume file {path} is not a resume checkpoint of this repo (no {missing}); {fix}")
        _same_resume_everywhere(path, ckp)
        return ckp
    m = unwrap(model)
    weights = states["model"] if states is not None else trainable_state_dict(m)
    if not all_finite(weights):
        raise TrainingDiverged(f"the model holds NaN/inf weights; the resume file {path} was not written")
    state = {"model": weights, "epoch": epoch, "step": step,
             "world_size": dist.get_world_size() if dist.is_initialized() else 1,
             "wandb_id": getattr(wandb, "id", None)}
    if states is not None:
        state["optimizer"] = states["optimizer"]
    elif optimizer is not None:
        state["optimizer"] = {k: o.state_dict() for k, o in optimizer.items()} if isinstance(optimizer, dict) \
            else optimizer.state_dict()
    for k, v in kwargs.items():
        if v is not None:
            state[k] = unwrap(v).state_dict() if isinstance(v, torch.nn.Module) else \
                (v.state_dict() if hasattr(v, "state_dict") else v)
    atomic_save(state, path)
    return path


def _same_resume_everywhere(path: str, ckp: dict | None) -> None:
    """Every rank reads the resume file from its own disk. On several machines a checkpoints/ that is neither shared
    nor copied to every node would let one node resume while another starts over: stop on every rank instead."""
    if not dist.is_initialized():
        return
    import socket
    mine = (socket.gethostname(), None if ckp is None else (ckp.get("opt_step"), ckp.get("samples")))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if any(s[1] != seen[0][1] for s in seen):
        r = next(i for i, s in enumerate(seen) if s[1] != seen[0][1])
        what = lambda s: "no file" if s[1] is None else f"step {s[1][0]}"  # noqa: E731
        raise UserError(f"resume file {path}: rank 0 (host {seen[0][0]}) has {what(seen[0])} but rank {r} (host "
                        f"{seen[r][0]}) has {what(seen[r])}; on several machines --checkpoint_dir must be shared "
                        "(e.g. NFS) or copied to every node before --from_resume 1")


def resume_path(checkpoint_dir: str, weight: str, config) -> str:
    return weight_path(checkpoint_dir, weight, config.hidden_size, config.use_moe).replace(".pth", "_resume.pth")


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
    check_weight_values(sd, current, path, "resume file")
    bad = [k for k in sd if sd[k].shape != current[k].shape]
    if bad:
        raise UserError(f"resume file {path} has other shapes for {bad[:3]} (e.g. {tuple(sd[bad[0]].shape)} vs "
                        f"{tuple(current[bad[0]].shape)}); use the flags of the run that wrote it, or --from_resume 0")
    if is_sharded(model):  # every rank holds the full file; each keeps its own shard of every tensor
        set_model_state_dict(unwrap(model), sd, options=StateDictOptions(full_state_dict=True, strict=True))
    elif expected == set(current):
        model.load_state_dict(sd, strict=True)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)


# ----------------------------------------------------------------------------------------------------------------
# What a resume file belongs to

def data_fingerprint(path: str, records: int) -> dict:
    """The data file's identity, by content: size, record count and a hash of its first and last MiB, so a copied
    or re-downloaded identical file matches and an edited, appended or other file does not (nearly always: only an
    edit in the middle that keeps the size and the record count passes). The path is kept for the message."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return {"path": os.path.abspath(path), "size": size, "records": records, "sha256_ends": h.hexdigest()[:16]}


def run_identity(stage: str, dataset, args) -> dict:
    """What makes a resume file fit a run: the stage, the data file and the seed of the data order (batch size and
    world size may change on resume; the order is one global permutation)."""
    file = getattr(dataset, "file", None)
    data = data_fingerprint(file.path, len(dataset)) if file is not None and os.path.isfile(file.path) else \
        {"path": getattr(args, "data_path", None), "records": len(dataset)}
    return {"stage": stage, "data": data, "seed": getattr(args, "seed", 42)}


def _describe(identity: dict) -> str:
    d = identity.get("data") or {}
    return (f"stage {identity.get('stage')}, data {d.get('path')} ({d.get('records')} records, {d.get('size')} "
            f"bytes), seed {identity.get('seed')}")


def check_resume_identity(ckp: dict, identity: dict, path: str) -> None:
    """Refuse a resume file written by another stage, on other data or with another seed: it would skip the wrong
    samples and overwrite this run's weights. Files from before this record are accepted with a warning."""
    recorded = ckp.get("run_identity")
    if recorded is None:
        Logger(f"WARNING: resume file {path} does not record which stage and data it belongs to (written by an "
               "older version); it is used as is. Pass another --save_weight if it is not this run's")
        return
    keys = ("size", "records", "sha256_ends")
    same_data = all(recorded.get("data", {}).get(k) == identity["data"].get(k) for k in keys)
    if recorded.get("stage") != identity["stage"] or not same_data or recorded.get("seed") != identity["seed"]:
        raise UserError(f"resume file {path} belongs to another run ({_describe(recorded)}), not this one "
                        f"({_describe(identity)}); pass another --save_weight for this run, or delete the resume "
                        "file (or pass --from_resume 0) to start this one over")


# ----------------------------------------------------------------------------------------------------------------
# Resume state that loads into DDP or FSDP at any world size: full tensors keyed by parameter names

_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_owner(opt: torch.optim.Optimizer, modules) -> torch.nn.Module:
    """The module (unwrapped) whose parameters `opt` updates, e.g. PPO's critic for the critic optimizer."""
    first = opt.param_groups[0]["params"][0]
    for m in modules:
        m = unwrap(m)
        if any(p is first for p in m.parameters()):
            return m
    raise RuntimeError("optimizer_owner: no module holds this optimizer's parameters")


def gather_train_state(model: torch.nn.Module, optimizers: dict, modules) -> dict:
    """{"model": full fp32 state on CPU, "optimizer": {name: full state keyed by parameter names}}.

    Under FSDP a collective that every rank calls: the shards are gathered one tensor at a time to rank 0 (CPU),
    the other ranks get empty dicts, so no rank but 0 ever holds a full copy. Otherwise local (rank 0 alone calls it).
    Optimizer state keyed by names (not by position) is what lets a DDP run resume under FSDP and back, on any
    number of ranks (set_optimizer_state_dict re-shards it)."""
    m = unwrap(model)
    weights = get_model_state_dict(m, options=_FULL_ON_RANK0) if is_sharded(m) else trainable_state_dict(m)
    opt = {name: get_optimizer_state_dict(optimizer_owner(o, modules), o, options=_FULL_ON_RANK0)
           for name, o in optimizers.items()}
    return {"model": weights, "optimizer": opt}


def gather_module_state(module: torch.nn.Module) -> dict:
    """A module's full state on rank 0 (FSDP: collective; every rank calls it), else its plain state_dict."""
    m = unwrap(module)
    return get_model_state_dict(m, options=_FULL_ON_RANK0) if is_sharded(m) else m.state_dict()


def full_state_dict(module: torch.nn.Module) -> dict:
    """The module's full state on every rank (FSDP: all-gathered, a collective), e.g. to copy a sharded policy into
    an unsharded frozen one (PPO's old actor)."""
    m = unwrap(module)
    return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True)) if is_sharded(m) \
        else m.state_dict()


def load_optimizer_state(owner: torch.nn.Module, opt: torch.optim.Optimizer, osd: dict, path: str) -> None:
    """Inverse of gather_train_state's optimizer part; files of older versions (state keyed by position) load into
    the same optimizer layout without FSDP."""
    groups = osd.get("param_groups") or [{}]
    if groups[0].get("params") and isinstance(groups[0]["params"][0], str):
        set_optimizer_state_dict(unwrap(owner), opt, osd, options=StateDictOptions(full_state_dict=True))
    elif is_sharded(owner):
        raise UserError(f"resume file {path} keeps its optimizer state by position (written before --fsdp existed); "
                        "resume it once with --fsdp 0 (the next save stores it by name), then switch to --fsdp 1")
    else:
        opt.load_state_dict(osd)
