"""The optimizers of the full-model stages: AdamW, or Muon for the hidden matrices + AdamW for the rest.

    python trainer/train_pretrain.py --optimizer muon --data_path dataset/demo/pretrain.jsonl \
        --hidden_size 64 --num_hidden_layers 2

--optimizer muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; the split nanochat and
modded-nanogpt use): torch.optim.Muon for the weight of every nn.Linear inside a decoder layer (q/k/v/o projections,
the gate's widened q_proj included, and the dense, routed and shared experts' gate/up/down projections), AdamW for
everything else: the tied embedding / lm_head, RMSNorm weights, the MoE router (MoEGate, not an nn.Linear) and PPO's
value head (outside the decoder layers).

Learning rate: Muon runs with adjust_lr_fn="match_rms_adamw" (Liu et al. 2025, "Muon is Scalable for LLM Training"):
the orthogonalised update of an A x B matrix is scaled by 0.2 * sqrt(max(A, B)), which gives it the RMS of a typical
AdamW update, so the same --learning_rate, --weight_decay (decoupled: p *= 1 - lr * wd, as AdamW) and get_lr cosine
drive both halves; no second learning-rate flag. torch's Muon orthogonalises in bf16 with 5 Newton-Schulz steps:
the update's singular values land near 1 (roughly 0.5-1.5, not exactly 1), whatever the gradient's spread.

Both halves live in one torch.optim.Optimizer (MuonAdamW): the loop clips, steps, schedules and checkpoints it like
any single optimizer, and its state_dict holds both halves' state (keyed by parameter name in the resume file).
"""
from __future__ import annotations

import torch

from trainer.spine.common import UserError

OPTIMIZERS = ("adamw", "muon")


def muon_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters Muon updates: the weight of each nn.Linear inside a decoder layer (a module path
    through a `layers` ModuleList). The router (MoEGate), norms, embedding / lm_head and heads outside the layers
    stay with AdamW."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "layers" in mod_name.split(".") and mod.weight.requires_grad:
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer made of a torch Muon (its param groups first) and a torch AdamW (the rest). The halves share
    this object's param-group dicts and its state, so lr changes, GradScaler, clipping, state_dict and
    load_state_dict (plain or torch.distributed.checkpoint's by-name form) see one ordinary optimizer."""

    def __init__(self, muon_params: list, adamw_groups: list[dict], lr: float, weight_decay: float, fused: bool):
        self._halves = [torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay,
                                         adjust_lr_fn="match_rms_adamw")]
        if adamw_groups:  # a model of matrices only has no AdamW half
            self._halves.append(torch.optim.AdamW(adamw_groups, lr=lr, fused=fused))
        super().__init__([g for h in self._halves for g in h.param_groups], {})
        self._link()

    def _link(self) -> None:
        # load_state_dict replaces param_groups and state by new objects: point both halves at them again
        start = 0
        for half in self._halves:
            n = len(half.param_groups)
            half.param_groups, half.state = self.param_groups[start:start + n], self.state
            start += n

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for half in self._halves:
            half.step()
        return loss


def adamw_groups(named: list, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (norm weights and the tied embedding are not decayed)."""
    decay, no_decay = [], []
    for name, p in named:
        (decay if p.dim() >= 2 and "embed" not in name and "lm_head" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model_or_params, lr: float, weight_decay: float = 0.01, device: torch.device | None = None,
                    kind: str = "adamw"):
    """--optimizer adamw: AdamW (see adamw_groups). --optimizer muon: MuonAdamW over a whole trainable model.
    The fused AdamW kernel on CUDA and CPU (on CPU it is ~8x faster than the default foreach loop: 24M fp32 params
    100 -> 12 ms/step)."""
    if kind not in OPTIMIZERS:
        raise UserError(f"--optimizer {kind} is not one of {', '.join(OPTIMIZERS)}")
    is_module = isinstance(model_or_params, torch.nn.Module)
    named = list(model_or_params.named_parameters()) if is_module else list(model_or_params)
    seen, trainable = set(), []
    for name, p in named:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            trainable.append((name, p))
    device = device if device is not None else trainable[0][1].device
    fused = device.type in ("cuda", "cpu")
    if kind == "adamw":
        return torch.optim.AdamW(adamw_groups(trainable, weight_decay), lr=lr, fused=fused)
    frozen = [n for n, p in named if not p.requires_grad]
    if not is_module or frozen:
        raise UserError("--optimizer muon is for stages that train the whole model"
                        + (f"; this one freezes {len(frozen)} tensors (e.g. {frozen[0]}, LoRA trains adapters only)"
                           if frozen else "") + "; pass --optimizer adamw")
    hidden = muon_parameter_names(model_or_params)
    muon = [p for n, p in trainable if n in hidden]
    rest = [(n, p) for n, p in trainable if n not in hidden]
    if not muon:
        raise UserError("--optimizer muon found no hidden matrices (nn.Linear inside decoder layers) to optimise; "
                        "pass --optimizer adamw")
    return MuonAdamW(muon, adamw_groups(rest, weight_decay), lr, weight_decay, fused)


def optimizer_kind(opt_or_state: torch.optim.Optimizer | dict) -> str:
    """'muon' or 'adamw' for an optimizer or its saved state_dict (Muon's groups carry ns_steps)."""
    groups = opt_or_state["param_groups"] if isinstance(opt_or_state, dict) else opt_or_state.param_groups
    return "muon" if any("ns_steps" in g for g in groups) else "adamw"
