"""On one process, preconditioned gradients equal the dense reference for every supported layer variant
(Linear, Conv1d, Conv2d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_reference as ref
from lightning_dpkfac import KFACPreconditioner

BATCH = 6


class SwapLastDims(nn.Module):
    """(B, C, T) -> (B, T, C) as a non-contiguous view, so the next Linear sees a strided input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def _conv_model(conv: nn.Conv2d) -> nn.Sequential:
    with torch.no_grad():
        flat = conv(torch.zeros(1, 2, 6, 5)).numel()
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(flat, 3))


def _conv1d_model(conv: nn.Conv1d) -> nn.Sequential:
    with torch.no_grad():
        flat = conv(torch.zeros(1, 2, 9)).numel()
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(flat, 3))


VARIANTS = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)), (5,)),
    "linear_no_bias": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "linear_3d_input": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 3)),
        (3, 5),
    ),
    "linear_non_contiguous_input": (
        lambda: nn.Sequential(SwapLastDims(), nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)),
        (5, 3),
    ),
    "conv_stride_padding": (lambda: _conv_model(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 6, 5)),
    "conv_same_even_kernel_dilated": (
        lambda: _conv_model(nn.Conv2d(2, 3, (2, 3), padding="same", dilation=2)),
        (2, 6, 5),
    ),
    "conv_valid_non_square": (lambda: _conv_model(nn.Conv2d(2, 3, (3, 2), padding="valid")), (2, 6, 5)),
    "conv_tuple_stride_padding_dilation": (
        lambda: _conv_model(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
        (2, 6, 5),
    ),
    "conv_reflect_padding_no_bias": (
        lambda: _conv_model(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False)),
        (2, 6, 5),
    ),
    # The second convolution's input is an activation whose patches outnumber it: its A is formed in step()
    # (factors.DeferredFactor). The second Linear's input is an activation with more rows than columns, whose
    # rows are the input itself: its A is formed in the forward pass.
    "conv_after_conv_inplace_relu": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 3, stride=2, padding=1),
                              nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)),
        (2, 6, 5),
    ),
    "linear_3d_after_linear": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2), nn.ReLU(inplace=True), nn.Flatten(),
                              nn.Linear(6, 3)),
        (3, 5),
    ),
    "conv1d_same_even_kernel_dilated": (
        lambda: _conv1d_model(nn.Conv1d(2, 3, 4, padding="same", dilation=2)),
        (2, 9),
    ),
    "conv1d_stride_reflect_padding": (
        lambda: _conv1d_model(nn.Conv1d(2, 3, 3, stride=2, padding=2, padding_mode="reflect")),
        (2, 9),
    ),
}


def run_against_reference(
    variant: str,
    method: str,
    kl_clip: float | None,
    steps: int,
    factor_update_steps: int,
    inv_update_steps: int,
    dtype: torch.dtype = torch.float64,
    rtol: float = 1e-9,
) -> ref.ReferenceKFAC:
    """Train a few SGD steps with the engine, checking every step's gradients against the reference.

    In float64 the engine keeps float64 factors, so the check is exact up to round-off; float32 factors
    of these ill-conditioned tiny layers agree to about 1e-4.
    """
    torch.manual_seed(0)
    build, in_shape = VARIANTS[variant]
    model = build().to(dtype)
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=kl_clip, lr=0.1,
              factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps, method=method)
    pre = KFACPreconditioner(model, **hp)
    names = [layer.name for layer in pre.layers]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], (nn.Linear, nn.Conv1d, nn.Conv2d)) for n in names)
    assert len(names) == sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())
    dense = ref.ReferenceKFAC(slots=pre.schedule(), **hp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = torch.randn(BATCH, *in_shape, dtype=dtype), torch.randint(0, 3, (BATCH,))
        captured = ref.capture(build, model, names, x, y, F.cross_entropy)
        dense.update({n: ref.batch_factors(modules[n], *captured[n]) for n in names})
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {n: ref.grad_matrix(modules[n]) for n in names}
        expected = dense.precondition_all(grads)
        pre.step()
        for n in names:
            got = ref.grad_matrix(modules[n])
            err = (got - expected[n]).norm() / expected[n].norm()
            assert err < rtol, f"step {step}, layer {n}: relative error {err:.2e}"
        opt.step()
    return dense


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dense_reference_without_kl_clip(variant: str, method: str) -> None:
    run_against_reference(variant, method, kl_clip=None, steps=4, factor_update_steps=1, inv_update_steps=2)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dense_reference_with_kl_clip(variant: str, method: str) -> None:
    # kl_clip this small makes the clip bind (nu < 1), so the scale itself is checked.
    dense = run_against_reference(variant, method, kl_clip=1e-6, steps=3, factor_update_steps=1, inv_update_steps=1)
    assert min(dense.kl_scales) < 1


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_update_intervals_and_decay_follow_the_schedule(method: str) -> None:
    run_against_reference("conv_stride_padding", method, kl_clip=1e-3, steps=9,
                          factor_update_steps=2, inv_update_steps=4)


def test_kl_clip_bounds_the_step_at_the_peak_lr_so_a_decaying_lr_still_shrinks_a_clipped_step() -> None:
    """The clip's lr is the largest lr so far: nu = min(1, sqrt(kl_clip / (peak_lr^2 sum(P * grad)))). With
    the same batch and weights every step (so P is fixed), halving the lr halves the step ``lr * nu * P``
    while the clip binds, and a new peak tightens nu."""
    torch.manual_seed(4)
    build, in_shape = VARIANTS["linear"]
    model = build().double()
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=1e-6, factor_update_steps=1, inv_update_steps=1,
              method="inverse")
    pre = KFACPreconditioner(model, **hp)
    names = [layer.name for layer in pre.layers]
    modules = dict(model.named_modules())
    dense = ref.ReferenceKFAC(slots=pre.schedule(), lr=0.0, **hp)
    x, y = torch.randn(BATCH, *in_shape, dtype=torch.float64), torch.randint(0, 3, (BATCH,))
    captured = ref.capture(build, model, names, x, y, F.cross_entropy)
    steps = []
    for lr, peak in [(0.1, 0.1), (0.05, 0.1), (0.025, 0.1), (0.2, 0.2)]:
        dense.update({n: ref.batch_factors(modules[n], *captured[n]) for n in names})
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dense.lr = peak
        expected = dense.precondition_all({n: ref.grad_matrix(modules[n]) for n in names})
        pre.step(lr=lr)
        for n in names:
            torch.testing.assert_close(ref.grad_matrix(modules[n]), expected[n], rtol=1e-9, atol=0)
        assert pre.kl_scale == pytest.approx(dense.kl_scales[-1], rel=1e-12) and pre.kl_scale < 1
        steps.append(lr * torch.cat([ref.grad_matrix(modules[n]).flatten() for n in names]))
    assert pre.kl_peak_lr == 0.2
    torch.testing.assert_close(steps[1], steps[0] / 2)
    torch.testing.assert_close(steps[2], steps[0] / 4)
    torch.testing.assert_close(steps[3], steps[0])  # twice the lr, half the nu


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_float32_model_keeps_float32_factors_close_to_reference(method: str) -> None:
    run_against_reference("linear", method, kl_clip=1e-3, steps=3, factor_update_steps=1, inv_update_steps=1,
                          dtype=torch.float32, rtol=1e-4)


def test_factors_equal_explicit_sums_over_examples_and_locations() -> None:
    """A and G of a conv layer after one step are the batch factors written out as sums."""
    torch.manual_seed(1)
    def build() -> nn.Sequential:
        return _conv_model(nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1))

    model = build()
    conv = model[0]
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=0.5)
    x, y = torch.randn(BATCH, 2, 6, 5), torch.randint(0, 3, (BATCH,))
    captured = ref.capture(build, model, ["0"], x, y, F.cross_entropy)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    A, G = pre.factors("0")
    inp, gy = captured["0"]
    patches = ref.conv_patches_by_loops(conv, inp.double())
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    A_sum = sum(torch.outer(r, r) for r in a) / len(a)
    per_example = [sum(torch.outer(v, v) for v in (gy[b].double() * BATCH).reshape(3, -1).T) for b in range(BATCH)]
    G_sum = sum(per_example) / BATCH
    torch.testing.assert_close(A.double(), A_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(G.double(), G_sum, rtol=1e-5, atol=1e-6)


def test_single_example_linear_factors_give_the_exact_fisher_block() -> None:
    """With one example, A kron G is the outer product of the per-example gradient: K-FAC is exact."""
    torch.manual_seed(2)
    layer = nn.Linear(4, 3)
    pre = KFACPreconditioner(layer, kl_clip=None)
    x = torch.randn(1, 4)
    F.cross_entropy(layer(x), torch.tensor([1])).backward()
    grad = ref.grad_matrix(layer)
    pre.step()
    A, G = (f.double() for f in pre.factors(""))
    torch.testing.assert_close(torch.kron(A, G), torch.outer(ref.vec(grad), ref.vec(grad)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_shape", [(5,), (2, 5)], ids=["2d_input", "3d_input"])
def test_layer_followed_by_inplace_relu_sees_pre_activation_gradient(in_shape: tuple[int, ...]) -> None:
    """The G captured for a Linear followed by ReLU(inplace=True) equals the one without in-place ops
    (on N-D input the Linear's output is a view, whose hooks an in-place op would drop)."""
    torch.manual_seed(3)
    positions = in_shape[0] if len(in_shape) == 2 else 1

    def build() -> nn.Sequential:
        return nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * positions, 3))

    model = build()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = torch.randn(BATCH, *in_shape), torch.randint(0, 3, (BATCH,))
    captured = ref.capture(build, model, ["0"], x, y, F.cross_entropy)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    _, G = pre.factors("0")
    torch.testing.assert_close(G.double(), ref.batch_factors(model[0], *captured["0"])[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("variant", "in_forward", "in_step"), [
    # conv "2" reads an activation whose patches outnumber it; the Linear's 6 rows are fewer than its 27
    # columns (copied, never formed); conv "0" reads the model's input, which a data loader may overwrite.
    ("conv_after_conv_inplace_relu", ["0"], ["2"]),
    # Linear "2" has 18 rows of 4 columns, the input itself: holding it would save no temporary.
    ("linear_3d_after_linear", ["0", "2"], []),
])
def test_a_convolutions_factor_of_an_activation_is_formed_in_step_the_others_in_forward(
        variant: str, in_forward: list[str], in_step: list[str]) -> None:
    make_model, in_shape = VARIANTS[variant]
    model = make_model()
    pre = KFACPreconditioner(model, kl_clip=None)
    formed: list[str] = []
    for layer in pre.layers:
        build = layer.a_factor
        layer.a_factor = lambda x, dtype, build=build, name=layer.name: formed.append(name) or build(x, dtype)
    x, y = torch.randn(BATCH, *in_shape), torch.randint(0, 3, (BATCH,))
    F.cross_entropy(model(x), y).backward()
    assert formed == in_forward
    pre.step()
    assert formed == in_forward + in_step


def test_each_step_decomposes_only_the_layers_of_its_slot() -> None:
    """Four equal layers decomposed every 4 steps: all at step 0, then one per step, in its slot."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    pre = KFACPreconditioner(model, kl_clip=None, method="eigen", factor_update_steps=1, inv_update_steps=4)
    slots = pre.schedule()
    assert sorted(slots.values()) == [0, 1, 2, 3]
    before: dict[str, torch.Tensor] = {}
    for step in range(9):
        model.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        pre.step()
        now = {name: pre.layer_state(name).decomposition["qa"] for name in slots}
        renewed = {name for name in slots if name not in before or not torch.equal(now[name], before[name])}
        assert renewed == ({*slots} if step == 0 else {n for n, slot in slots.items() if slot == step % 4}), step
        before = now
