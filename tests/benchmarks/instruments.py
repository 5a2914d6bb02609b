"""The benchmarks' measuring instruments: small nets trained on rendered scenes, shipped beside the benchmarks.

The generator benchmark's judge and the attention-mask benchmark's oracle segmenter are trained from a
step count and a seed, so every training of one gives the same weights. Training them again cost
about five minutes of every `make bench` pass on 2 cores, so each ships as safetensors under
`instruments/`, and `make bench-instruments` retrains and rewrites them.

A shipped file is used only while it is what the benchmark would train now. Its metadata holds a
fingerprint of the recipe: the training settings, the source of the code that trains it (model
class, data, loop) and the first training inputs as the world renders them today. Change any of
these and the benchmark trains the instrument in its own run instead, and its results file says so
and why (`tests/unit/test_benchmark_instruments.py` fails until the files are rewritten). Either
way, the benchmark measures the instrument's own accuracy on held-out scenes in every run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from results_files import HERE, git_commit

INSTRUMENTS = HERE / "instruments"


@dataclass(frozen=True)
class Recipe:
    """How one instrument is trained: enough to tell whether a shipped file still is that instrument."""

    name: str  # the file's stem under instruments/
    settings: dict[str, Any]  # sizes, steps, seed: JSON values
    code: tuple[Any, ...]  # the functions and classes whose source shapes the weights
    sample: Callable[[], Sequence[np.ndarray]]  # the first training inputs, as rendered today
    build: Callable[[], nn.Module]  # the untrained net, to load the file into
    train: Callable[[], nn.Module]  # trains it from scratch with `settings`

    @property
    def path(self) -> Path:
        return instrument_path(self.name)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for obj in self.code:
            digest.update(inspect.getsource(obj).encode())
        for array in self.sample():
            digest.update(np.ascontiguousarray(array).tobytes())
        return "sha256-" + digest.hexdigest()[:16]


def instrument_path(name: str) -> Path:
    return INSTRUMENTS / f"{name}.safetensors"


def shipped_metadata(name: str) -> dict[str, str] | None:
    """The shipped file's metadata, or None where there is no file."""
    path = instrument_path(name)
    if not path.exists():
        return None
    with safe_open(path, "pt") as handle:
        return handle.metadata() or {}


def obtain(recipe: Recipe) -> tuple[nn.Module, dict[str, Any]]:
    """The instrument in eval mode, and where it came from: the shipped file when it is current, else trained now."""
    fingerprint = recipe.fingerprint()
    metadata = shipped_metadata(recipe.name)
    if metadata is None:
        reason = f"{recipe.path.name} is not there"
    elif metadata.get("fingerprint") != fingerprint:
        reason = (f"{recipe.path.name} was trained from another recipe ({metadata.get('fingerprint')}, "
                  f"now {fingerprint}); `make bench-instruments` rewrites it")
    else:
        model = recipe.build()
        model.load_state_dict(load_file(recipe.path))
        where = recipe.path.relative_to(HERE) if recipe.path.is_relative_to(HERE) else recipe.path
        return model.eval(), {"source": "shipped", "file": str(where), "fingerprint": fingerprint,
                              "head_when_trained": metadata.get("commit")}
    print(f"{recipe.name}: training it in this run, since {reason}", file=sys.stderr, flush=True)
    return recipe.train().eval(), {"source": "trained in this run", "why": reason, "fingerprint": fingerprint}


def ship(recipe: Recipe) -> Path:
    """Trains the instrument and writes it under instruments/ with its recipe's fingerprint."""
    started = time.perf_counter()
    model = recipe.train()
    INSTRUMENTS.mkdir(exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    # written beside it, then renamed: an interrupted write never leaves a half file under the shipped name
    partial = recipe.path.with_suffix(".partial")
    save_file(state, partial, metadata={
        "fingerprint": recipe.fingerprint(), "settings": json.dumps(recipe.settings, sort_keys=True),
        "commit": git_commit() or "unknown", "torch": torch.__version__,
        "train_seconds": f"{time.perf_counter() - started:.1f}"})
    os.replace(partial, recipe.path)
    return recipe.path
