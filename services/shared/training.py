"""What the small models trained here share: a cosine schedule over a wall-clock
budget, keeping the weights of the best held-out check, and the command line.

Training on 2 CPU cores is bounded by time, not steps, so the schedule decays over
the time budget. Models trained from finite pools of rendered pairs can fit the
pools late in training at the cost of new pairs; the weights of the best held-out
check are kept instead of the last ones when they score better.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch


def set_cosine_learning_rate(optimiser: torch.optim.Optimizer, base: float, elapsed_s: float,
                             budget_s: float) -> None:
    """Cosine decay from `base` to 0 over the time budget."""
    for group in optimiser.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_s / budget_s)))


class BestWeights:
    """A copy of the weights at the best held-out score offered so far."""

    def __init__(self, higher_is_better: bool) -> None:
        self._better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
        self.score: float | None = None
        self.step = 0
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, net: torch.nn.Module, step: int, score: float) -> None:
        if self.score is None or self._better(score, self.score):
            self.score, self.step = score, step
            self._state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def restore_if_better(self, net: torch.nn.Module, final_score: float) -> bool:
        """Load the kept weights into `net` if they beat its final score; say whether they did."""
        if self._state is None or self.score is None or not self._better(self.score, final_score):
            return False
        net.load_state_dict(self._state)
        return True


def training_main(description: str, train: Callable[[Path, float, int], dict], default_minutes: float) -> None:
    """`--out DIR --minutes M --seed S --threads T`; prints the summary `train` returns as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=default_minutes)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(train(args.out, args.minutes, args.seed)))
