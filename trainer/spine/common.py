"""Paths, the user-error type and rank-0 printing: the base every spine module builds on."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from util.errors import UserError  # noqa: E402,F401 (lives below model/ and trainer/; re-exported for the spine)



def root_path(p: str | os.PathLike) -> str:
    """Defaults are written relative to the repo root; resolve them there, never against the current directory."""
    p = Path(p)
    return str(p if p.is_absolute() else ROOT / p)


def user_path(p: str | os.PathLike | None) -> str | None:
    """Paths the user typed resolve against the current directory (as any CLI would)."""
    if p is None:
        return None
    try:
        return str(Path(p).expanduser().resolve())
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a symlink loop, 3.13 OSError(ELOOP)
        raise UserError(f"path {p} cannot be resolved ({e}): it is a symbolic link that points back to itself "
                        "(directly or through other links); point it at the real file") from None


def str2bool_int(v) -> int:
    if str(v).lower() in ("1", "true", "yes", "y"):
        return 1
    if str(v).lower() in ("0", "false", "no", "n"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {v!r}")




def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def Logger(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)
