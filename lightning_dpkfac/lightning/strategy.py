"""The Lightning face: ``DPKFACStrategy`` (registered as "dpkfac") and the D-KFAC baseline ("dkfac").

The strategy is Lightning's own DDP strategy (same launchers, cluster environments, precision plugins),
plus a :class:`~lightning_dpkfac.core.preconditioner.KFACPreconditioner` built on the LightningModule once it
is on its device and wrapped, and a :class:`~lightning_dpkfac.lightning.callback.KFACCallback` that runs it in
``on_before_optimizer_step``.

Everything but the base classes lives in :class:`KFACStrategyMixin`, so that the same strategy also
exists for the separate ``pytorch_lightning`` package (:mod:`lightning_dpkfac.pytorch_lightning`), whose
``DDPStrategy``, ``Callback`` and registry are other objects than ``lightning.pytorch``'s.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac.lightning.callback import KFACCallback, KFACCallbackMixin
from lightning_dpkfac.core.config import FIELDS, KFACConfig, unknown_key_message
from lightning_dpkfac.core.preconditioner import KFACPreconditioner

if TYPE_CHECKING:
    import lightning.pytorch as pl

# The two namespaces' DDPStrategy classes are copies of one source: the same keywords.
_DDP_STRATEGY_ARGS = set(inspect.signature(DDPStrategy.__init__).parameters) - {"self", "kwargs"}
_DDP_MODULE_ARGS = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KFACConfig)} | {"skip_layers": ()}


class KFACStrategyMixin:
    """DDP plus K-FAC preconditioning with distributed preconditioning (DP-KFAC), on top of a Lightning
    ``DDPStrategy`` class (the concrete classes put it first in their bases).

    Args:
        damping, factor_decay, kl_clip, lr, factor_update_steps, inv_update_steps, method, mode, skip_layers,
            kfac_bucket_cap_mb, gather_rows, max_factor_dim, overlap_decompositions, flush_denormal,
            max_consecutive_faults: the :class:`~lightning_dpkfac.core.config.KFACConfig` fields, with the
            same defaults and meanings.
            ``lr`` left at ``None`` makes KL-clip read the learning rate of the optimizer's first
            parameter group.
        kfac_config: all of the above as one :class:`KFACConfig`, instead of the keywords (giving both
            is an error: there is no telling which should win).
        **kwargs: every other keyword goes to Lightning's ``DDPStrategy`` (``start_method``, ``timeout``,
            ``process_group_backend``, ...) and from there to ``DistributedDataParallel``
            (``find_unused_parameters``, ``bucket_cap_mb``, ...).
    """

    #: the K-FAC callback class of this class's Lightning namespace
    _callback_class: type[KFACCallbackMixin]
    #: the namespace's rank-zero logging function (its logger is the one Lightning configured)
    _info: Callable[[str], None]

    def __init__(
        self,
        *,
        damping: float = _DEFAULTS["damping"],
        factor_decay: float = _DEFAULTS["factor_decay"],
        kl_clip: float | None = _DEFAULTS["kl_clip"],
        lr: float | None = _DEFAULTS["lr"],
        factor_update_steps: int = _DEFAULTS["factor_update_steps"],
        inv_update_steps: int = _DEFAULTS["inv_update_steps"],
        method: str = _DEFAULTS["method"],
        mode: str = _DEFAULTS["mode"],
        skip_layers: Sequence[str] = _DEFAULTS["skip_layers"],
        kfac_bucket_cap_mb: float = _DEFAULTS["kfac_bucket_cap_mb"],
        gather_rows: bool = _DEFAULTS["gather_rows"],
        max_factor_dim: int | str | None = _DEFAULTS["max_factor_dim"],
        overlap_decompositions: bool | str = _DEFAULTS["overlap_decompositions"],
        flush_denormal: bool = _DEFAULTS["flush_denormal"],
        max_consecutive_faults: int = _DEFAULTS["max_consecutive_faults"],
        kfac_config: KFACConfig | None = None,
        **kwargs: Any,
    ) -> None:
        given = dict(damping=damping, factor_decay=factor_decay, kl_clip=kl_clip, lr=lr,
                     factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps, method=method,
                     mode=mode, skip_layers=skip_layers, kfac_bucket_cap_mb=kfac_bucket_cap_mb,
                     gather_rows=gather_rows, max_factor_dim=max_factor_dim,
                     overlap_decompositions=overlap_decompositions, flush_denormal=flush_denormal,
                     max_consecutive_faults=max_consecutive_faults)
        for name in kwargs:  # DDPStrategy would only fail on these after the ranks started
            if name not in _DDP_STRATEGY_ARGS | _DDP_MODULE_ARGS:
                known = (*FIELDS, "kfac_config", *sorted(_DDP_STRATEGY_ARGS | _DDP_MODULE_ARGS))
                raise ValueError(unknown_key_message(name, known, type(self).__name__))
        if kfac_config is None:
            self.kfac_config = KFACConfig(**given)
        else:
            changed = {name: value for name, value in given.items() if not _same(value, _DEFAULTS[name])}
            if changed:
                settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
                raise ValueError(f"{type(self).__name__} got both kfac_config and the K-FAC keywords {settings}. "
                                 f"Give one of them, e.g. kfac_config=kfac_config.replace({settings}).")
            self.kfac_config = kfac_config
        super().__init__(**kwargs)  # the DDPStrategy that follows in the bases
        self.preconditioner: KFACPreconditioner | None = None
        self._callback: KFACCallbackMixin | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)  # when fitting, builds the engine: configure_ddp -> _register_ddp_hooks
        if trainer.state.fn != "fit" or self.preconditioner is None:
            return
        self._info(self.preconditioner.describe())
        self._callback = self._callback_class(self.preconditioner)
        trainer.callbacks.append(self._callback)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore after :meth:`setup`, so that the K-FAC callback exists to receive its state."""
        return True

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"Could not read checkpoint '{checkpoint_path}': it is truncated, corrupted or not a checkpoint "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                "Resume from an earlier checkpoint file."
            ) from error

    def setup_distributed(self) -> None:
        super().setup_distributed()
        # Lightning never destroys the process group (fit and test share it); do it at exit, while Python
        # is still alive, rather than in interpreter finalization. This alone did not stop the rare abort
        # at exit described in exit_process.
        atexit.register(_destroy_process_group)

    def configure_ddp(self) -> None:
        self._check_same_config_on_all_ranks()
        super().configure_ddp()

    def _register_ddp_hooks(self) -> None:
        """Build the engine on the wrapped module (now on its device) and let it own DDP's gradient
        communication: in dpkfac, K-FAC gradients are reduced to their owners only. A user's
        ``ddp_comm_hook`` wins (then gradient bytes are not counted), on every device: Lightning's DDP
        registers one on CUDA only, though DDP's comm hooks work on gloo too."""
        strategy: Any = self  # a DDPStrategy: model, lightning_module, precision_plugin, ...
        assert isinstance(strategy.model, DistributedDataParallel)
        self.preconditioner = KFACPreconditioner(strategy.lightning_module, self.kfac_config)
        scaler = getattr(strategy.precision_plugin, "scaler", None)  # "16-mixed" on CUDA: a GradScaler
        if scaler is not None:
            self.preconditioner.set_loss_scale(scaler.get_scale)
        if strategy._ddp_comm_hook is not None:
            hook = strategy._ddp_comm_hook
            if strategy._ddp_comm_wrapper is not None:
                hook = strategy._ddp_comm_wrapper(hook)
            strategy.model.register_comm_hook(state=strategy._ddp_comm_state, hook=hook)
        else:
            self.preconditioner.register_ddp_comm_hook(strategy.model)

    def _check_same_config_on_all_ranks(self) -> None:
        """Fail loudly if ranks got different K-FAC settings (e.g. an unseeded sweeper under popen DDP)."""
        mine = _fingerprint(self.kfac_config)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        if any(other != mine for other in gathered):
            raise ValueError(
                "Ranks were given different K-FAC settings; every rank must use the same config. Got: "
                + "; ".join(f"rank {r}: {g}" for r, g in enumerate(gathered))
                + ". Fix: seed the sweeper or build the config before the ranks are launched."
            )

    def teardown(self) -> None:
        # The engine stays readable after fit (counters, owners); it only stops capturing.
        if self.preconditioner is not None:
            self.preconditioner.remove_hooks()
        module = self.lightning_module
        if self._callback is not None and module is not None and module._trainer:
            callbacks = module.trainer.callbacks
            if self._callback in callbacks:
                callbacks.remove(self._callback)
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, mode in (("dpkfac", "dpkfac"), ("dkfac", "dkfac")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"DDP with K-FAC preconditioning, mode '{mode}'", mode=mode
                )


class DPKFACStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    strategy_name = "dpkfac"
    _callback_class = KFACCallback
    _info = staticmethod(rank_zero_info)


def _same(a: Any, b: Any) -> bool:
    """Whether two config values are equal (sequences of any kind compared as lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End a training script without Python's interpreter finalization, after destroying the process
    group and flushing output.

    Multi-process gloo runs (Lightning's own ``strategy="ddp"`` too) sometimes abort while the interpreter
    shuts down, after all work is done ("terminate called without an active exception", exit code 134;
    docs/lightning.md). Scripts whose exit code matters (CI, schedulers) call this
    as their last statement on success.
    """
    _destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fingerprint(config: KFACConfig) -> dict[str, Any]:
    return {
        name: (f"<schedule {getattr(value, '__qualname__', type(value).__name__)}>" if callable(value) else value)
        for name, value in dataclasses.asdict(config).items()
    }


DPKFACStrategy.register_strategies(StrategyRegistry)
