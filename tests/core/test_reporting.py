"""What the engine tells its user: which parameters keep a plain gradient and why, weight tying, and a
slow decomposition step, named once with the layers behind it and the settings that help."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dpkfac import KFACPreconditioner
from lightning_dpkfac.core import timing


class TinyLM(nn.Module):
    """Embedding, GRU, LayerNorm, a bare parameter and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.temperature = nn.Parameter(torch.ones(()))
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(self.proj(self.norm(hidden))) / self.temperature


def test_describe_names_every_parameter_left_plain_and_why() -> None:
    pre = KFACPreconditioner(TinyLM(), kl_clip=None)
    assert [l.name for l in pre.layers] == ["proj", "head"]
    assert set(pre.plain) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
                              "norm.weight", "norm.bias", "temperature"}
    assert "GRU is not a K-FAC layer type" in pre.plain["rnn.weight_ih_l0"]
    assert pre.plain["norm.weight"].startswith("LayerNorm is a normalisation layer: its scale and shift keep the plain")
    assert "bare nn.Parameter" in pre.plain["temperature"]
    text = pre.describe()
    assert "Plain gradient (not preconditioned):" in text
    assert "  norm " in text and "weight, bias: LayerNorm is a normalisation layer" in text


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.InstanceNorm2d(4, affine=True),
                                  nn.GroupNorm(2, 4), nn.LayerNorm([4, 3, 3]), nn.RMSNorm([4, 3, 3])],
                         ids=lambda m: type(m).__name__)
def test_every_normalisation_layer_keeps_its_plain_gradient_with_the_reason(norm: nn.Module) -> None:
    pre = KFACPreconditioner(nn.Sequential(nn.Conv2d(1, 4, 3), norm), kl_clip=None)
    assert [l.name for l in pre.layers] == ["0"]
    assert {name: reason.split(":")[0] for name, reason in pre.plain.items()} == {
        f"1.{p}": f"{type(norm).__name__} is a normalisation layer" for p, _ in norm.named_parameters()}


def test_describe_flags_a_head_tied_to_an_embedding() -> None:
    """The shared matrix is covered through the head; its gradient sums both uses."""
    text = KFACPreconditioner(TinyLM(), kl_clip=None).describe()
    (head,) = [line for line in text.splitlines() if line.strip().startswith("head ")]
    assert "weight tied with embed.weight" in head


def test_a_slow_first_decomposition_is_reported_once_with_its_largest_layers(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Thresholds lowered so that tiny layers count as large and slow."""
    monkeypatch.setattr(timing, "SLOW_DECOMPOSITION_S", 0.0)
    monkeypatch.setattr(timing, "LARGE_FACTOR", 30)
    model = nn.Sequential(nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 3))
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_steps=1, inv_update_steps=1)
    with caplog.at_level(logging.WARNING, logger="lightning_dpkfac"):
        for _ in range(3):
            F.cross_entropy(model(torch.randn(8, 40)), torch.randint(0, 3, (8,))).backward()
            pre.step()
    announced = [r.getMessage() for r in caplog.records if "decomposing factors of up to" in r.getMessage()]
    reported = [r.getMessage() for r in caplog.records if "decompositions took" in r.getMessage()]
    assert len(announced) == 1 and "A 41x41, G 20x20 (0)" in announced[0]
    assert len(reported) == 1
    # Ordered by measured time: on a busy machine the 21x21 inversion can take longer than the 41x41 one.
    assert "Largest: " in reported[0] and "0 (A 41x41, G 20x20)" in reported[0] and "max_factor_dim" in reported[0]
