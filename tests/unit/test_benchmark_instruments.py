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


def _stored_settings(recipe_name: str) -> dict:
    metadata = shipped_metadata(Recipe(recipe_name, {}, (), lambda: []))
    assert metadata is not None, f"instruments/{recipe_name}.safetensors is missing: run `make bench-instruments`"
    return metadata


@pytest.mark.parametrize("name", ["generator_judge", "attention_oracle"])
def test_each_shipped_instrument_is_what_today_s_code_and_world_train(name: str) -> None:
    metadata = _stored_settings(name)
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


def _toy_recipe(steps: int) -> Recipe:
    def sample() -> list[np.ndarray]:
        return [np.arange(6, dtype=np.uint8)]
    return Recipe("toy", {"steps": steps}, (_toy,), sample)


def test_a_current_file_is_loaded_and_any_change_of_recipe_trains_in_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(instruments, "INSTRUMENTS", tmp_path)
    trained = []

    def train(seed: int) -> nn.Module:
        trained.append(seed)
        return _toy(seed)

    model, source = obtain(_toy_recipe(1), lambda: _toy(99), lambda: train(0))
    assert source["source"] == "trained in this run" and "not there" in source["why"] and trained == [0]

    ship(_toy_recipe(1), lambda: train(1))
    model, source = obtain(_toy_recipe(1), lambda: _toy(99), lambda: train(2))
    assert source["source"] == "shipped" and source["fingerprint"] == _toy_recipe(1).fingerprint()
    assert trained == [0, 1] and not model.training
    assert torch.equal(model.weight, _toy(1).weight)  # the shipped weights, not the freshly built ones

    model, source = obtain(_toy_recipe(2), lambda: _toy(99), lambda: train(3))
    assert source["source"] == "trained in this run" and "another recipe" in source["why"]
    assert trained == [0, 1, 3] and torch.equal(model.weight, _toy(3).weight)
