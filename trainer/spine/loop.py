"""The training loop every stage shares (TrainLoop), its LR schedule, resumable data order and optimizer.

Step semantics: an optimizer step takes one accumulation window (accumulation_steps micro-batches on every rank; an
epoch's last window may be shorter, never merged into the next epoch). --max_steps, --log_interval and
--save_interval count optimizer steps. The loss of a step is the mean over all its units (supervised tokens by
default) across the window and the ranks, whatever the split into micro-batches (`backward(loss, units=n)`). The
cosine schedule follows the samples consumed (so it is the same curve for any number of processes), or the optimizer
steps when --max_steps ends the run early. Guards (spine/guards.py): non-finite steps are skipped and counted, a stop
signal saves a resume checkpoint at the next step boundary, nothing non-finite is ever written.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from dataset.lm_dataset import GROUP_CHUNK, GROUP_FILL, group_by_length
from model.flops import Flops, peak_flops
from model.model_minimind import MiniMindConfig
from trainer.spine.checkpoint import (check_resume_identity, gather_module_state, gather_train_state, lm_checkpoint,
                                      load_optimizer_state, load_trainable_state_dict, optimizer_owner, read_sidecar,
                                      resume_path, run_identity, save_weights, sidecar_path, weight_path)
from trainer.spine.common import Logger, UserError
from trainer.spine.guards import (EXIT_SIGNAL, SaveError, StopSignals, TrainingDiverged, TrainingStopped,
                                  check_writable_dir, end_data_workers, ignore_stop_signals_in_worker, remove_stale_temps,
                                  track_data_workers)
from trainer.spine.logs import MetricsFile, NoOpWandb, init_wandb  # noqa: F401 (re-exported)
from trainer.spine.optim import build_optimizer, optimizer_kind  # noqa: F401 (re-exported)
from trainer.spine.runtime import (RunContext, cleanup_distributed, enable_grad_checkpointing, grad_norm, is_sharded,
                                   no_sync, unwrap, wrap_model)


def get_lr(step: float, total_steps: float, lr: float, warmup: int = 0) -> float:
    """Cosine from lr to 0.1*lr over total_steps (reference schedule), with an optional linear warmup. `step` and
    `total_steps` may be any unit of progress (the loop passes samples consumed)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))


def supervised_tokens(batch) -> int | None:
    """Default unit count of a micro-batch: positions with a next-token target, (labels[:, 1:] != -100).sum();
    None for batches without labels (RL prompts), whose loss is averaged per micro-batch instead."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor):
        return None
    return int((labels[:, 1:] != -100).sum())


class SkipBatchSampler(Sampler):
    """Per-rank batches of one global, seeded sample order, able to start after `skip_samples` samples.

    The epoch's order is a permutation seeded by seed+epoch, the same on every rank. Global batch k is the next
    batch_size*world_size samples of it, and rank r takes the r-th run of batch_size of them. Because the position in
    that order is counted in samples, a run resumed with another number of GPUs continues exactly where the last one
    stopped. With several ranks the order is padded by wrapping so every rank gets the same number of batches (no DDP
    hang).

    Length grouping (lengths given, group_size > 0): the permutation is regrouped chunk by chunk (GROUP_CHUNK x
    group_size samples; lm_dataset.group_by_length) into blocks of group_size samples of similar length (width 0) or
    that fill packed rows of `width` together (width > 0, lengths and width in the same unit); a chunk's blocks are
    shuffled, seeded by seed, epoch and chunk. The result is still one permutation of the epoch that does not depend
    on the world size, and with group_size = batch_size every block is one rank's micro-batch. Chunks are regrouped
    lazily as the epoch proceeds, so a multi-million-sample epoch starts at once.
    """

    def __init__(self, num_samples: int, batch_size: int, *, epoch: int = 0, seed: int = 42, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, skip_samples: int = 0, lengths=None,
                 group_size: int = 0, width: float = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.shuffle, self.skip_samples = shuffle, min(skip_samples, num_samples)
        self.lengths = torch.as_tensor(lengths) if group_size and lengths is not None else None
        self.group_size, self.width = group_size, width

    def _chunks(self):
        """The epoch's order after skip_samples, chunk by chunk (lists of sample indices)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        size = GROUP_CHUNK * (self.group_size or self.batch_size)
        first = self.skip_samples // size
        for c in range(first, math.ceil(self.num_samples / size)):
            part = order[c * size:(c + 1) * size]
            if self.lengths is not None:
                rng = random.Random(f"{self.seed}-{self.epoch}-{c}")  # str seeds are hashed stably (sha512)
                chunk = group_by_length(part.tolist(), self.lengths[part].tolist(), self.group_size, self.width, rng)
            else:
                chunk = part.tolist()
            yield chunk[self.skip_samples - c * size:] if c == first else chunk

    def __iter__(self):
        g, w = self.batch_size * self.world_size, self.world_size
        head, buf = [], []  # head: the first samples, which pad the last global batch to a multiple of the ranks
        for chunk in self._chunks():
            if len(head) < w:
                head += chunk[:w - len(head)]
            buf += chunk
            while len(buf) >= g:
                yield buf[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                del buf[:g]
        if buf:
            pad = (-len(buf)) % w
            buf += (head * math.ceil(pad / max(len(head), 1)))[:pad]
            per = len(buf) // w
            yield buf[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        n = self.num_samples - self.skip_samples
        n += (-n) % self.world_size
        return math.ceil(n / (self.batch_size * self.world_size))

    def samples_after(self, batches: int) -> int:
        """Position in the epoch's order (in real samples) after this many batches of this sampler."""
        return min(self.num_samples, self.skip_samples + batches * self.batch_size * self.world_size)


def _to_device(batch, device, non_blocking):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _mark_dynamic(batch):
    """Under --use_compile 1: packed and length-grouped batches change rows and width every step. Marking both dims
    dynamic up front makes dynamo trace one dynamic-shape graph on the first step instead of a static one per new
    shape (each a recompile of the whole model, minutes on a GPU for 640x12 MoE). Eager ignores the mark."""
    tensors = batch.values() if isinstance(batch, dict) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for d in range(min(t.dim(), 2)):
                torch._dynamo.maybe_mark_dynamic(t, d)
    return batch


@dataclass
class RolloutUpdates:
    """Several optimizer steps per rollout batch (RL): `iterations` passes (GRPO's mu, PPO's update epochs) over
    the rollout, each split into mini-batches of `mini_batch_size` completions per rank (0: the whole rollout, one
    step per pass). rows_per_prompt: completions per prompt (GRPO's group size G, else 1)."""
    iterations: int = 1
    mini_batch_size: int = 0
    rows_per_prompt: int = 1
    iterations_flag: str = "num_iterations"  # named in error messages


def _merge_batches(batches: list):
    """One batch of the window's micro-batches (RL prompt batches: dicts of lists)."""
    first = batches[0]
    if not isinstance(first, dict) or not all(isinstance(v, list) for v in first.values()):
        raise TypeError("rollout windows merge dict-of-list batches (collate_rl) only")
    return {k: [x for b in batches for x in b[k]] for k in first}


class TrainLoop:
    """Iterate training batches and take care of every step mechanic a stage shares.

    model: the trainable module (unwrapped). `loop.model` is what to call forward on (DDP/compiled).
    optimizer: one optimizer or a dict of named ones (each clipped on its own params; a group's `initial_lr`,
        default its lr at construction, is its peak lr for the schedule).
    count_units: batch -> number of loss units in it (default supervised_tokens; DPO counts valid pairs). Counted
        on the CPU batch before it moves to the device, so it costs no device sync.
    weights_path / weights_state: where and what the weights file holds (default: the full model state_dict at
        {save_dir}/{save_weight}_{h}{_moe}.pth); LoRA passes its own.
    resume_objects: extra things with state_dict()/load_state_dict() saved in the resume file (critic, tracker...).
    evaluate: (opt_step, last) -> dict of held-out metrics or None, called after each optimizer step; a dict is
        logged with that step's row (trainer/answer_eval.py's PeriodicEval, --eval_interval). RL stages: after
        each rollout batch (several steps may pass between calls). A hook with hold_out(dataset, resume) (spine/
        evaluate.py's HeldOutEval) gets the dataset first and returns the training part; its `held_out` goes into
        the resume file. Its time is left out of tokens/s; its last values go into the weights' sidecar.
    flops: model/flops.py's Flops of one trained token (the stage's models: training + frozen forwards): the
        progress line then shows achieved TFLOP/s and, against the GPU's bf16 peak or --peak_tflops, mfu.
    rollout: RolloutUpdates for RL stages: iteration yields one prompt batch per accumulation window and the stage
        calls update() with its rollout, which takes iterations x mini-batches optimizer steps (see update).
    """

    def __init__(self, args, ctx: RunContext, *, model, optimizer, dataset, collate_fn, config: MiniMindConfig,
                 stage: str, tokenizer=None, weights_path: str | None = None, weights_state=None,
                 resume_objects: dict | None = None, run_name: str | None = None, checkpoint_name: str | None = None,
                 count_units=supervised_tokens, evaluate=None, rollout: RolloutUpdates | None = None,
                 flops: Flops | None = None):
        self.args, self.ctx, self.config, self.stage = args, ctx, config, stage
        self.raw_model = model
        # named optimizers ({"actor": a, "critic": c}) get their own clipping and grad-norm metric
        self.optimizers = dict(optimizer) if isinstance(optimizer, dict) else {"": optimizer}
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.dataset, self.collate_fn, self.tokenizer, self.count_units = dataset, collate_fn, tokenizer, count_units
        self.weight_name = checkpoint_name or args.save_weight
        self.weights_path = weights_path or weight_path(args.save_dir, args.save_weight, config.hidden_size,
                                                        config.use_moe)
        self.weights_state = weights_state or (lambda m: m.state_dict())
        self.resume_objects = resume_objects or {}
        self.evaluate = evaluate
        self.flops, self.peak = flops, self._peak(args, ctx) if flops is not None else None
        self.last_eval = None  # {"step": s, metric: value} of the last evaluation: the sidecar's "eval"
        self.resume_path = resume_path(args.checkpoint_dir, self.weight_name, config)
        metrics_path = self.resume_path.replace("_resume.pth", "_metrics.jsonl")
        self.accum = args.accumulation_steps
        self._pin = ctx.device.type == "cuda"
        self.rollout = rollout
        self.steps_per_rollout = self._plan_rollout_updates(rollout) if rollout is not None else 1
        if len(dataset) == 0:
            raise UserError(f"the training data {getattr(args, 'data_path', '')} has no samples (empty file or only "
                            "blank lines): nothing to train on; pass a --data_path with data")
        if ctx.is_main:
            check_writable_dir(os.path.dirname(os.path.abspath(self.weights_path)), "--save_dir")
            check_writable_dir(args.checkpoint_dir, "--checkpoint_dir")
            stale = remove_stale_temps([self.weights_path, sidecar_path(self.weights_path), self.resume_path,
                                        metrics_path])
            if stale:
                Logger(f"removed {len(stale)} temporary file(s) left by an interrupted save: {', '.join(stale)}")
        if getattr(args, "grad_checkpointing", 0):
            enable_grad_checkpointing(model)
            Logger("gradient checkpointing on: activations are recomputed in backward")
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16 and
                                           ctx.device.type == "cuda")
        self._wrapped = []
        self._compile = bool(getattr(args, "use_compile", 0))  # torch.compile each wrapped module
        self.model = self.wrap(model)

        # resume: optimizer steps done, micro-batches done (global_step), data position (epoch + samples into it)
        self.start_epoch, self.skip_samples, self.global_step, self.opt_step = 0, 0, 0, 0
        self.identity = run_identity(stage, dataset, args)  # of the whole file, held-out records included
        ckp = lm_checkpoint(config, self.weight_name, save_dir=args.checkpoint_dir) if args.from_resume else None
        if ckp is not None:
            check_resume_identity(ckp, self.identity, self.resume_path)
        if hasattr(evaluate, "hold_out"):  # before any count or order is derived from the dataset
            self.dataset = dataset = evaluate.hold_out(dataset, ckp)
        self.order, self.resumed_order = self._grouping(args, dataset), None
        self._epoch_order = self.order
        self.bad_steps, self.bad_in_a_row, self.empty_windows, self.overflow_steps = 0, 0, 0, 0
        if args.from_resume and ckp is None:
            Logger(f"--from_resume 1 but no {self.resume_path}: starting from scratch")
        if ckp is not None:
            self._load_resume(ckp)
        self._start_opt_step = self.opt_step
        self.updates = 0  # optimizer updates applied by this run (skipped and empty steps excluded)
        self._last_save = (self.resume_path, self.opt_step) if ckp is not None else None

        # the whole run in optimizer steps, for this batch size, accumulation and world size
        steps_left = 0
        for epoch in range(self.start_epoch, args.epochs):
            skip = self.skip_samples if epoch == self.start_epoch else 0
            batches = len(SkipBatchSampler(len(dataset), args.batch_size, world_size=ctx.world_size,
                                           skip_samples=skip))
            steps_left += math.ceil(batches / self.accum) * self.steps_per_rollout
        natural_total = self.opt_step + steps_left
        self.total_steps = min(natural_total, args.max_steps) if args.max_steps else natural_total
        # --max_steps that ends the run early also ends the cosine there; otherwise the cosine follows samples
        self.step_schedule = bool(args.max_steps) and args.max_steps < natural_total
        self.total_samples = args.epochs * len(dataset)
        if ckp is not None:
            self._note_schedule_change(ckp)
        if ckp is not None and self.opt_step >= self.total_steps:
            self._release()
            raise TrainingStopped(f"already finished at step {self.opt_step} ({self.weights_path}); nothing to do. "
                                  "Raise --epochs or --max_steps to train on, or pass --from_resume 0 to start over",
                                  0)
        if len(dataset) < args.batch_size * ctx.world_size and ctx.is_main:
            Logger(f"NOTE: the data has {len(dataset)} samples, fewer than one batch ({args.batch_size} x "
                   f"{ctx.world_size} ranks): every epoch is a single step on those samples")

        self.wandb = init_wandb(args, run_name or f"MiniMind-{stage}-Epoch-{args.epochs}-BatchSize-"
                                f"{args.batch_size}-LearningRate-{args.learning_rate}",
                                ckp.get("wandb_id") if ckp else None, self.opt_step)
        self.metrics_file = MetricsFile(metrics_path)
        self.metrics_file.truncate_after(self.opt_step)  # a fresh run (step 0) starts a new file
        self.iters_per_epoch = len(SkipBatchSampler(len(dataset), args.batch_size, world_size=ctx.world_size))
        self._reset_log()
        self._saved_at = None
        self._window, self._units_total, self.units = 1, None, None
        self.epoch, self.step = self.start_epoch, 0
        if ctx.is_main:
            self._print_plan(len(dataset), metrics_path)

    @staticmethod
    def _peak(args, ctx) -> float | None:
        """Peak FLOP/s of one device for mfu: --peak_tflops, else the GPU's bf16 dense peak (model/flops.py's table);
        None (no mfu) on a CPU or an unknown GPU without --peak_tflops."""
        if getattr(args, "peak_tflops", None):
            return args.peak_tflops * 1e12
        if ctx.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(ctx.device)
        peak = peak_flops(name)
        if peak is None and ctx.is_main:
            Logger(f"NOTE: no bf16 peak known for '{name}': mfu is not logged; pass --peak_tflops (the GPU's dense "
                   "bf16 TFLOP/s) to get it")
        return peak

    def _print_plan(self, samples: int, metrics_path: str) -> None:
        """What the run will do, before the first step (which may take a while to show with a big model)."""
        args, per_step = self.args, self.args.batch_size * self.accum * self.ctx.world_size
        seq = getattr(args, "max_seq_len", None)
        # token datasets only: an RL sample is a prompt whose rollout length the stage decides
        seqs = per_step * getattr(self.dataset, "sequences", 1)
        tokens = f", up to {seqs * seq:,} tokens per step (--max_seq_len {seq})" \
            if seq and hasattr(self.dataset, "targets_of") else ""
        left = self.total_steps - self.opt_step
        Logger(f"plan: {samples:,} samples x {args.epochs} epoch(s) -> {left:,} optimizer steps"
               + (f" (steps {self.opt_step + 1}-{self.total_steps})" if self.opt_step else "")
               + f"; {per_step} samples per step ({args.batch_size} batch x {self.accum} accumulation x "
               f"{self.ctx.world_size} process(es)){tokens}; a progress line every {args.log_interval} steps, a "
               f"save every {args.save_interval} steps and at the end")
        Logger(f"plan: weights -> {self.weights_path}; resume file -> {self.resume_path}; metrics -> {metrics_path}")

    def _plan_rollout_updates(self, plan: RolloutUpdates) -> int:
        """Mini-batches and chunks of a rollout batch; returns the optimizer steps per rollout batch."""
        args = self.args
        rows = self.accum * args.batch_size * plan.rows_per_prompt  # completions of a full window on this rank
        if plan.iterations < 1:
            raise UserError(f"--{plan.iterations_flag} {plan.iterations} must be >= 1")
        if plan.mini_batch_size < 0 or plan.mini_batch_size > rows:
            raise UserError(f"--mini_batch_size {plan.mini_batch_size} must be between 0 (the whole rollout batch) "
                            f"and the {rows} completions of a rollout batch per rank (--batch_size {args.batch_size}"
                            f" x --accumulation_steps {self.accum} x {plan.rows_per_prompt} per prompt)")
        self.rollout_mini_batches = math.ceil(rows / plan.mini_batch_size) if plan.mini_batch_size else 1
        # chunks of one micro-batch's completions: the forward memory stays that of --batch_size
        self.rollout_chunk_rows = args.batch_size * plan.rows_per_prompt
        steps = plan.iterations * self.rollout_mini_batches
        if args.max_steps and args.max_steps % steps:
            raise UserError(f"--max_steps {args.max_steps} must be a multiple of the {steps} optimizer steps per "
                            f"rollout batch (--{plan.iterations_flag} {plan.iterations} x "
                            f"{self.rollout_mini_batches} mini-batch(es)), so every run ends at a rollout boundary "
                            f"and resumes exactly: e.g. {args.max_steps // steps * steps or steps} or "
                            f"{(args.max_steps // steps + 1) * steps}")
        if steps > 1 and self.ctx.is_main:
            Logger(f"{steps} optimizer steps per rollout batch: {plan.iterations} pass(es) x "
                   f"{self.rollout_mini_batches} mini-batch(es) of ~{math.ceil(rows / self.rollout_mini_batches)} "
                   f"completions per rank; the rollout's log-probs are pi_old")
        return steps

    def _grouping(self, args, dataset) -> dict:
        """The sampler's length grouping for --group_by_length: blocks of batch_size samples; with --pack 1 they
        are pre-packed into rows of GROUP_FILL x max_seq_len estimated tokens (lengths are JSONL bytes, so the width
        is in bytes: tokens x the dataset's bytes_per_token x its sequences per sample)."""
        if not getattr(args, "group_by_length", 0):
            return {"group_size": 0, "width": 0}
        if getattr(dataset, "lengths", None) is None:
            Logger("NOTE: --group_by_length 1, but this dataset has no lengths: batches are not grouped")
            return {"group_size": 0, "width": 0}
        width = 0.0
        if getattr(args, "pack", 0):
            width = GROUP_FILL * args.max_seq_len * getattr(dataset, "sequences", 1) * dataset.bytes_per_token
        if self.ctx.is_main:
            Logger(f"length-grouped batches: chunks of {GROUP_CHUNK} x {args.batch_size} samples "
                   + (f"pre-packed into rows of ~{GROUP_FILL * args.max_seq_len:.0f} tokens" if width else
                      "sorted by length") + f" (lengths estimated at {dataset.bytes_per_token:.2f} bytes/token)")
        return {"group_size": args.batch_size, "width": round(width, 3)}

    def _load_resume(self, ckp: dict) -> None:
        path = self.resume_path
        load_trainable_state_dict(self.raw_model, ckp["model"], path)
        if set(ckp.get("optimizer", {})) != set(self.optimizers):
            raise UserError(f"resume file {path} holds optimizers {sorted(ckp.get('optimizer', {}))}, "
                            f"this script has {sorted(self.optimizers)}; pass --from_resume 0")
        for name, opt in self.optimizers.items():
            saved, now = optimizer_kind(ckp["optimizer"][name]), optimizer_kind(opt)
            if saved != now:
                raise UserError(f"resume file {path} was written with --optimizer {saved}, this run has --optimizer "
                                f"{now}; pass --optimizer {saved} to resume it, or --from_resume 0 to start over")
            load_optimizer_state(optimizer_owner(opt, self._modules()), opt, ckp["optimizer"][name], path)
        if "scaler" in ckp:
            self.scaler.load_state_dict(ckp["scaler"])
        for name, obj in self.resume_objects.items():
            if name not in ckp:
                raise UserError(f"resume file {path} has no '{name}' state; pass --from_resume 0")
            if isinstance(obj, torch.nn.Module) and is_sharded(obj):
                load_trainable_state_dict(obj, ckp[name], path)
            else:
                obj.load_state_dict(ckp[name])
        self.start_epoch, self.skip_samples = ckp["epoch"], ckp["samples"]
        # the order the interrupted epoch was grouped by (older files: ungrouped), so it continues exactly
        self.resumed_order = ckp.get("data_order", {"group_size": 0, "width": 0})
        if self.skip_samples and self.resumed_order != self.order:
            Logger(f"NOTE: the interrupted epoch continues in the order it started with ({self.resumed_order}, "
                   f"now {self.order}: batch size, --pack, --group_by_length or --max_seq_len changed); "
                   "the next epochs use the current flags")
        self.global_step, self.opt_step = ckp.get("global_step", 0), ckp.get("opt_step", 0)
        self.bad_steps, self.empty_windows = ckp.get("bad_steps", 0), ckp.get("empty_windows", 0)
        self.last_eval = ckp.get("last_eval")
        Logger(f"resumed from {path}: step {self.opt_step}, epoch {self.start_epoch + 1}, {self.skip_samples} "
               f"samples into it (saved with world size {ckp.get('world_size')}, now {self.ctx.world_size})")
        # resume file and weights are written one after the other: a kill between the two, or a failed write of one,
        # leaves the weights a save behind or ahead
        side = read_sidecar(self.weights_path) if os.path.exists(self.weights_path) else None
        if side and side.get("stage") == self.stage and side.get("step", self.opt_step) != self.opt_step:
            Logger(f"NOTE: {self.weights_path} is from step {side.get('step')}, the resume file from step "
                   f"{self.opt_step}; training continues from step {self.opt_step} and the next save replaces it")

    def _note_schedule_change(self, ckp: dict) -> None:
        """--max_steps or --epochs changed on resume: the cosine is stretched or shrunk, so the lr jumps at once."""
        old = ckp.get("schedule")
        new = {"max_steps": self.args.max_steps, "epochs": self.args.epochs}
        if not old or old == new:
            return
        before = self._lr()  # the resumed optimizer's lr: the one its last step used
        self._set_lr(self.start_epoch * len(self.dataset) + self.skip_samples)
        changed = ", ".join(f"--{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k])
        Logger(f"NOTE: {changed} changes the learning-rate schedule of this resumed run: the cosine now ends at "
               f"step {self.total_steps}, so the lr goes from {before:.3e} (step {self.opt_step}) to "
               f"{self._lr():.3e} (step {self.opt_step + 1})")

    # -- wrapping
    def _modules(self) -> list:
        """Every module an optimizer may update: the model, what wrap() wrapped, module resume objects."""
        return [self.raw_model, *self._wrapped,
                *(v for v in self.resume_objects.values() if isinstance(v, torch.nn.Module))]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP/compile-wrap a trainable module; no_sync is applied to it on accumulation micro-steps."""
        wrapped = wrap_model(module, self.ctx, compile=self._compile, optimizers=self.optimizers.values())
        self._wrapped.append(wrapped)
        return wrapped

    # -- iteration
    def __iter__(self):
        """Supervised stages: each micro-batch of an accumulation window (call backward once per batch), then one
        optimizer step. RL stages (rollout=RolloutUpdates(...)): the window's prompts as one batch; the stage rolls
        them out and calls update(), which runs that rollout's optimizer steps."""
        self._t0 = self._t_last = time.time()
        self._steps_run, self._eval_s = 0, 0.0
        signals = StopSignals(f"[rank {self.ctx.rank}] " if self.ctx.ddp else "")
        signals.install()
        try:
            for epoch in range(self.start_epoch, self.args.epochs):
                finished = yield from self._run_epoch(epoch, signals)
                if finished:
                    break
                self.skip_samples = 0
        finally:
            signals.restore()
            end_data_workers()  # an error (or a stop) leaves this epoch's workers alive
        if self.updates == 0:  # e.g. every window empty; a diverged run has raised already
            why = (f"all {self.empty_windows} steps had no supervised token (is --max_seq_len "
                   f"{getattr(self.args, 'max_seq_len', '?')} cutting every answer?)" if self.empty_windows
                   else "no step was run")
            raise UserError(f"the run trained nothing: {why}; no file was written")

    def _epoch_loader(self, epoch: int):
        """The epoch's sampler (resumed position and grouping included) and an iterator over its batches."""
        args, ctx = self.args, self.ctx
        skip = self.skip_samples if epoch == self.start_epoch else 0
        self._epoch_order = self.resumed_order if skip and self.resumed_order is not None else self.order
        sampler = SkipBatchSampler(len(self.dataset), args.batch_size, epoch=epoch, seed=args.seed,
                                   rank=ctx.rank, world_size=ctx.world_size, skip_samples=skip,
                                   lengths=self.dataset.lengths if self._epoch_order["group_size"] else None,
                                   **self._epoch_order)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=args.num_workers, pin_memory=self._pin, persistent_workers=False,
                            worker_init_fn=ignore_stop_signals_in_worker if args.num_workers else None)
        return sampler, track_data_workers(iter(loader))

    def _run_epoch(self, epoch: int, signals):
        """One epoch, window by window; returns True when the run is over (--max_steps)."""
        sampler, batches = self._epoch_loader(epoch)
        n, i = len(sampler), 0
        self.epoch = epoch
        done_before = self.iters_per_epoch - n  # micro-steps of this epoch run before a resume
        while i < n:
            # the whole accumulation window first: its unit count is known before any backward
            window = [next(batches) for _ in range(min(self.accum, n - i))]
            samples = epoch * len(self.dataset)
            steps_before = self.opt_step
            if self.rollout is None:
                yield from self._window_step(window, epoch, sampler, i, done_before, signals)
            else:
                yield from self._rollout_window(window, epoch, sampler, i, signals)
            i += len(window)
            if self._step_boundary(epoch, sampler, i, n, steps_before, samples + sampler.samples_after(i)):
                return True
        return False

    def _window_step(self, window, epoch: int, sampler, i: int, done_before: int, signals):
        """Yield the window's micro-batches (backward on each), then take its optimizer step."""
        units = [self.count_units(b) for b in window]
        counted = all(u is not None for u in units)
        total, stop = self._agree(sum(units) if counted else 0.0, signals.received)
        if stop is not None:
            self._stop(epoch, sampler.samples_after(i), stop)
        self._set_lr(epoch * len(self.dataset) + sampler.samples_after(i))
        self._window, self._units_total = len(window), (total if counted else None)
        if counted and total == 0:  # no supervised token anywhere in this step: nothing to learn
            self.empty_windows += 1
            self.global_step += len(window)
        else:
            for k, batch in enumerate(window):
                self.step = done_before + i + k + 1  # 1-indexed micro-step within the epoch
                self.units = units[k]
                self._note_batch(batch)
                self._backward_called = False
                with self._no_sync(k < len(window) - 1):  # gradients are all-reduced once, on the window's last
                    batch = _to_device(batch, self.ctx.device, self._pin)
                    yield _mark_dynamic(batch) if self._compile else batch
                if not self._backward_called:
                    raise RuntimeError("TrainLoop: call loop.backward(loss) once per batch")
                self.global_step += 1
            self._optimizer_step()
        self.opt_step += 1
        self._steps_run += 1

    def _step_boundary(self, epoch: int, sampler, i: int, n: int, steps_before: int, samples_done: int) -> bool:
        """After a window (supervised) or a rollout batch (RL): evaluate, log, save; True when the run is over."""
        args = self.args
        epoch_done = i == n
        last = (epoch_done and epoch == args.epochs - 1) or self.opt_step >= self.total_steps
        t = time.time()
        evals = self.evaluate(self.opt_step, last) if self.evaluate else None
        if evals:
            self._t_last += time.time() - t  # tokens/s and mfu measure training, not the evaluation
            self._eval_s += time.time() - t
            self.last_eval = {"step": self.opt_step, **{k: v for k, v in evals.items() if "/" not in k}}
        if self.opt_step % args.log_interval == 0 or epoch_done or last or evals:
            self._log(samples_done, evals)
        elif steps_before == self._start_opt_step:  # the run's first step is shown at once, whatever --log_interval
            self._log(samples_done, record=False)
        # every multiple of --save_interval passed in this window or rollout batch (one per step when supervised)
        if self.opt_step // args.save_interval > steps_before // args.save_interval or epoch_done or last:
            self.save(epoch + 1 if epoch_done else epoch, 0 if epoch_done else sampler.samples_after(i))
        if self.opt_step >= self.total_steps:
            if args.max_steps and self.opt_step >= args.max_steps:
                Logger(f"reached --max_steps {args.max_steps}; stopping")
            return True
        return False

    def _no_sync(self, active: bool):
        """No gradient reduction on every wrapped module while `active` (accumulation micro-steps before the last):
        DDP's no_sync, FSDP2's set_requires_gradient_sync(False) (runtime.no_sync)."""
        stack = contextlib.ExitStack()
        if active:
            for m in self._wrapped:
                stack.enter_context(no_sync(m))
        return stack

    # -- several optimizer steps per rollout batch (RL)
    def _rollout_window(self, window, epoch: int, sampler, i: int, signals):
        """Yield the window's prompts as one rollout batch; the stage's update() call runs its optimizer steps.
        Stop signals are honoured here, at rollout boundaries only, so a resume file never falls inside a rollout
        batch; sampling is seeded by (seed, micro-step, rank), so a resumed run draws the same rollouts."""
        _, stop = self._agree(0.0, signals.received)
        if stop is not None:
            self._stop(epoch, sampler.samples_after(i), stop)
        start = epoch * len(self.dataset)
        self._rollout_span = (start + sampler.samples_after(i), start + sampler.samples_after(i + len(window)))
        torch.manual_seed(self.args.seed + 100_003 * self.global_step + self.ctx.rank)
        self._updated = False
        batch = window[0] if len(window) == 1 else _merge_batches(window)
        yield _to_device(batch, self.ctx.device, self._pin)
        if not self._updated:
            raise RuntimeError("TrainLoop: call loop.update(...) once per rollout batch")
        self.global_step += len(window)

    def update(self, loss_fn, num_rows: int, *, row_units: torch.Tensor | None = None, metrics: dict | None = None,
               stop_kl: float = 0.0) -> None:
        """The optimizer steps of one rollout batch of `num_rows` completions (rows) on this rank: `iterations`
        passes over it, each split into the same mini-batches (contiguous rows), one optimizer step per mini-batch,
        its rows forwarded in chunks of at most `chunk_rows` (gradient accumulation, DDP-synced once per step).

        loss_fn(rows, iteration) -> (loss, stats): rows a LongTensor of row indices; loss the mean over those rows'
            units (row_units, default 1 per row; e.g. active tokens for a token-level mean) so that the step's
            gradient is the mean over every unit of the mini-batch on all ranks. stats: detached metrics to log;
            "aux" (an extra per-chunk loss term such as the MoE balance loss) and "num_tokens" are taken out.
        metrics: rollout-level metrics (reward...), logged with every optimizer step of this rollout.
        stop_kl > 0: KL early stop (PPO): when a step's mean approx_kl (to pi_old, over all ranks) exceeds it, that
            step's update and the rest of this rollout's steps are skipped (counted as steps; logged as kl_stop).
        The LR follows progress through the rollout's samples, so the schedule is the same for any mu x mini-batch
        split; a step whose rows are all empty (no units anywhere) is counted but takes no update.
        """
        if self.rollout is None:
            raise RuntimeError("TrainLoop.update needs TrainLoop(..., rollout=RolloutUpdates(...))")
        if self._updated:
            raise RuntimeError("TrainLoop: loop.update(...) once per rollout batch")
        self._updated = True
        units = row_units.double().cpu() if row_units is not None else torch.ones(num_rows, dtype=torch.float64)
        parts = torch.arange(num_rows).tensor_split(self.rollout_mini_batches)
        first, end = self._rollout_span
        stopped, k = False, 0
        for iteration in range(self.rollout.iterations):
            for rows in parts:
                k += 1
                self._set_lr(first + (end - first) * (k - 1) / self.steps_per_rollout)
                if metrics:
                    self.log_metrics(**metrics)
                if not stopped:
                    stopped = self._rollout_step(loss_fn, rows, units, iteration, stop_kl)
                if stopped:
                    self.log_metrics(kl_stop=1.0)
                self.opt_step += 1
                self._steps_run += 1
                if k < self.steps_per_rollout and self.opt_step % self.args.log_interval == 0:
                    self._log(int(first + (end - first) * k / self.steps_per_rollout))

    def rollout_chunks(self, num_rows: int) -> list:
        """The row chunks of one pass over a rollout batch, in the order and split update() forwards them (so a
        stage can compute pi_old / reference log-probs on exactly the same batches)."""
        parts = torch.arange(num_rows).tensor_split(self.rollout_mini_batches)
        return [c for rows in parts for c in rows.split(self.rollout_chunk_rows)]

    def _rollout_step(self, loss_fn, rows: torch.Tensor, units: torch.Tensor, iteration: int, stop_kl: float) -> bool:
        """One optimizer step on a mini-batch of rows; True when the KL early stop skipped it."""
        local = float(units[rows].sum()) if len(rows) else 0.0
        total, _ = self._agree(local, None)
        if total == 0:
            self.empty_windows += 1
            return False
        chunks = rows.split(self.rollout_chunk_rows)
        self._window, self._units_total = len(chunks), total
        kl = []
        for c, idx in enumerate(chunks):
            with self._no_sync(c < len(chunks) - 1):
                loss, stats = loss_fn(idx, iteration)
                aux, tokens = stats.pop("aux", None), stats.pop("num_tokens", 0)
                kl.append(stats.get("approx_kl", 0.0))
                self.backward(loss, units=float(units[idx].sum()), num_tokens=tokens, aux=aux, **stats)
        if stop_kl > 0:
            mean_kl = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in kl]).mean().to(self.ctx.device)
            if self.ctx.ddp:
                dist.all_reduce(mean_kl)
                mean_kl /= self.ctx.world_size
            if float(mean_kl) > stop_kl:
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                return True
        self._optimizer_step()
        return False

    def _agree(self, local_units: float, received: int | None):
        """One all-reduce per optimizer step: the global unit count and whether any rank got a stop signal."""
        if not self.ctx.ddp:
            return local_units, received
        t = torch.tensor([local_units, received == signal.SIGINT, received == signal.SIGTERM],
                         dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        units, got_int, got_term = t.tolist()
        agreed = received or (signal.SIGTERM if got_term else signal.SIGINT if got_int else None)
        return units, agreed

    def _stop(self, epoch: int, samples: int, signum: int) -> None:
        """Every rank got here at the same step boundary: save the resume point, leave the process group, exit."""
        if self.updates:
            self.save(epoch, samples)
            msg = f"stopped at step {self.opt_step}; resume with --from_resume 1 ({self.resume_path})"
        else:
            msg = "stopped before the first optimizer step of this run; nothing new to save"
        if self.ctx.ddp:
            dist.barrier()  # nobody exits (and makes torchrun kill the others) before rank 0 has saved
        self.wandb.finish()
        self._release()
        raise TrainingStopped(msg, EXIT_SIGNAL[signum])

    def _set_lr(self, samples_done: int) -> None:
        warmup = getattr(self.args, "warmup_iters", 0)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                if warmup and self.opt_step < warmup:
                    g["lr"] = g["initial_lr"] * (self.opt_step + 1) / warmup
                elif self.step_schedule:
                    g["lr"] = get_lr(self.opt_step, self.args.max_steps, g["initial_lr"])
                else:
                    g["lr"] = get_lr(samples_done, self.total_samples, g["initial_lr"])

    def _note_batch(self, batch) -> None:
        """Token counts of a micro-batch, read on the CPU copy (no device sync): tokens/s counts real (non-pad)
        tokens, so packed and padded runs compare by the work that trains the model."""
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self._batch_tokens = ids.numel() if isinstance(ids, torch.Tensor) else 0
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor):
            self._batch_tokens = int(mask.sum())
            self._real += self._batch_tokens
            self._numel += ids.numel()
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            # attention FLOPs grow with the row width the kernel computes over (model/flops.py)
            self._token_width += self._batch_tokens * ids.shape[1]

    # -- per-step
    def backward(self, loss: torch.Tensor, units=None, num_tokens: int | None = None, aux=None, **metrics) -> None:
        """Backward of one micro-batch.

        loss: this micro-batch's mean over `units` units (supervised tokens, valid pairs...). With units, the loop
            weights it by units x world / (units of the whole optimizer step over all micro-batches and ranks), so
            the step's gradient is the mean over every unit whatever the batch/accumulation/rank split. Without
            units (RL), the loss is averaged over the accumulation window as before.
        aux: a per-micro-batch term (the MoE balance loss), averaged over the window; logged as aux_loss.
        num_tokens: tokens processed, for tokens/s (default: the batch's real tokens, attention_mask.sum()).
        """
        self._backward_called = True
        if units is not None:
            if self._units_total is None:
                raise RuntimeError("TrainLoop.backward(units=...) needs batches count_units can count")
            total = loss * (units * (self.ctx.world_size / self._units_total))
        else:
            total = loss / self._window
        if aux is not None:
            total = total + aux / self._window
            metrics["aux_loss"] = aux
        self.scaler.scale(total).backward()
        self.log_metrics(loss=loss if aux is None else loss + aux.detach(), **metrics)
        self._tokens += int(num_tokens if num_tokens is not None else self._batch_tokens)

    def log_metrics(self, **metrics) -> None:
        """Add per-micro-step metrics (each averaged over the calls that gave it since the last log). Tensors stay
        on the device until the log step, so logging forces no GPU sync per step."""
        for k, v in metrics.items():
            if v is None:
                continue
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1

    def _optimizer_step(self) -> None:
        """Clip, check, step. The gradient norm is computed even without clipping: after DDP's all-reduce it is the
        same number on every rank, so a non-finite loss (whose gradient is non-finite too) or gradient is seen by
        all ranks alike without another collective; one host sync per optimizer step."""
        norms = {}
        for name, opt in self.optimizers.items():
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                continue
            norms[name] = grad_norm(params, self.args.grad_clip)
        for name, gn in norms.items():
            self._grad_norms[f"grad_norm_{name}" if name else "grad_norm"] = gn.detach()
        finite = bool(torch.isfinite(torch.stack([gn.float() for gn in norms.values()])).all()) if norms else True
        if finite or self.scaler.is_enabled():
            for opt in self.optimizers.values():
                self.scaler.step(opt)  # GradScaler skips a step whose fp16 gradients overflowed, by itself
            self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if finite:
            self.bad_in_a_row = 0
            self.updates += 1
            return
        if self.scaler.is_enabled():
            self.overflow_steps += 1
            if self.scaler.get_scale() >= 1.0:  # an ordinary fp16 overflow: the scaler backs off and retries
                return
        self.bad_steps += 1
        self.bad_in_a_row += 1
        step, lr = self.opt_step + 1, self._lr()
        Logger(f"WARNING: step {step}: non-finite loss or gradient norm (lr {lr:.3e}); update skipped "
               f"({self.bad_in_a_row} in a row, {self.bad_steps} in this run)")
        if self.bad_in_a_row >= self.args.max_bad_steps:
            if self._last_save:
                good = f"the last good checkpoint is {self._last_save[0]} (step {self._last_save[1]})"
            else:
                good = "this run saved nothing, so the files it started from are untouched"
            raise TrainingDiverged(
                f"training diverged: {self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"norm (last at step {step}, lr {lr:.3e}); nothing non-finite was written and {good}. Lower "
                "--learning_rate (or raise --warmup_iters, lower --grad_clip, check the data), then resume with "
                "--from_resume 1 or start over")

    def _lr(self) -> float:
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def _reset_log(self) -> None:
        self._sums, self._counts, self._tokens, self._grad_norms = {}, {}, 0, {}
        self._real, self._numel, self._token_width = 0, 0, 0

    def _log(self, samples_done: int, evals: dict | None = None, record: bool = True) -> None:
        """The progress line (rank 0), and with `record` a metrics row to wandb and the JSONL; the averages restart.
        Without `record` (the first step of a run between log steps) the line is only printed: the metrics keep one
        row per --log_interval steps."""
        keys = sorted(self._sums)
        local = [float(self._sums[k]) for k in keys] + [self._counts[k] for k in keys] + \
            [self._tokens, self._real, self._numel, self._token_width]
        if self.ctx.ddp:  # sums over ranks in one collective; every rank logs the same keys
            t = torch.tensor(local, dtype=torch.float64, device=self.ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            local = t.tolist()
        tokens, real, numel, token_width = local[-4:]
        n = len(keys)
        row = {k: v / max(c, 1) for k, v, c in zip(keys, local[:n], local[n:2 * n])}
        row.update({k: float(v) for k, v in self._grad_norms.items()})  # the last step's norm, not a mean
        now = time.time()
        eta_min = (now - self._t0) / max(self._steps_run, 1) * (self.total_steps - self.opt_step) / 60
        for name, opt in self.optimizers.items():
            row[f"lr_{name}" if name else "lr"] = opt.param_groups[0]["lr"]
        row.setdefault("lr", self._lr())
        if numel:
            row["real_tokens"] = real / numel
        row.update(evals or {})  # held-out metrics of this step (--eval_interval), already summed over ranks
        row.update(epoch=self.epoch + 1, global_step=self.opt_step, micro_step=self.global_step,
                   samples=samples_done, skipped_steps=self.bad_steps, empty_steps=self.empty_windows,
                   eta_min=eta_min, tokens_per_s=tokens / max(now - self._t_last, 1e-9),
                   train_s=now - self._t0 - self._eval_s)  # this process's training time, evaluations left out
        if self.flops is not None and tokens:
            flops = self.flops.per_token * tokens + self.flops.per_token_seq * token_width
            row["flops_per_token"] = flops / tokens
            row["tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12  # achieved, all ranks together
            if self.peak:
                row["mfu"] = row["tflops"] * 1e12 / (self.peak * self.ctx.world_size)
        if record:
            self._t_last = now
        if self.ctx.is_main:
            mem = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GB" if self.ctx.device.type == "cuda" else ""
            # per-layer values ("layers/...") go to wandb and the JSONL only
            shown = [k for k in sorted(evals or {}) if "/" not in k]
            parts = " ".join(f"{k} {row[k]:.4f}" for k in keys + sorted(self._grad_norms) + shown)
            real_part = f" | real {row['real_tokens']:.0%}" if numel else ""
            if "tflops" in row:
                real_part += f" | {row['tflops']:.3g} TFLOP/s" + (f" mfu {row['mfu']:.1%}" if "mfu" in row else "")
            bad = f" | skipped {self.bad_steps}" if self.bad_steps else ""
            print(f"Epoch [{self.epoch + 1}/{self.args.epochs}] step {self.opt_step}/{self.total_steps} | {parts} "
                  f"| lr {row['lr']:.3e} | {row['tokens_per_s']:.0f} tok/s{real_part}{bad} | ETA {eta_min:.1f}min"
                  f"{mem}", flush=True)
            if record:
                self.wandb.log(row, step=self.opt_step)
                self.metrics_file.write(row)
        if record:
            self._reset_log()

    def save(self, epoch: int, samples: int) -> None:
        """The resume file (fp32 + optimizer + data position) and the weights (fp16 + sidecar), rank 0 only (FSDP: every
        rank takes part in gathering the shards, rank 0 writes). Both describe the same optimizer step; both refuse
        non-finite weights. Each is written on its own, the resume file first: when one write fails (full disk, size
        limit, permissions) the other is still written, so a run whose weights cannot be written can still be
        resumed; the failure then ends the run with one line."""
        sharded = is_sharded(self.raw_model)  # FSDP: gathering the shards to rank 0 takes every rank
        if not (self.ctx.is_main or sharded) or self._saved_at == self.opt_step or self.updates == 0:
            return
        self._saved_at = self.opt_step
        m = unwrap(self.raw_model)
        states = gather_train_state(m, self.optimizers, self._modules())
        extras = {k: gather_module_state(v) if isinstance(v, torch.nn.Module) and is_sharded(v) else v
                  for k, v in self.resume_objects.items()}
        if not self.ctx.is_main:
            return
        was_training = m.training
        m.eval()
        failed, written = [], []
        extras = {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, **extras}
        try:
            lm_checkpoint(self.config, self.weight_name, model=m, states=states, epoch=epoch, step=self.step,
                          wandb=self.wandb, save_dir=self.args.checkpoint_dir, samples=samples,
                          global_step=self.global_step, opt_step=self.opt_step, weights_step=self.opt_step,
                          bad_steps=self.bad_steps, empty_windows=self.empty_windows,
                          data_order=self._epoch_order if samples else self.order, run_identity=self.identity,
                          schedule={"max_steps": self.args.max_steps, "epochs": self.args.epochs},
                          heldout=getattr(self.evaluate, "held_out", None), last_eval=self.last_eval, **extras)
            written.append(self.resume_path)
        except SaveError as e:
            failed.append(str(e))
        try:
            weights = states["model"] if sharded else self.weights_state(m)  # FSDP: the gathered full state
            save_weights(weights, self.weights_path, self.config, tokenizer=self.tokenizer,
                         stage=self.stage, weight=self.args.save_weight, epoch=epoch, step=self.opt_step,
                         global_step=self.opt_step, tokenizer_path=getattr(self.args, "tokenizer_path", None),
                         args=vars(self.args), **({"eval": self.last_eval} if self.last_eval else {}))
            written.append(self.weights_path)
        except SaveError as e:
            failed.append(str(e))
        m.train(was_training)
        if failed:
            raise SaveError(self._save_failure(failed, written))
        self._last_save = (self.resume_path, self.opt_step)

    def _save_failure(self, failed: list[str], written: list[str]) -> str:
        """One line: what could not be written and why, what was, and from where the run can go on."""
        done = f"wrote {' and '.join(written)} (step {self.opt_step})" if written else "nothing new was written"
        if self.resume_path in written:
            resume = f"resume with --from_resume 1 from step {self.opt_step}"
        elif self._last_save:
            resume = f"resume with --from_resume 1 from step {self._last_save[1]}"
        else:
            resume = "then start again (no resume file was written by this run)"
        return (f"{'; '.join(failed)}; {done}; the previous files are intact. Free disk space or pass a writable "
                f"--save_dir/--checkpoint_dir, then {resume}")

    def finish(self) -> None:
        if self.ctx.ddp and not is_sharded(self.raw_model):  # FSDP keeps no replicas to compare
            self.check_replicas_in_sync()
        Logger(f"done: {self.weights_path} (step {self.opt_step})")
        self.wandb.finish()
        self._release()

    def _release(self) -> None:
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
