"""The example data modules and networks: shapes, determinism, no downloads, what K-FAC covers."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dpkfac import KFACPreconditioner
from lightning_dpkfac.tools.data import MNIST1DDataModule
from lightning_dpkfac.tools.models import cifar_cnn, cnn1d, resnet18, resnet_small, transformer_classifier


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no network access allowed")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_mnist1d_is_generated_locally_without_network_or_files(
    no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = MNIST1DDataModule(batch_size=32)
    data.setup("fit")
    assert list(tmp_path.iterdir()) == []
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (3600, 400, 1000)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(data.train_set.tensors[1].tolist()) == set(range(10))


def test_mnist1d_is_the_same_on_every_call_and_leaves_global_rngs_alone() -> None:
    random.seed(1)
    np.random.seed(1)
    before = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    first, second = MNIST1DDataModule(), MNIST1DDataModule()
    first.setup()
    second.setup()
    assert (random.random(), np.random.rand()) == before
    for split in ("train_set", "val_set", "test_set"):
        tensors = zip(getattr(first, split).tensors, getattr(second, split).tensors)
        assert all(torch.equal(a, b) for a, b in tensors), split


@pytest.mark.parametrize(
    ("net", "input_shape"),
    [
        (cnn1d(), (4, 1, 40)),
        (resnet_small(), (4, 1, 8, 8)),
        (transformer_classifier(), (4, 1, 8, 8)),
        (transformer_classifier(seq_len=10, token_dim=4), (4, 1, 40)),
        (cifar_cnn(), (2, 3, 32, 32)),
        (resnet18(), (2, 3, 32, 32)),
    ],
    ids=["cnn1d-mnist1d", "resnet-digits", "transformer-digits", "transformer-mnist1d", "cifar-cnn", "resnet18"],
)
def test_each_network_maps_its_input_to_10_logits(net: nn.Module, input_shape: tuple[int, ...]) -> None:
    assert net(torch.randn(input_shape)).shape == (input_shape[0], 10)


def _preconditioned_after_one_step(net: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the layers whose factors K-FAC built in one training step."""
    pre = KFACPreconditioner(net, lr=0.1)
    nn.functional.cross_entropy(net(x), torch.arange(len(x)) % 10).backward()
    pre.step()
    return {layer.name for layer in pre.layers if pre.factors(layer.name) is not None}


def test_kfac_covers_every_conv_and_linear_of_cnn1d_and_resnet_small() -> None:
    for net, x in ((cnn1d(), torch.randn(4, 1, 40)), (resnet_small(), torch.randn(4, 1, 8, 8))):
        expected = {name for name, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
        assert _preconditioned_after_one_step(net, x) == expected


def test_kfac_covers_the_transformers_embedding_attention_feed_forward_and_head() -> None:
    net = transformer_classifier(num_layers=1)
    covered = _preconditioned_after_one_step(net, torch.randn(4, 1, 8, 8))
    assert covered == {"embed", "encoder.layers.0.self_attn.in_proj", "encoder.layers.0.self_attn.out_proj",
                       "encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"}


def test_the_cifar_shaped_models_have_the_wide_factors_they_are_meant_to_stress() -> None:
    """The CIFAR CNN's first Linear reads 4096 features (A 4097 x 4097); ResNet-18's last stage has 3x3
    convolutions over 512 channels (A 4608 x 4608, no bias), BatchNorm left plain."""
    cnn, resnet = (KFACPreconditioner(net(), lr=0.1, max_factor_dim=None) for net in (cifar_cnn, resnet18))
    assert max(layer.d_a for layer in cnn.layers) == 4097
    assert max(layer.d_a for layer in resnet.layers) == 4608 and len(resnet.layers) == 21
    assert any("BatchNorm2d" in reason for reason in resnet.plain.values())
