"""The benchmarks' shipped instruments (tests/benchmarks/instruments.py): used only while current."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import instruments  # noqa: E402
from bench_attention_mask import oracle_recipe  # noqa: E402
from bench_generator import judge_recipe  # noqa: E402
from instruments import Recipe, obtain, ship, shipped_metadata  # noqa: E402


@pytest.mark.parametrize("name", ["generator_judge", "attention_oracle"])
def test_each_shipped_instrument_is_what_today_s_code_and_world_train(name: str) -> None:
    metadata = shipped_metadata(name)
    assert metadata is not None, f"instruments/{name}.safetensors is missing: run `make bench-instruments`"
    settings = json.loads(metadata["settings"])
    if name == "generator_judge":
        recipe = judge_recipe(settings["train_images"], settings["image_size"], settings["steps"], settings["seed"])
    else:
        recipe = oracle_recipe(settings["train_scenes"], settings["image_size"], settings["steps"])
    assert recipe.settings == settings
    assert recipe.fingerprint() == metadata["fingerprint"], (
        f"{name} no longer matches its recipe (code, settings or rendered world): run `make bench-instruments`")


def _toy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_a_current_file_is_loaded_and_any_change_of_recipe_trains_in_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(instruments, "INSTRUMENTS", tmp_path)
    trained = []

    def recipe(steps: int, training_seed: int) -> Recipe:
        """A toy instrument whose `steps` setting is its recipe; each training is told apart by its seed."""
        def train() -> nn.Module:
            trained.append(training_seed)
            return _toy(training_seed)
        return Recipe("toy", {"steps": steps}, (_toy,), lambda: [np.arange(6, dtype=np.uint8)],
                      build=lambda: _toy(99), train=train)

    model, source = obtain(recipe(1, 0))
    assert source["source"] == "trained in this run" and "not there" in source["why"] and trained == [0]

    ship(recipe(1, 1))
    assert [path.name for path in tmp_path.iterdir()] == ["toy.safetensors"]  # no partial file left beside it
    model, source = obtain(recipe(1, 2))
    assert source["source"] == "shipped" and source["fingerprint"] == recipe(1, 2).fingerprint()
    assert trained == [0, 1] and not model.training
    assert torch.equal(model.weight, _toy(1).weight)  # the shipped weights, not the freshly built ones

    model, source = obtain(recipe(2, 3))
    assert source["source"] == "trained in this run" and "another recipe" in source["why"]
    assert trained == [0, 1, 3] and torch.equal(model.weight, _toy(3).weight)
