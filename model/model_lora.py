"""LoRA (Hu et al. 2021) for MiniMind: inject low-rank adapters into nn.Linear layers, save/load them, merge them.

    from model.model_lora import apply_lora, lora_state_dict, load_lora, merge_lora, apply_lora_from_file
    apply_lora(model, rank=8, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))  # base frozen
    ...train...; torch.save(lora_state_dict(model), "out/lora/lora_identity_512.pth")
    apply_lora_from_file(model, "out/lora/lora_identity_512.pth")  # rank/alpha/targets from the sidecar JSON
    base_fingerprint(model)                                         # which base weights these adapters belong to
    model = merge_lora(model)                                       # a plain MiniMindForCausalLM again

Trained by trainer/train_lora.py. An adapted layer computes  W x + b + (alpha / rank) * B(A(x))  with A: in -> rank
(Kaiming-uniform, as nn.Linear and PEFT) and B: rank -> out (zeros, so training starts from the base model). Any
nn.Linear shape works, including the gated q_proj (hidden -> hidden + heads) that MiniMind's square-only LoRA skipped.

State-dict keys are MiniMind's: `{layer path}.lora.A.weight` / `{layer path}.lora.B.weight`, with the base weight
staying at `{layer path}.weight`. With alpha = rank (the default) the scale is 1, which is MiniMind's unscaled LoRA,
so MiniMind LoRA files load too (without a sidecar, rank and targets are read off the tensors and alpha = rank).

Loading is guarded like every other file of this repo: a missing, empty, truncated or foreign file, one that is not
a dict of tensors, holds no LoRA tensors, has non-float or NaN/inf tensors, or does not fit the model's adapters
stops with one UserError line naming the file and what to do. train_lora.py records the base weights' fingerprint
in the sidecar (args.lora_base_fingerprint); applying the adapters to other base weights prints a warning.
"""
import hashlib
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from model.model_minimind import ARCH_FLAGS
from util.errors import UserError
from util.files import load_torch_file, read_sidecar
from util.modules import unwrap

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRA(nn.Module):
    """The low-rank update B(A(x)) * alpha / rank."""

    def __init__(self, in_features, out_features, rank, alpha, device=None, dtype=None):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        out = self.B(self.A(x))
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self):
        """B @ A * scale in fp32: what merging adds to the base weight."""
        return (self.B.weight.float() @ self.A.weight.float()) * self.scale


class LoRALinear(nn.Module):
    """A frozen nn.Linear's parameters (the same tensors, not copies) plus a trainable LoRA branch.

    Keeps `weight`/`bias` under the same names, so the base keys of the state_dict do not move.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora = LoRA(base.in_features, base.out_features, rank, alpha, device=base.weight.device,
                         dtype=base.weight.dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora(x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora.rank}, " \
               f"alpha={self.lora.alpha:g}"


# ----------------------------------------------------------------------------------------------------------------
# Inject / inspect

def parse_targets(targets) -> tuple[str, ...]:
    """'q_proj,o_proj' or a sequence -> ('q_proj', 'o_proj')."""
    if isinstance(targets, str):
        targets = targets.split(",")
    out = tuple(t.strip() for t in targets if t.strip())
    if not out:
        raise UserError("--lora_target is empty; give comma-separated layer names such as q_proj,k_proj,v_proj,o_proj")
    return out


def _matches(name: str, targets) -> bool:
    # a suffix on a dot boundary: "q_proj" and "self_attn.q_proj" both match "model.layers.0.self_attn.q_proj"
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, targets=DEFAULT_TARGETS) -> nn.Module:
    """Wrap every nn.Linear whose name ends with one of `targets` in a LoRALinear; freeze everything else.

    alpha None means alpha = rank (scale 1). Returns the model (changed in place).
    """
    targets = parse_targets(targets)
    if rank < 1:
        raise UserError(f"--lora_rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters; merge_lora() them before applying new ones")
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    tied = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if "embed_tokens" in name}
    for name, m in chosen:
        if id(m.weight) in tied:
            # merging into lm_head would silently change the tied input embedding too
            raise UserError(f"--lora_target matches {name}, whose weight is tied to the input embedding; "
                            "adapt the attention/MLP projections instead")
    unmatched = [t for t in targets if not any(_matches(name, (t,)) for name, _ in chosen)]
    if unmatched:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"--lora_target {','.join(unmatched)} matches no nn.Linear layer of this model; "
                        f"layer names available: {','.join(linear)}")
    model.requires_grad_(False)
    for name, m in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(m, rank, alpha))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    # unwrapped: DDP/compile key prefixes must never reach the file
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed `{layer}.lora.A.weight` / `{layer}.lora.B.weight` (MiniMind's names)."""
    return {f"{name}.lora.{k}": v for name, m in lora_modules(model).items() for k, v in m.lora.state_dict().items()}


def count_lora_params(model: nn.Module) -> int:
    return sum(v.numel() for v in lora_state_dict(model).values())


# ----------------------------------------------------------------------------------------------------------------
# Load / merge

LORA_FIX = "re-train it with trainer/train_lora.py (--lora_name) or copy the file again"


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (DDP "module." prefixes removed), or one UserError line saying what is wrong."""
    if not os.path.exists(path):
        raise UserError(f"LoRA file {path} not found; train it with trainer/train_lora.py (--lora_name) first")
    sd = load_torch_file(path, "LoRA file", LORA_FIX)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"LoRA file {path} is a torch file but not a dict of tensors (a {type(sd).__name__}); pass "
                        "the .pth that train_lora.py wrote to out/lora/")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # files written from a DDP-wrapped model
    if not any(k.endswith(".lora.A.weight") for k in sd):
        raise UserError(f"{path} holds no LoRA tensors (no '*.lora.A.weight' keys among {len(sd)}); is it a LoRA "
                        "file? Full weights go to --weight, adapters to --lora_weight")
    not_float = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise UserError(f"LoRA file {path} has non-float tensors, e.g. {not_float[0]}: it is damaged or not a LoRA "
                        f"file; {LORA_FIX}")
    broken = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if broken:
        raise UserError(f"LoRA file {path} holds NaN/inf in {len(broken)} tensor(s), e.g. {broken[0]} (written by a "
                        f"diverged run?); {LORA_FIX}")
    return sd


def load_lora(model: nn.Module, path: str, sd: dict | None = None) -> None:
    """Strictly load a LoRA file (or its tensors `sd`, already read by read_lora_file) into a model that already
    has adapters: every LoRA tensor present, shapes equal."""
    sd = read_lora_file(path) if sd is None else sd
    own = lora_state_dict(model)
    if not own:
        raise UserError("the model has no LoRA adapters; call apply_lora() (or apply_lora_from_file()) first")
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise UserError(f"LoRA file {path} does not fit the adapters on this model (rank, targets or model size "
                        f"differ): missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                        f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}, shape mismatches {bad[:3]}")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for k, p in m.lora.state_dict().items():
                p.copy_(sd[f"{name}.lora.{k}"])


def lora_settings(path: str, sd: dict | None = None) -> dict:
    """rank, alpha, targets (and the sidecar, if any) of a LoRA file.

    Written by train_lora.py: the sidecar's args hold them. A MiniMind LoRA file has no sidecar: the targets are read
    off the keys, the rank off A's shape, and alpha = rank (MiniMind's LoRA has no scaling).
    """
    side = read_sidecar(path)
    a = (side or {}).get("args") or {}
    if "lora_rank" in a and "lora_target" in a:
        alpha = a.get("lora_alpha")
        try:
            return dict(rank=int(a["lora_rank"]), alpha=float(a["lora_rank"] if alpha is None else alpha),
                        targets=parse_targets(a["lora_target"]), sidecar=side)
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"the sidecar of {path} has unreadable LoRA settings (lora_rank {a['lora_rank']!r}, "
                            f"lora_alpha {alpha!r}, lora_target {a['lora_target']!r}); restore it, or delete it to "
                            "read rank and targets off the tensors") from None
    if sd is None:
        sd = read_lora_file(path)
    a_keys = [k for k in sd if k.endswith(".lora.A.weight")]
    rank = int(sd[a_keys[0]].shape[0])
    targets = tuple(sorted({k[:-len(".lora.A.weight")].rsplit(".", 1)[-1] for k in a_keys}))
    return dict(rank=rank, alpha=float(rank), targets=targets, sidecar=side)


def base_fingerprint(model: nn.Module) -> str:
    """16 hex digits that identify a model's base weights (LoRA tensors excluded): sha256 over each parameter's
    name, shape and up to 4096 evenly strided values as fp16. Cheap (a few thousand values per tensor) and equal for
    the same weights however they were loaded (fp16 file -> fp32 model is exact); any real retraining changes it."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        if ".lora." in name:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float16)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_base(model: nn.Module, path: str, sidecar: dict | None) -> None:
    """Warn (stderr) when the LoRA's sidecar names other base weights than the model holds: the adapters still load,
    and may be meant for a further-trained base, but usually this is the wrong --weight."""
    a = (sidecar or {}).get("args") or {}
    recorded = a.get("lora_base_fingerprint")
    if recorded and recorded != base_fingerprint(model):
        print(f"WARNING: LoRA file {path} was trained on other base weights ({a.get('from_weight')} in "
              f"{a.get('from_dir')}, fingerprint {recorded}) than the model it is applied to (fingerprint "
              f"{base_fingerprint(model)}); its replies may be nonsense. Pass the --weight it was trained from.",
              file=sys.stderr, flush=True)


def apply_lora_from_file(model: nn.Module, path: str) -> nn.Module:
    """apply_lora with the file's rank/alpha/targets, then load_lora. Used by eval_llm.py --lora_weight (and the
    server and convert_model.py, through trainer/chat_utils.py)."""
    sd = read_lora_file(path)
    s = lora_settings(path, sd)
    file_cfg = ((s["sidecar"] or {}).get("model_config")) or {}
    own_cfg = getattr(model, "config", None)
    if own_cfg is not None:
        wrong = [f"{flag} {int(file_cfg[k]) if isinstance(file_cfg[k], bool) else file_cfg[k]}"
                 for k, flag in ARCH_FLAGS.items() if k in file_cfg and file_cfg[k] != getattr(own_cfg, k, None)]
        if wrong:
            raise UserError(f"LoRA file {path} was trained on a model with another architecture; the base model "
                            f"needs {' '.join(wrong)}")
    check_base(model, path, s["sidecar"])
    apply_lora(model, s["rank"], s["alpha"], s["targets"])
    load_lora(model, path, sd)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold alpha/rank * B @ A into each base weight and put plain nn.Linear layers back.

    The result has exactly the base model's state_dict layout (saveable as a normal MiniMind .pth) and computes the
    same function as the adapted model. All parameters become trainable again, as in a freshly built model.
    """
    model = unwrap(model)
    for name, m in lora_modules(model).items():
        w = m.weight
        w.copy_((w.float() + m.lora.delta_weight()).to(w.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = w, m.bias  # the same Parameters: no copy, no re-initialisation
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.requires_grad_(True)
    return model
