"""What keeps a long run from losing work: stop signals, non-finite checks, exit codes, start-up checks.

Exit codes of every training script (run_main maps the exceptions below to them):
    0    finished (or a resume that had nothing left to do)
    1    a mistake the user can fix: bad flag, unreadable file, bad data, unwritable or full disk
    2    unknown or malformed flag (argparse)
    3    training diverged: --max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm
    130  stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM: a resume checkpoint was saved first
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import re
import signal
import weakref

import torch

from trainer.spine.common import UserError

EXIT_USER, EXIT_DIVERGED = 1, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingStopped(Exception):
    """A stop signal was honoured at a step boundary (resume checkpoint saved); run_main exits with `code`."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


class TrainingDiverged(UserError):
    """Too many consecutive non-finite optimizer steps; nothing non-finite was written. Exit code 3."""


class SaveError(UserError):
    """A weights/resume/sidecar file could not be written (disk full, no permission). The previous file is intact."""


# ----------------------------------------------------------------------------------------------------------------
# Stop signals

class StopSignals:
    """SIGINT/SIGTERM -> a flag the loop reads at the next step boundary; a second signal stops at once.

    The flag only tells the loop to stop; all ranks agree on it through the loop's one all-reduce per optimizer
    step, so every rank stops after the same step and rank 0 saves a consistent resume file. The handler writes with
    os.write (print is not safe inside a signal handler that may interrupt another print).
    """

    def __init__(self, rank_prefix: str = ""):
        self.received: int | None = None
        self._prefix = rank_prefix
        self._previous = {}

    def install(self) -> None:
        for sig in EXIT_SIGNAL:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep the default behaviour
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: stop now, nothing saved
            self.restore()
            os.write(2, f"\n{self._prefix}{name} again: stopping now without saving\n".encode())
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_SIGNAL[signum])
        self.received = signum
        os.write(2, f"\n{self._prefix}{name} received: saving a resume checkpoint at the end of this optimizer step "
                    f"(send it again to stop at once, without saving)\n".encode())


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, but only the main process decides when to
    stop; a worker killed by it would break the batches still needed to reach the step boundary."""
    for sig in EXIT_SIGNAL:
        signal.signal(sig, signal.SIG_IGN)


_LOADERS = weakref.WeakSet()  # DataLoader iterators whose workers end_data_workers() must stop


def track_data_workers(batches):
    """Register a DataLoader iterator (returned as is) so that an error ends its worker processes."""
    if hasattr(batches, "_shutdown_workers"):
        _LOADERS.add(batches)
    return batches


def end_data_workers() -> None:
    """Stop every DataLoader worker of this process, now. Workers ignore SIGINT/SIGTERM (above), so one left alive
    when an error unwinds the run (its iterator still referenced by the traceback) blocks Python's exit forever:
    multiprocessing's exit hook SIGTERMs its daemonic children and then joins them. Tracked iterators are shut down
    the way DataLoader does it (a stop message, a join); whatever child is still alive after that is killed."""
    for batches in list(_LOADERS):
        batches._shutdown_workers()
    _LOADERS.clear()
    workers = [c for c in multiprocessing.active_children() if c.daemon]  # DataLoader workers are daemonic
    if not workers:
        return
    # the killed worker of an untracked loader would make torch's SIGCHLD handler raise "worker killed by signal"
    # in the middle of this cleanup (on the error path it serves): the default action while they are reaped
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in workers:
            child.kill()
            child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite values

def all_finite(tensors) -> bool:
    """True when every floating tensor (a state_dict's values, or any iterable of tensors) is finite."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    flags = [torch.isfinite(t).all() for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ----------------------------------------------------------------------------------------------------------------
# Start-up checks

def remove_stale_temps(paths) -> list[str]:
    """Delete `{path}.tmp*` left by a save that was killed mid-write (atomic_save's temp names)."""
    removed = []
    for path in paths:
        for tmp in glob.glob(glob.escape(path) + ".tmp*"):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed


def check_writable_dir(path: str, flag: str) -> None:
    """Fail at start-up, not at the first save hours later, when an output folder cannot be created or written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {path}: {e.strerror or e}; pass a writable folder") from None


def default_num_workers() -> int:
    """DataLoader workers per rank: the CPU cores this process may use, shared by the ranks on this machine (at most
    8); 0 (load in the main process) when that leaves a rank one core or less."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return 0 if per_rank <= 1 else min(per_rank, 8)


# ----------------------------------------------------------------------------------------------------------------
# Messages

_WORKER_WRAP = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def unwrap_worker_message(exc: BaseException) -> str:
    """The original message of an exception re-raised by a DataLoader worker. DataLoader rebuilds the exception
    with "Caught X in DataLoader worker process N. Original Traceback ...: <message>"; keep only <message>, so the
    user sees the same one line as with --num_workers 0."""
    msg = str(exc)
    if not _WORKER_WRAP.match(msg):
        return msg
    name = re.escape(type(exc).__name__)
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", msg, re.M))
    return msg[found[-1].end():].rstrip("\n") if found else msg
