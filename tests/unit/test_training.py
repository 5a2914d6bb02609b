"""The pieces the small models' training scripts share."""

from __future__ import annotations

import pytest
import torch

from freemask.shared.training import BestWeights, set_cosine_learning_rate


def test_cosine_learning_rate_decays_over_the_time_budget() -> None:
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    for elapsed, expected in ((0, 1.0), (50, 0.5), (100, 0.0), (150, 0.0)):
        set_cosine_learning_rate(optimiser, 2.0, elapsed, 100)
        assert optimiser.param_groups[0]["lr"] == pytest.approx(2 * expected)


@pytest.mark.parametrize(("higher_is_better", "scores", "kept_step"), [(True, (0.5, 0.9, 0.7), 2),
                                                                       (False, (5.0, 1.0, 3.0), 2)])
def test_the_best_weights_come_back_only_when_they_beat_the_final_ones(higher_is_better: bool, scores: tuple,
                                                                      kept_step: int) -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    best = BestWeights(higher_is_better)
    for step, score in enumerate(scores, start=1):
        net.weight.data.fill_(float(step))
        best.offer(net, step, score)
    assert best.step == kept_step and best.score == scores[kept_step - 1]
    net.weight.data.fill_(9.0)
    assert not best.restore_if_better(net, scores[kept_step - 1])  # a tie keeps the final weights
    assert float(net.weight.detach()) == 9.0
    assert best.restore_if_better(net, scores[0])
    assert float(net.weight.detach()) == float(kept_step)


def test_nothing_offered_restores_nothing() -> None:
    assert not BestWeights(True).restore_if_better(torch.nn.Linear(1, 1), 0.0)
