"""Where and how a run executes: distributed set-up/teardown, device, precision, seeding, model wrapping."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from trainer.spine.common import Logger, UserError
from trainer.spine.guards import (EXIT_DIVERGED, EXIT_SIGNAL, EXIT_USER, TrainingDiverged, TrainingStopped,
                                  end_data_workers, unwrap_worker_message)
from util.modules import unwrap  # noqa: F401 (re-exported)


def init_distributed_mode(device: str = "cpu", timeout_s: float | None = None) -> int:
    """Join the torchrun process group if launched by torchrun; NCCL on CUDA, gloo on CPU. Returns local rank."""
    if int(os.environ.get("RANK", -1)) == -1 or dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", 0))
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("MINIMIND_DIST_TIMEOUT", 1800)))
    # device_id binds the NCCL communicator to this rank's GPU (no "guessing device ID" warning, no barrier on the
    # wrong device)
    kw = dict(device_id=torch.device("cuda", local_rank)) if use_cuda else {}
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **kw)
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
    fsdp: bool = False  # --fsdp 1: wrap_model shards with FSDP2 instead of DDP

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


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX-BF16, per /proc/cpuinfo). There bf16
    autocast trained MiniMind 512x8 2.5x faster than fp32 at the same loss (docs/notes_spine.md); elsewhere bf16 is
    emulated and slower, so fp32 stays the default."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, or the default: bf16 on CUDA (fp16 without bf16 support), bf16 on CPUs with native bf16, else fp32.
    Autocast only: master weights, optimizer state and the losses' softmax stay fp32."""
    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
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
    if rank == 0:
        how = "--dtype" if getattr(args, "dtype", None) else "default"
        print(f"precision: {str(dtype).replace('torch.', '')} on {device} ({how}"
              + (", autocast over fp32 weights)" if dtype != torch.float32 else ")"), flush=True)
    if dtype != torch.float32 and device.type == "cuda" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fsdp = bool(getattr(args, "fsdp", 0))
    if fsdp and dtype == torch.float16:
        raise UserError("--fsdp 1 with --dtype float16 is not supported (fp16 needs a loss scaler that knows the "
                        "sharded gradients); use --dtype bfloat16 (the CUDA default) or --fsdp 0")
    return RunContext(device=device, rank=rank, local_rank=local_rank, world_size=world, dtype=dtype, fsdp=fsdp)


def run_main(main, interrupted: str = "interrupted: stopped at once; nothing was saved after the last checkpoint"
             ) -> None:
    """Run a script's main(); user mistakes, a diverged run and a requested stop each end with one readable line
    and their exit code (see spine/guards.py) instead of a traceback. `interrupted` is the line a Ctrl-C that
    reaches main() prints (training scripts handle the first Ctrl-C themselves; this is the second)."""
    from dataset.lm_dataset import DataFormatError
    rank = int(os.environ.get("RANK", 0))
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    try:
        try:
            main()
        except BaseException:
            end_data_workers()  # before any exit: a live worker would keep the process from ending
            raise
    except TrainingStopped as e:  # every rank stops at the same step; one message is enough
        if rank == 0:
            print(f"\n{e}", file=sys.stderr if e.code else sys.stdout, flush=True)
        sys.exit(e.code)
    except TrainingDiverged as e:
        if rank == 0:
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except (UserError, DataFormatError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        # a worker's exception arrives wrapped in its traceback text; show the same line as without workers
        _report_error(f"error: {unwrap_worker_message(e)}", rank, prefix)
        sys.exit(EXIT_USER)
    except RuntimeError as e:
        if not (dist.is_initialized() and _LOST_PEER.search(str(e))):  # not a lost peer: keep the traceback
            raise
        # this rank's collective failed because another rank ended (its error, the cause, is reported by it)
        _report_error(f"error: lost contact with the other processes ({_LOST_PEER.search(str(e)).group(0)}): "
                      "another rank failed or was stopped; its message is above, and in torchrun's summary below",
                      rank, prefix, always=True)
        sys.exit(EXIT_USER)
    except KeyboardInterrupt:
        print(f"\n{prefix}{interrupted}", file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGNAL[signal.SIGINT])



# gloo reports a peer that exited as a plain RuntimeError ("... Connection closed by peer ..."), NCCL as a DistError
_LOST_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
                        r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:abort|timeout)", re.I)


def _report_error(line: str, rank: int, prefix: str, always: bool = False) -> None:
    """One error line. Under torchrun every rank usually meets the same error (same flags, same data): rank 0
    prints it, and each failing rank also hands it to torchrun (TORCHELASTIC_ERROR_FILE), whose closing failure
    summary then shows it as the failure's "traceback" instead of a pointer to the docs: the message is the last
    thing the user reads, even when only another rank failed."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if rank == 0 or always or not error_file:
        print(f"\n{prefix}{line}", file=sys.stderr, flush=True)
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                # the layout torch's own @record writes; the summary shows py_callstack as the "traceback"
                json.dump({"message": {"message": f"{prefix}{line}", "extraInfo": {
                    "py_callstack": f"{prefix}{line}", "timestamp": str(int(time.time()))}}}, f)
        except OSError:  # the summary then points to the docs instead; the line was printed (rank 0) anyway
            pass


def reduce_mean(values: list[float], device) -> list[float]:
    """Average scalars over ranks (one collective) so logged metrics describe the whole batch, not rank 0's."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (--grad_checkpointing 1, bench_model.py --grad_checkpointing 1).
    transformers 5 calls it activation_checkpointing_enable; gradient_checkpointing_enable is its deprecated alias."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise UserError(f"--grad_checkpointing 1: {type(model).__name__} has no gradient_checkpointing_enable()")
    try:
        enable()
    except ValueError as e:
        raise UserError(f"--grad_checkpointing 1 is not supported by this model ({e}); pass 0") from None


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a module sharded by wrap_model's FSDP2 path (its state_dict holds DTensor shards)."""
    return isinstance(unwrap(model), FSDPModule)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: the items of every ModuleList named `layers` (the decoder layers of
    MiniMindForCausalLM and of any trunk built from its `model`, e.g. PPO's critic)."""
    return [layer for name, mod in model.named_modules() if name.split(".")[-1] == "layers"
            and isinstance(mod, torch.nn.ModuleList) for layer in mod]


def shard_model(model: torch.nn.Module, ctx: RunContext, optimizers=()) -> torch.nn.Module:
    """FSDP2 (--fsdp 1): every decoder layer is one fully_shard unit (all-gathered for its forward and backward,
    freed after), the root holds the rest (embedding tied with lm_head, final norm). Parameters, gradients and
    AdamW state then live 1/world_size per rank. On CUDA with bf16 the layers compute in bf16 and reduce gradients
    in fp32 (MixedPrecisionPolicy); on CPU they stay fp32 (autocast as without FSDP).

    fully_shard replaces every parameter by a DTensor shard: optimizers built before are re-pointed to the new
    parameters. Each rank shards its own tensors, so rank 0's are broadcast first, as DDP does (ranks seed
    differently; --from_weight none would otherwise shard different inits)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)
    names = {id(p): n for n, p in model.named_parameters()}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if ctx.device.type == "cuda" and ctx.dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    new = dict(model.named_parameters())
    for opt in optimizers:
        for g in opt.param_groups:
            for i, p in enumerate(g["params"]):
                if id(p) not in names:
                    continue
                shard = g["params"][i] = new[names[id(p)]]
                # state restored before sharding (a module wrapped after the resume file was read, e.g. PPO's
                # critic): the same full tensors on every rank, cut into this rank's shard
                if p in opt.state:
                    opt.state[shard] = {k: distribute_tensor(v, shard.device_mesh, shard.placements)
                                        if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                                        for k, v in opt.state.pop(p).items()}
    return model


def wrap_model(model: torch.nn.Module, ctx: RunContext, compile: bool = False, optimizers=()) -> torch.nn.Module:
    """FSDP2 (ctx.fsdp, see shard_model) or DDP, then torch.compile (optional). DDP: no buffers need syncing (RoPE
    tables are deterministic), so forward_sync_buffers=False (the reference re-broadcast 2x8 MB of RoPE tables every
    forward; torch 2.13 deprecates the old name broadcast_buffers with a FutureWarning per rank). DDP is applied to the compiled module, FSDP before compiling (fully_shard changes the module itself).
    `optimizers`: those over model's parameters (FSDP re-points them to the shards)."""
    if ctx.fsdp:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise UserError(f"--fsdp 1 is for stages that train the whole model; this one freezes {len(frozen)} "
                            f"tensors (e.g. {frozen[0]}): LoRA's few trainable parameters gain nothing from "
                            "sharding, so it stays on DDP; pass --fsdp 0")
        if dist.is_initialized():
            model = shard_model(model, ctx, optimizers)
            return torch.compile(model) if compile else model
        Logger("NOTE: --fsdp 1 without torchrun: one process has nothing to shard; training the plain model")
    if compile:
        model = torch.compile(model)
    if ctx.ddp:
        model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                        forward_sync_buffers=False)
    return model


def no_sync(model: torch.nn.Module):
    """Context for an accumulation micro-step: no gradient reduction (DDP no_sync, FSDP2
    set_requires_gradient_sync(False)); the window's last micro-step reduces everything at once."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    inner = unwrap(model)
    if isinstance(inner, FSDPModule):
        @contextlib.contextmanager
        def off():
            inner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                inner.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """Total gradient norm over params (clipped to max_norm when > 0), a plain tensor on every rank: under FSDP the
    grads are DTensor shards and the norm comes back as a replicated DTensor."""
    if max_norm > 0:
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        gn = torch.nn.utils.get_total_norm([p.grad for p in params])
    return gn.full_tensor() if isinstance(gn, DTensor) else gn
