"""Model shapes beyond a plain chain: shared layers, accumulated micro-batches, attention blocks, layers
unused on some steps, torch.compile. Float64, dense references written here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import identical_on_all_ranks
from lightning_dpkfac import KFACPreconditioner

B = 6


def rows_with_bias(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


class Siamese(nn.Module):
    """One Linear applied to both halves of the input: its weight is used twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(x[:, :4])) * torch.tanh(self.shared(x[:, 4:])))


def test_layer_used_twice_sums_g_over_uses_and_averages_a() -> None:
    torch.manual_seed(0)
    model = Siamese().double()
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=0.0)
    x, y = torch.randn(B, 8, dtype=torch.float64), torch.randint(0, 3, (B,))
    outs: list[torch.Tensor] = []
    handle = model.shared.register_forward_hook(lambda m, i, o: outs.append(o))
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    for o in outs:
        o.retain_grad()
    loss.backward()
    pre.step()
    a = torch.cat([rows_with_bias(x[:, :4]), rows_with_bias(x[:, 4:])])
    g1, g2 = (o.grad * B for o in outs)
    A_ref = a.T @ a / len(a)
    G_ref = (g1.T @ g1 + g2.T @ g2) / B  # per example, the sum over its two uses
    A, G = pre.factors("shared")
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(G, G_ref)


def test_accumulated_micro_batches_average_their_factors() -> None:
    """Two backward passes of losses scaled by 1/2 (Lightning's accumulation) give the mean of the two
    micro-batches' factors, as if each had been a step of its own."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    pre = KFACPreconditioner(layer, kl_clip=None, factor_decay=0.0)
    batches = [(torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))) for _ in range(2)]
    expected_A, expected_G = [], []
    for x, y in batches:
        out = layer(x)
        out.retain_grad()
        (F.cross_entropy(out, y) / 2).backward()
        g = out.grad * 2 * B  # undo the 1/2, then per example
        expected_A.append(rows_with_bias(x).T @ rows_with_bias(x) / B)
        expected_G.append(g.T @ g / B)
    pre.step()
    A, G = pre.factors("")
    torch.testing.assert_close(A, sum(expected_A) / 2)
    torch.testing.assert_close(G, sum(expected_G) / 2)


def test_compiled_model_gets_the_same_factors_and_gradients() -> None:
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
        pre = KFACPreconditioner(model, kl_clip=None)
        forward = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            model.zero_grad()
            x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
            F.cross_entropy(forward(x), y).backward()
            pre.step()
        results.append([*pre.factors("0"), *(p.grad.clone() for p in model.parameters())])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


class Branchy(nn.Module):
    """``extra`` is used on even steps only (needs DDP's find_unused_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.extra, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(torch.relu(self.extra(h)) if use_extra else h)


def _train_branchy(rank: int, world: int) -> bool:
    torch.manual_seed(0)
    model = Branchy()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    pre = KFACPreconditioner(model, lr=0.1, inv_update_steps=1)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        g = torch.Generator().manual_seed(10 * step + rank)
        opt.zero_grad()
        F.cross_entropy(ddp(torch.randn(6, 4, generator=g), step % 2 == 1), torch.randint(0, 3, (6,), generator=g)).backward()
        pre.step()
        opt.step()
    return identical_on_all_ranks(model) and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_layer_unused_on_some_steps_keeps_ranks_identical(ranks) -> None:
    assert ranks(_train_branchy, 2) == [True, True]
