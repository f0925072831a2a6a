"""``KFACPreconditioner.remove_hooks()`` detaches the engine from the model (plain PyTorch; the Lightning
strategy calls it in ``teardown``): no hook of its own stays on any module, and the model then runs
forward and backward as if K-FAC had never been there. Two real gloo ranks, so that the row-gathering
captures (``lightning_dpkfac.distributed.rows``) are installed too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac import KFACPreconditioner


def make_model() -> nn.Sequential:
    """A wide Linear (3 rows per rank gather, far fewer than its 32 x 33 gradient) and a narrow head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(3, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)


def _train_then_remove_hooks(rank: int, world: int) -> dict:
    """Two dpkfac steps with row gathering, then ``remove_hooks()`` and one more forward and backward of the
    plain model (no DDP: its gradient hook belongs to the wrapper, which a user drops with it)."""
    model = make_model()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, lr=0.1, gather_rows=True)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(ddp(batch(step, rank)[0]), batch(step, rank)[1]).backward()
        pre.step()
        opt.step()
    captured = {layer.name: pre.captures(layer.name) for layer in pre.layers}
    pre.remove_hooks()
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    before = pre.state_bytes()
    error = None
    try:
        F.cross_entropy(model(batch(2, rank)[0]), batch(2, rank)[1]).backward()
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = f"{type(e).__name__}: {e}"
    return {"captured": captured, "hooked": hooked, "error": error, "state_bytes": (before, pre.state_bytes()),
            "captures": {layer.name: pre.captures(layer.name) for layer in pre.layers}}


def test_remove_hooks_leaves_no_forward_hook_on_any_module(ranks) -> None:
    for rank, res in enumerate(ranks(_train_then_remove_hooks, 2)):
        # Before: factor captures on the owners, row captures of the wide layer on every rank.
        assert {kind for kinds in res["captured"].values() for kind in kinds} >= {"rows"}, res["captured"]
        assert any("factors" in kinds for kinds in res["captured"].values()), res["captured"]
        assert res["hooked"] == [], f"rank {rank}: forward hooks left on {res['hooked']}"


def test_after_remove_hooks_a_forward_and_backward_capture_nothing_and_raise_nothing(ranks) -> None:
    for rank, res in enumerate(ranks(_train_then_remove_hooks, 2)):
        before, after = res["state_bytes"]
        assert res["error"] is None, f"rank {rank}: {res['error']}"
        assert after == before, f"rank {rank}: K-FAC state grew from {before} to {after} bytes"
        assert all(kinds == frozenset() for kinds in res["captures"].values()), (rank, res["captures"])
