"""--ema-epochs: the exponential moving average of the weights that validation scores and best.pt keeps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from torch import nn  # noqa: E402  (after the torch skip)

from qcsight_train.trainer import WeightAverage  # noqa: E402


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_the_average_follows_the_weights_with_the_decay_one_epoch_of_steps_gives() -> None:
    net = _net()
    average = WeightAverage(net, ema_epochs=1.0, steps_per_epoch=50)
    assert average.decay == pytest.approx(1 - 1 / 50)
    expected = net[0].weight.detach().clone()
    for step in range(1, 201):
        with torch.no_grad():
            net[0].weight.add_(0.01)  # a "training step"
        net.train()
        net(torch.randn(4, 3))  # moves BatchNorm's running statistics and batch count
        average.update()
        decay = min(1 - 1 / 50, (1 + step) / (10 + step))  # warmed up: 0.18 after one step, 0.98 from step 440
        expected = decay * expected + (1 - decay) * net[0].weight.detach()
    torch.testing.assert_close(average.model[0].weight, expected)
    # It lags the trained weights (which moved 2.0 in all) by about the horizon's worth of steps.
    lag = float((net[0].weight.detach() - average.model[0].weight).mean())
    assert 0.2 < lag < 0.6
    assert not torch.equal(average.model[1].running_mean, net[1].running_mean)  # averaged too
    assert int(average.model[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 200  # copied
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())


def test_a_restored_average_carries_on_as_if_never_stopped() -> None:
    net, twin = _net(), _net()
    first, second = WeightAverage(net, 0.5, 10), WeightAverage(twin, 0.5, 10)

    def train(steps: int, change: str, value: float, averages: tuple[WeightAverage, WeightAverage]) -> None:
        """The same steps on both nets (in-place `change` of the first layer's weight), each average updated."""
        for _ in range(steps):
            with torch.no_grad():
                for model in (net, twin):
                    getattr(model[0].weight, change)(value)
            for average in averages:
                average.update()

    train(7, "mul_", 0.9, (first, second))
    restored = WeightAverage(twin, 0.5, 10)
    restored.restore(second.state())
    train(5, "add_", 1.0, (first, restored))
    assert restored.updates == first.updates == 12
    torch.testing.assert_close(restored.model[0].weight, first.model[0].weight)
