"""The learning-rate schedule: linear warm-up, cosine decay over --decay-fraction of the rest, then a hold."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_core.errors import ConfigError  # noqa: E402
from qcsight_train import cli  # noqa: E402
from qcsight_train.config import TrainConfig  # noqa: E402
from qcsight_train.trainer import build_scheduler  # noqa: E402

STEPS_PER_EPOCH = 10


def _factors(**settings: float) -> list[float]:
    """The learning rate at every step of a 12-epoch run, as a fraction of the peak."""
    cfg = TrainConfig(data="d", output="o", epochs=12, lr=1.0, **settings)  # type: ignore[arg-type]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, STEPS_PER_EPOCH)
    factors = []
    for _ in range(cfg.epochs * STEPS_PER_EPOCH):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_the_default_warms_up_for_one_epoch_then_decays_to_the_last_step() -> None:
    factors = _factors()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear over 10 steps
    after = factors[10:]
    assert all(a >= b for a, b in itertools.pairwise(after))  # never rises again
    assert after[len(after) // 2] == pytest.approx(0.01 + 0.99 * 0.5, abs=0.02)  # half-way down at mid-run
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)  # the floor is reached only at the very end
    assert factors[-10] > 0.01 + 1e-3


def test_a_decay_fraction_ends_the_cosine_early_and_holds_the_floor() -> None:
    factors = _factors(decay_fraction=0.4, min_lr_ratio=0.1)
    decay = round(0.4 * 110)  # 44 of the 110 steps after warm-up
    assert factors[9] == pytest.approx(1.0)
    assert factors[10 + decay // 2] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # the cosine's mid-point
    assert factors[10 + decay - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 43 / 44)))
    assert factors[10 + decay:] == [pytest.approx(0.1)] * (110 - decay)  # then held, to the end
    # Up to the end of its decay it is the full-length schedule squeezed: no other shape changes.
    assert factors[:10] == _factors(min_lr_ratio=0.1)[:10]


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_a_decay_fraction_outside_0_to_1_is_refused_by_name(value: str) -> None:
    args = cli.get_args_parser().parse_args(["--data", "d", "--output", "o", "--decay-fraction", value])
    with pytest.raises(ConfigError) as caught:
        cli.resolve_config(args, {})
    assert caught.value.field == "decay_fraction"


def test_help_lists_the_decay_fraction_with_what_it_does() -> None:
    text = " ".join(cli.get_args_parser().format_help().split())
    assert "--decay-fraction" in text and "the rate then holds there to the end" in text
