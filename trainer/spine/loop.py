"""The training loop every stage shares (TrainLoop), its LR schedule, resumable data order, optimizer and logging."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from model.model_minimind import MiniMindConfig
from trainer.spine.checkpoint import (lm_checkpoint, load_trainable_state_dict, save_weights, weight_path)
from trainer.spine.common import Logger, UserError, is_main_process
from trainer.spine.runtime import RunContext, cleanup_distributed, reduce_mean, unwrap, wrap_model


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
