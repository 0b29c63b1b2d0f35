"""Reading the files this repo writes, with one readable line for each way they can be broken.

    side = read_sidecar("out/full_sft_512.pth")          # out/full_sft_512.json as a dict, or None
    sd = load_torch_file(path, "weight file", "re-run the stage that writes it")   # torch.load(weights_only=True)
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile

import torch

from util.errors import UserError


def load_torch_file(path: str, what: str, fix: str):
    """torch.load(weights_only=True) with one readable message for an empty, truncated or foreign file."""
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes), probably from a crash or a full disk during a save; "
                        f"{fix}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would print before our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, UnicodeDecodeError, OSError) as e:  # OSError: torch's zip reader on some truncations
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            # readable, but it asks to build Python objects (functions, classes) that no weights file holds
            found = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \d+)", str(e),
                              re.I)
            raise UserError(f"{what} {path} is not a weights file: it asks the loader to create Python objects "
                            f"({found.group(1) if found else 'not tensors'}), which could run code from the file, so "
                            f"it was not loaded. Use a file written by this repo's scripts; {fix}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} ({size} bytes) is not a readable PyTorch file: truncated or not a torch.save "
                        f"file ({first[:160]}); {fix}") from None


def sidecar_path(pth: str) -> str:
    return os.path.splitext(pth)[0] + ".json"


def read_sidecar(pth: str) -> dict | None:
    """The sidecar JSON beside a weights file, None when there is none; a corrupt one is a UserError."""
    p = sidecar_path(pth)
    if not os.path.exists(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            side = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sidecar {p} is not valid JSON ({e}); it describes {os.path.basename(pth)} (sizes, "
                        "tokenizer). Restore it from the run that wrote it, or delete it to use the weights without "
                        "it (sizes then come from your flags)") from None
    if not isinstance(side, dict):
        raise UserError(f"sidecar {p} holds a JSON {type(side).__name__}, not an object; restore or delete it")
    return side
