"""The learning-rate schedule: warmup, then a cosine or warmup-stable-decay to the floor."""

import pytest

from fraglm.config import TrainConfig
from fraglm.training.schedule import lr_at


def test_warmup_rises_linearly_to_the_peak():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=100)
    assert [lr_at(step, cfg) for step in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_cosine_ends_at_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # half way: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # past max_steps (a longer resumed run)


def test_wsd_holds_then_decays_over_the_last_fraction():
    cfg = TrainConfig(
        lr=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.0, schedule="wsd",
        decay_fraction=0.2,
    )  # fmt: skip
    assert lr_at(50, cfg) == lr_at(80, cfg) == pytest.approx(1e-3)
    assert lr_at(90, cfg) == pytest.approx(0.5e-3)
    assert lr_at(100, cfg) == pytest.approx(0.0)
