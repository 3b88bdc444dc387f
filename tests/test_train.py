"""The continued-pretraining schedule: linear warm-up, then a cosine from lr to lr / 10."""

import pytest

from nemo_plrd.train import lr_factor


def test_warm_up_then_cosine_to_a_tenth():
    steps, warmup = 20, 4
    factors = [lr_factor(step, steps, warmup) for step in range(steps)]
    assert factors[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[warmup] == pytest.approx(1.0)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert lr_factor(steps, steps, warmup) == pytest.approx(0.1)
    assert lr_factor(0, 1, 0) == pytest.approx(1.0)  # one step, no warm-up: the full rate
