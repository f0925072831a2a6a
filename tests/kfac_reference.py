"""A dense K-FAC reference, written from the formulas and independent of the package under test.

Patches come from explicit slicing loops (not ``unfold``), inverses from ``torch.linalg`` on explicit
Kronecker products, all in float64:

    inverse method:  vec(P) = ((A + l I)^-1 kron (G + l I)^-1) vec(grad)
    eigen method:    vec(P) = (A kron G + l I)^-1 vec(grad)

with ``vec`` stacking columns, so ``vec(G X A) = (A kron G) vec(X)`` for symmetric A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Rows (examples x locations, d_a) of the layer input, with a ones column for a bias."""
    x = x.double()
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    elif isinstance(module, nn.Conv1d):
        rows = conv1d_patches_by_loops(module, x)
    else:
        assert isinstance(module, nn.Conv2d)
        rows = conv_patches_by_loops(module, x)
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    return rows


def conv_patches_by_loops(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(B * H_out * W_out, C * kh * kw) patches, gathered position by position from the padded input."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif conv.padding == "valid":
        pad = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode)
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(h_out):
            for j in range(w_out):
                patch = xp[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


def conv1d_patches_by_loops(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """(B * L_out, C * k) patches of a (B, C, L) input, gathered position by position."""
    (k,), (stride,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        total = d * (k - 1)
        pad = (total // 2, total - total // 2)
    elif conv.padding == "valid":
        pad = (0, 0)
    else:
        pad = (conv.padding[0], conv.padding[0])
    xp = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    l_out = (xp.shape[2] - d * (k - 1) - 1) // stride + 1
    return torch.stack(
        [xp[b, :, i * stride : i * stride + d * (k - 1) + 1 : d].reshape(-1) for b in range(x.shape[0]) for i in range(l_out)]
    )


def output_grad_rows(gy: Tensor, conv_1d: bool = False) -> Tensor:
    """Rows (examples x locations, d_g) of the output gradient (channels last)."""
    gy = gy.double()
    if gy.dim() == 4:
        gy = gy.permute(0, 2, 3, 1)
    elif gy.dim() == 3 and conv_1d:
        gy = gy.permute(0, 2, 1)
    return gy.reshape(-1, gy.shape[-1])


def batch_factors(module: nn.Module, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` = mean outer product of input rows; ``G`` = per-example sum of (B * g)(B * g)^T, averaged."""
    a = input_rows(module, x)
    g = output_grad_rows(gy, conv_1d=isinstance(module, nn.Conv1d)) * gy.shape[0]
    return a.T @ a / a.shape[0], g.T @ g / gy.shape[0]


def mean_gradients(
    build: Callable[[], nn.Module], model: nn.Module, names: list[str], batches: list[tuple[Tensor, Tensor]],
    loss_fn: Callable,
) -> dict[str, Tensor]:
    """Per layer name, [dW | db] of the mean of the batches' losses: what DDP's averaging should give."""
    ref = build().to(next(model.parameters()).dtype)
    ref.load_state_dict(model.state_dict())
    (sum(loss_fn(ref(x), y) for x, y in batches) / len(batches)).backward()
    modules = dict(ref.named_modules())
    return {n: grad_matrix(modules[n]) for n in names}


def grad_matrix(module: nn.Module) -> Tensor:
    """[dW | db] as a (d_g x d_a) float64 matrix."""
    m = module.weight.grad.double().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        m = torch.cat([m, module.bias.grad.double().reshape(-1, 1)], dim=1)
    return m


def vec(m: Tensor) -> Tensor:
    return m.T.reshape(-1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    return v.reshape(cols, rows).T


def precondition(A: Tensor, G: Tensor, grad: Tensor, damping: float, method: str) -> Tensor:
    """Dense preconditioned gradient from explicit Kronecker products."""
    n = A.shape[0] * G.shape[0]
    if method == "inverse":
        ia = torch.linalg.inv(A + damping * torch.eye(A.shape[0], dtype=A.dtype))
        ig = torch.linalg.inv(G + damping * torch.eye(G.shape[0], dtype=G.dtype))
        v = torch.kron(ia, ig) @ vec(grad)
    else:
        v = torch.linalg.solve(torch.kron(A, G) + damping * torch.eye(n, dtype=A.dtype), vec(grad))
    return unvec(v, grad.shape[0], grad.shape[1])


def capture(
    build: Callable[[], nn.Module], model: nn.Module, names: list[str], x: Tensor, y: Tensor, loss_fn: Callable
) -> dict[str, tuple[Tensor, Tensor]]:
    """Run forward/backward of a fresh ``build()`` holding ``model``'s weights, with every in-place op
    turned off, and return per layer name its input and the gradient of the loss w.r.t. its output."""
    ref = build().to(next(model.parameters()).dtype)
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    modules = dict(ref.named_modules())
    seen: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def fn(module, inputs, output):
            output.retain_grad()
            seen[name] = [inputs[0].detach(), output]

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    loss_fn(ref(x), y).backward()
    for h in handles:
        h.remove()
    return {n: (seen[n][0], seen[n][1].grad) for n in names}


def precondition_layers(
    frozen: dict[str, tuple[Tensor, Tensor]],
    grads: dict[str, Tensor],
    damping: float,
    method: str,
    kl_clip: float | None,
    lr: float,
) -> tuple[dict[str, Tensor], float]:
    """Preconditioned gradient of every layer from its (A, G), KL-clipped together at ``lr`` (the largest
    lr so far); returns (P, nu)."""
    out = {n: precondition(*frozen[n], g, damping, method) for n, g in grads.items()}
    nu = 1.0
    if kl_clip is not None:
        vg = sum((out[n] * grads[n]).sum() for n in grads) * lr**2
        nu = min(1.0, float(torch.sqrt(kl_clip / vg.abs())))
    return {n: p * nu for n, p in out.items()}, nu


@dataclass
class ReferenceKFAC:
    """Dense K-FAC of one stream of batches, mirroring the documented update rules."""

    damping: float
    factor_decay: float
    kl_clip: float | None
    lr: float
    factor_update_steps: int
    inv_update_steps: int
    method: str
    slots: dict[str, int] = field(default_factory=dict)  # layer -> its step in every decomposition interval
    lag: int = 0  # 1: a decomposition after step 0 takes effect at the next step (overlap_decompositions)
    steps: int = 0
    A: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    frozen: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # factors at each layer's last decomposition
    pending: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # decomposed, not yet in effect (lag)
    kl_scales: list[float] = field(default_factory=list)  # nu of every step

    def update(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        """One step's factor schedule: fold the batch factors in, refresh ``frozen``; advances the step."""
        self.frozen.update(self.pending)
        self.pending = {}
        if self.steps % self.factor_update_steps == 0:
            d = self.factor_decay
            for name, (a, g) in factors.items():
                self.A[name] = a if name not in self.A else d * self.A[name] + (1 - d) * a
                self.G[name] = g if name not in self.G else d * self.G[name] + (1 - d) * g
        for n in self.A:  # every layer at step 0, then each in its own slot of every interval
            if self.steps == 0 or self.steps % self.inv_update_steps == self.slots.get(n, 0):
                into = self.pending if self.lag and self.steps > 0 else self.frozen
                into[n] = (self.A[n].clone(), self.G[n].clone())
        self.steps += 1

    def precondition_all(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Preconditioned gradients of every layer with this stream's factors."""
        out, nu = precondition_layers(self.frozen, grads, self.damping, self.method, self.kl_clip, self.lr)
        self.kl_scales.append(nu)
        return out


def train_against_explicit(
    model: nn.Module,
    pre: Any,
    build_explicit: Callable[[nn.Module], nn.Module],
    names: dict[str, str],
    batches: Callable[[int], tuple[Tensor, Tensor]],
    got: Callable[[], dict[str, Tensor]],
    hp: dict[str, Any],
    steps: int = 4,
    rtol: float = 1e-6,
) -> None:
    """Train ``model`` with SGD and the engine ``pre`` for ``steps`` steps on ``batches(step)``, checking that every
    step's preconditioned gradients ``got()`` (engine layer name -> [dW | db]) equal this dense reference run on
    ``build_explicit(model)``, the same network written with explicit layers (``names``: engine layer name ->
    explicit module name), to a relative error below ``rtol``."""
    dense = ReferenceKFAC(slots={names[n]: s for n, s in pre.schedule().items()}, **hp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = batches(step)
        explicit = build_explicit(model)
        captured = capture(lambda: build_explicit(model), explicit, list(names.values()), x, y, F.cross_entropy)
        modules = dict(explicit.named_modules())
        dense.update({n: batch_factors(modules[n], *captured[n]) for n in names.values()})
        F.cross_entropy(explicit(x), y).backward()
        expected = dense.precondition_all({n: grad_matrix(modules[n]) for n in names.values()})
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        for n, value in got().items():
            err = float((value - expected[names[n]]).norm() / expected[names[n]].norm())
            assert err < rtol, f"step {step}, {n}: relative error {err:.2e}"
        opt.step()

