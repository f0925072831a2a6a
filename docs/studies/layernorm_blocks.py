"""Study (issue 16, item 3): does K-FAC for LayerNorm's scale and shift pay off on the character LM?

    python docs/studies/layernorm_blocks.py --seeds 0 1 2 --out /tmp/layernorm.json
    python docs/studies/layernorm_blocks.py --seeds 0 1 2 --optimizers adamw --block-damping 1e-3

A prototype, not library code. Per seed, on 2 gloo ranks, side by side from the same weights and data (the
benchmark's ``charlm`` task: ``CharTransformer``, batch 64 per rank, 6 epochs), dpkfac under AdamW (lr 3e-3) and
under SGD with momentum (lr 0.1), each as the library does it (the LayerNorms keep their plain gradient) and
with one *full scale-and-shift block* per LayerNorm (kfac-jax's ``ScaleAndShiftFull``): with ``p_i`` the
gradient of example ``i``'s loss w.r.t. the LayerNorm's ``[weight, bias]`` (2d numbers),

    F = mean_i p_i p_i^T,  all-reduced over ranks, averaged with ``factor_decay`` every ``factor_update_steps``,
    grad <- (F + damping I)^-1 grad,  inverted every ``inv_update_steps``,

with the library's default settings for all four. The per-example gradient uses the engine's convention
(``core/layers.py``): example ``i``'s loss is its mean over its T characters, so ``p_i`` is B times example
``i``'s part of the batch-mean gradient.

Recorded per seed: validation bits per character against training seconds (every 10 steps), the time to
2.1 bits, and the largest eigenvalue of each block's ``F`` against the damping at every inversion: where it
is far below the damping, ``(F + damping I)^-1`` is nearly ``I / damping``, a constant rescaling that AdamW
undoes and that for SGD is only a larger learning rate for those parameters.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpkfac.core.config import KFACConfig
from lightning_dpkfac.tools.bench import TASKS, Contender, _epochs, _eval_batches, _evaluate, _train_loader
from lightning_dpkfac.tools.ranks import run_ranks

TARGET_BPC = 2.1
EVAL_EVERY = 10
LRS = {"adamw": 3e-3, "sgd": 0.1}


class ScaleShiftBlocks:
    """One full Fisher block over ``[weight, bias]`` of every ``nn.LayerNorm`` (last-dimension norms) of ``model``."""

    def __init__(self, model: nn.Module, config: KFACConfig) -> None:
        self.config, self.steps = config, 0  # config.damping: the blocks' damping
        self.norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        self.inputs: dict[nn.Module, Tensor] = {}
        self.output_grads: dict[nn.Module, Tensor] = {}
        self.fisher: dict[nn.Module, Tensor] = {}
        self.inverse: dict[nn.Module, Tensor] = {}
        self.top_eigenvalues: list[float] = []  # every block at every inversion
        for m in self.norms:
            m.register_forward_hook(self._save_input)
            m.register_full_backward_hook(self._save_output_grad)

    def _save_input(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training:
            self.inputs[module] = inputs[0].detach()

    def _save_output_grad(self, module: nn.Module, grad_input: Any, grad_output: tuple[Tensor, ...]) -> None:
        self.output_grads[module] = grad_output[0].detach()

    def _per_example_grads(self, m: nn.LayerNorm) -> Tensor:
        """(B, 2d): per example, B x its part of the gradient w.r.t. [weight, bias]."""
        x, gy = self.inputs[m], self.output_grads[m]
        batch, d = x.shape[0], x.shape[-1]
        x_hat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return batch * torch.cat([(gy * x_hat).reshape(batch, -1, d).sum(1), gy.reshape(batch, -1, d).sum(1)], 1)

    def step(self) -> None:
        """Update the blocks' Fisher and inverses on schedule; precondition the LayerNorms' gradients."""
        c = self.config
        for m in self.norms:
            if self.steps % c.factor_update_steps == 0:
                p = self._per_example_grads(m)
                batch_fisher = p.T @ p / p.shape[0]
                dist.all_reduce(batch_fisher)
                batch_fisher /= dist.get_world_size()
                old = self.fisher.get(m)
                self.fisher[m] = (batch_fisher if old is None
                                  else c.factor_decay * old + (1 - c.factor_decay) * batch_fisher)
            if self.steps % c.inv_update_steps == 0:
                fisher = self.fisher[m]
                self.top_eigenvalues.append(float(torch.linalg.eigvalsh(fisher)[-1]))
                self.inverse[m] = torch.linalg.inv(fisher + c.damping * torch.eye(len(fisher)))
            grad = torch.cat([m.weight.grad, m.bias.grad])
            new = self.inverse[m] @ grad
            m.weight.grad.copy_(new[: len(m.weight)])
            m.bias.grad.copy_(new[len(m.weight):])
        self.steps += 1


def worker(rank: int, world_size: int, seed: int, epochs: int, max_steps: int | None, optimizers: list[str],
           block_damping: float | None) -> dict[str, Any]:
    task = TASKS["charlm"]
    config = KFACConfig()
    data = task.make_data(64, seed)
    data.setup()
    loader = _train_loader(data, 64, world_size, rank, seed)
    held_out = _eval_batches(data, "val")
    runs: dict[str, tuple[Contender, ScaleShiftBlocks | None]] = {}
    for optimizer, blocks in itertools.product(optimizers, (False, True)):
        c = Contender("dpkfac", optimizer, task.make_net, config, LRS[optimizer], seed, torch.device("cpu"))
        extra = None
        if blocks:
            damped = config if block_damping is None else config.replace(damping=block_damping)
            extra = ScaleShiftBlocks(c.model, damped)
            plain_step = c.opt.step
            c.opt.step = lambda extra=extra, plain_step=plain_step: (extra.step(), plain_step())[1]
        runs[f"dpkfac+{optimizer}" + ("+layernorm" if blocks else "")] = (c, extra)
    train_s = dict.fromkeys(runs, 0.0)
    curves: dict[str, list[list[float]]] = {name: [] for name in runs}
    for step, (i, x, y) in enumerate(itertools.islice(_epochs(loader, epochs), max_steps), 1):
        names = list(runs)
        for name in names[step % len(names):] + names[: step % len(names)]:
            train_s[name] += runs[name][0].step(x, y)["step"]
        if step % EVAL_EVERY == 0 or step == max_steps:
            for name, (c, _) in runs.items():
                curves[name].append([step / len(loader), train_s[name], _evaluate(c.model, held_out, "bpc")])
    return {"curves": curves,
            "top_eigenvalues": {name: extra.top_eigenvalues for name, (_, extra) in runs.items() if extra}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=TASKS["charlm"].epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("layernorm_blocks.json"))
    p.add_argument("--optimizers", nargs="+", choices=list(LRS), default=list(LRS))
    p.add_argument("--block-damping", type=float, default=None,
                   help="the LayerNorm blocks' damping; None: the library default (the other layers keep it)")
    args = p.parse_args()
    results = []
    for seed in args.seeds:
        result = run_ranks(worker, 2, seed, args.epochs, args.max_steps, args.optimizers, args.block_damping,
                           timeout=3600.0)[0]
        results.append({"seed": seed, **result})
        args.out.write_text(json.dumps(results))
        for name, curve in result["curves"].items():
            hit = next((point[1] for point in curve if point[2] <= TARGET_BPC), None)
            eig = result["top_eigenvalues"].get(name)
            print(f"seed {seed} {name:26s} final {curve[-1][2]:.3f} bpc, to {TARGET_BPC}: "
                  f"{'never' if hit is None else f'{hit:.1f} s'}"
                  + (f"; largest block eigenvalue median {statistics.median(eig):.2e}, max {max(eig):.2e}"
                     if eig else ""), flush=True)


if __name__ == "__main__":
    main()
