"""The Lightning callback that runs the K-FAC step and logs its metrics.

``on_before_optimizer_step`` is the seat: Lightning calls it inside ``optimizer.step(closure)`` after the
closure ran forward and backward (DDP has synced the gradients) and after AMP unscaled them, and before
gradient clipping and the real optimizer step. Under gradient accumulation it runs once per optimizer step.

The hooks live in :class:`KFACCallbackMixin`; :class:`KFACCallback` is it on ``lightning.pytorch``'s
``Callback`` (``lightning_dpkfac.pytorch_lightning`` puts it on ``pytorch_lightning``'s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_dpkfac.core.faults import DivergenceWatch
from lightning_dpkfac.core.timing import PHASES
from lightning_dpkfac.distributed.comm import KINDS

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_dpkfac.core.preconditioner import KFACPreconditioner

#: The checkpoint's top-level key for the K-FAC state. Not a callback state: Lightning would then ask a
#: run resumed with another strategy to "add the following callbacks: ['KFACCallback']", which nobody can act
#: on; a top-level key is simply ignored there.
CHECKPOINT_KEY = "lightning_dpkfac"


def check_optimizers(optimizers: list[Optimizer], pre: KFACPreconditioner) -> None:
    """Raise ``ValueError`` naming the fix if the K-FAC layers' parameters are split over several
    optimizers, or (with KL-clip reading the optimizer's lr) over parameter groups of different lr."""
    covered = {id(p) for layer in pre.layers for p in layer.module.parameters(recurse=False)}
    owners = [i for i, opt in enumerate(optimizers)
              if any(id(p) in covered for g in opt.param_groups for p in g["params"])]
    if not owners and pre.layers:
        raise ValueError(
            f"No optimizer holds the parameters of the K-FAC layers {[l.name for l in pre.layers][:5]}, so K-FAC "
            "would precondition gradients that nothing applies. Fix: give them to the optimizer, freeze them "
            "(requires_grad=False), or list them in skip_layers."
        )
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


class KFACCallbackMixin:
    """Preconditions the gradients of the optimizer that owns the K-FAC layers, then logs, per step:
    ``kfac/time_<phase>`` (seconds on this rank, phases: factor, inverse, precondition, comm),
    ``kfac/bytes_<kind>`` (bytes per rank, kinds: gradients, factors, inverses, preconditioned),
    ``kfac/faults`` (layers whose K-FAC state was non-finite this step), ``kfac/skipped`` (1 when the averaged
    gradient was non-finite and no update was applied), ``kfac/damping``, ``kfac/kl_scale`` (the KL-clip's
    factor, 1 when not clipped) and ``kfac/kl_lr`` (the largest lr so far, which the clip uses).

    It writes the engine's state (factors, decompositions, counters), gathered onto rank 0, into the
    checkpoint under ``CHECKPOINT_KEY``, and restores it from there. It warns once if rank 0's training
    loss diverges (``core.faults.DivergenceWatch``).

    Args:
        preconditioner: the engine the strategy built.
        log_every_n_steps: log every this many optimizer steps (default: 1; the Trainer's own
            ``log_every_n_steps`` still decides what reaches the logger).
    """

    #: the namespace's rank-zero logging and warning functions (their logger is the one Lightning configured)
    _info: Callable[[str], None]
    _warn: Callable[[str], None]

    def __init__(self, preconditioner: KFACPreconditioner, log_every_n_steps: int = 1) -> None:
        self.preconditioner = preconditioner
        self.log_every_n_steps = log_every_n_steps
        self._covered = {id(layer.weight) for layer in preconditioner.layers}
        self._last_times: dict[str, float] = {}
        self._last_bytes: dict[str, float] = {}
        self._divergence = DivergenceWatch()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Collective (Lightning builds the checkpoint dict on every rank): the K-FAC state of every
        layer, gathered from its owner onto rank 0, whose dict is the one written."""
        state = self.preconditioner.gather_state_dict(dst=0)
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints of earlier versions kept the state as this callback's state.
        state = checkpoint.get(CHECKPOINT_KEY, checkpoint.get("callbacks", {}).get("KFACCallback", {}).get("kfac"))
        if state is None:
            self._info("The checkpoint holds no K-FAC state (it was saved with another strategy): K-FAC starts "
                       "fresh, building factors from the next steps; layers keep their plain gradient until the "
                       "first decomposition.")
            return
        self.preconditioner.load_state_dict(state)

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
            pl_module.log_dict(self._metrics(step), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if trainer.global_rank != 0 or not isinstance(loss, Tensor):
            return
        pre = self.preconditioner
        message = self._divergence.observe(pre.steps, float(loss), pre.config.value("damping", pre.steps),
                                           pre.config.value("kl_clip", pre.steps))
        if message is not None:
            self._warn(message)

    def _metrics(self, step: int) -> dict[str, Any]:
        pre = self.preconditioner
        times, sent = dict(pre.timings), pre.bytes_sent
        metrics: dict[str, Any] = {}
        for phase in PHASES:
            metrics[f"kfac/time_{phase}"] = times.get(phase, 0.0) - self._last_times.get(phase, 0.0)
        for kind in KINDS:
            metrics[f"kfac/bytes_{kind}"] = sent.get(kind, 0.0) - self._last_bytes.get(kind, 0.0)
        metrics["kfac/faults"] = float(pre.faults.last_step_faults)
        metrics["kfac/skipped"] = float(pre.faults.last_step_skipped)
        metrics["kfac/damping"] = float(pre.config.value("damping", step))
        metrics["kfac/kl_scale"] = pre.kl_scale
        if pre.config.kl_clip is not None:
            metrics["kfac/kl_lr"] = pre.kl_peak_lr
        self._last_times, self._last_bytes = times, sent
        return metrics


class KFACCallback(KFACCallbackMixin, Callback):
    __doc__ = KFACCallbackMixin.__doc__
    _info = staticmethod(rank_zero_info)
    _warn = staticmethod(rank_zero_warn)
