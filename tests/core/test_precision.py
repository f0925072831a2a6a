"""Precision: factors and decompositions stay float32 (float64 for float64 models) whatever the autocast
dtype; under a loss scaler G is built from unscaled gradients and an overflow step is not a fault."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dpkfac import KFACPreconditioner


def model_and_batch(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    return model, torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))


def test_bf16_autocast_keeps_float32_factors_close_to_the_float32_ones() -> None:
    results = {}
    for autocast in (False, True):
        model, x, y = model_and_batch()
        pre = KFACPreconditioner(model, kl_clip=None, method="eigen", factor_update_steps=1, inv_update_steps=10)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        results[autocast] = pre
    bf16 = results[True]
    for name in ("0", "2"):
        A, G = bf16.factors(name)
        assert A.dtype == G.dtype == bf16.layer_state(name).decomposition["qa"].dtype == torch.float32
        torch.testing.assert_close(A, results[False].factors(name)[0], rtol=2e-2, atol=2e-2)


def test_float64_model_keeps_float64_factors() -> None:
    model, x, y = model_and_batch(torch.float64)
    pre = KFACPreconditioner(model, kl_clip=None, method="eigen", factor_update_steps=1, inv_update_steps=10)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert all(f.dtype == torch.float64 for f in pre.factors("0"))


def test_loss_scaler_gradients_are_unscaled_before_g_is_built() -> None:
    factors = []
    for scale in (None, 2.0**12):
        model, x, y = model_and_batch()
        pre = KFACPreconditioner(model, kl_clip=None, method="eigen", factor_update_steps=1, inv_update_steps=10)
        loss = F.cross_entropy(model(x), y)
        if scale is not None:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            pre.set_loss_scale(scaler.get_scale)
            loss = scaler.scale(loss)
        loss.backward()
        pre.step()
        factors.append(pre.factors("2")[1])
    torch.testing.assert_close(factors[1], factors[0])


def test_overflow_step_under_a_loss_scaler_skips_the_factor_update_without_a_fault() -> None:
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pre = KFACPreconditioner(model, kl_clip=None, max_consecutive_faults=1)
    pre.set_loss_scale(scaler.get_scale)
    for poison in (False, True):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = pre.factors("2")
        before = None if before is None else before[1].clone()
        pre.step()
        scaler.step(opt)
        scaler.update()
    assert torch.equal(pre.factors("2")[1], before), "the overflowed G must not reach the running average"
    assert pre.faults.faults_total == 0 and scaler.get_scale() == 2.0**7  # the scaler saw the overflow and backed off
