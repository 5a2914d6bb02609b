"""Which torch device a service's `device` setting means."""

from __future__ import annotations

import torch

from freemask.shared.errors import InvalidInput


def resolve_device(device: str, setting: str) -> torch.device:
    """"auto" is CUDA when visible, else the CPU; an explicit "cuda" without CUDA is an error
    naming the setting, rather than a slow silent fall-back to the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"{setting} is 'cuda' but no CUDA device is visible")
    return torch.device(device)
