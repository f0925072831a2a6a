"""The Lightning callback that runs the K-FAC step and logs its metrics.

``on_before_optimizer_step`` is the seat: Lightning calls it inside ``optimizer.step(closure)`` after the
closure ran forward and backward (DDP has synced the gradients) and after AMP unscaled them, and before
gradient clipping and the real optimizer step. Under gradient accumulation it runs once per optimizer step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from lightning_dpkfac.comm import KINDS

if TYPE_CHECKING:
    from lightning_dpkfac.preconditioner import KFACPreconditioner

PHASES = ("factor", "inverse", "precondition", "comm")


def check_optimizers(optimizers: list[Optimizer], pre: KFACPreconditioner) -> None:
    """Raise ``ValueError`` naming the fix if the K-FAC layers' parameters are split over several
    optimizers, or (with KL-clip reading the optimizer's lr) over parameter groups of different lr."""
    covered = {id(p) for layer in pre.layers for p in layer.module.parameters(recurse=False)}
    owners = [i for i, opt in enumerate(optimizers)
              if any(id(p) in covered for g in opt.param_groups for p in g["params"])]
    if len(owners) > 1:
        raise ValueError(
            f"The K-FAC layers' parameters are split over optimizers {owners}; K-FAC preconditions them in one "
            "step, so they must all belong to one optimizer (other parameters may use other optimizers)."
        )
    if not owners or pre.config.kl_clip is None or pre.config.lr is not None:
        return
    lrs = {g["lr"] for g in optimizers[owners[0]].param_groups if any(id(p) in covered for p in g["params"])}
    if len(lrs) > 1:
        raise ValueError(
            f"The K-FAC layers are in parameter groups with different learning rates {sorted(lrs)}, so KL-clip "
            "cannot read one from the optimizer. Fix: pass lr=... to the strategy (the rate KL-clip should "
            "assume), set kl_clip=None, or use one learning rate for the K-FAC layers."
        )


class KFACCallback(pl.Callback):
    """Preconditions the gradients of the optimizer that owns the K-FAC layers, then logs, per step:
    ``kfac/time_<phase>`` (seconds on this rank, phases: factor, inverse, precondition, comm),
    ``kfac/bytes_<kind>`` (bytes per rank, kinds: gradients, factors, inverses, preconditioned),
    ``kfac/faults`` (layers whose K-FAC state was non-finite this step), ``kfac/damping`` and ``kfac/kl_lr``.

    Its checkpoint state is the engine's (factors, decompositions, counters), gathered onto rank 0.

    Args:
        preconditioner: the engine the strategy built.
        log_every_n_steps: log every this many optimizer steps (default: 1; the Trainer's own
            ``log_every_n_steps`` still decides what reaches the logger).
    """

    def __init__(self, preconditioner: KFACPreconditioner, log_every_n_steps: int = 1) -> None:
        self.preconditioner = preconditioner
        self.log_every_n_steps = log_every_n_steps
        self._covered = {id(layer.weight) for layer in preconditioner.layers}
        self._last_times: dict[str, float] = {}
        self._last_bytes: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """Collective (Lightning builds the checkpoint dict on every rank): the K-FAC state of every
        layer, gathered from its owner onto rank 0, whose dict is the one written."""
        state = self.preconditioner.gather_state_dict(dst=0)
        return {} if state is None else {"kfac": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "kfac" in state_dict:
            self.preconditioner.load_state_dict(state_dict["kfac"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer.optimizers, self.preconditioner)

    def _owns_kfac_layers(self, optimizer: Optimizer) -> bool:
        return any(id(p) in self._covered for group in optimizer.param_groups for p in group["params"])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if not self._owns_kfac_layers(optimizer):
            return
        pre = self.preconditioner
        lr = None if pre.config.lr is not None else optimizer.param_groups[0]["lr"]
        step = pre.steps
        pre.step(lr=lr)
        if step % self.log_every_n_steps == 0:
            pl_module.log_dict(self._metrics(step, lr), on_step=True, on_epoch=False)

    def _metrics(self, step: int, lr: float | None) -> dict[str, Any]:
        pre = self.preconditioner
        times, sent = dict(pre.timings), pre.bytes_sent
        metrics: dict[str, Any] = {}
        for phase in PHASES:
            metrics[f"kfac/time_{phase}"] = times.get(phase, 0.0) - self._last_times.get(phase, 0.0)
        for kind in KINDS:
            metrics[f"kfac/bytes_{kind}"] = sent.get(kind, 0.0) - self._last_bytes.get(kind, 0.0)
        metrics["kfac/faults"] = float(pre.last_step_faults)
        metrics["kfac/damping"] = float(pre.config.value("damping", step))
        if lr is not None or pre.config.lr is not None:
            metrics["kfac/kl_lr"] = float(lr if lr is not None else pre.config.value("lr", step))
        self._last_times, self._last_bytes = times, sent
        return metrics
