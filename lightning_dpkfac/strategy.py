"""The Lightning face: ``DPKFACStrategy`` (registered as "dpkfac") and the D-KFAC baseline ("dkfac").

The strategy is Lightning's own DDP strategy (same launchers, cluster environments, precision plugins),
plus a :class:`~lightning_dpkfac.preconditioner.KFACPreconditioner` built on the LightningModule once it
is on its device and wrapped, and a :class:`~lightning_dpkfac.callback.KFACCallback` that runs it in
``on_before_optimizer_step``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac.callback import KFACCallback
from lightning_dpkfac.comm import Communicator
from lightning_dpkfac.config import FIELDS, KFACConfig, unknown_key_message
from lightning_dpkfac.preconditioner import KFACPreconditioner

_DDP_STRATEGY_ARGS = set(inspect.signature(DDPStrategy.__init__).parameters) - {"self", "kwargs"}
_DDP_MODULE_ARGS = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}


class DPKFACStrategy(DDPStrategy):
    """DDP plus K-FAC preconditioning with distributed preconditioning (DP-KFAC).

    Args:
        kfac_config: a :class:`KFACConfig` (default: ``KFACConfig()``).
        **kwargs: any :class:`KFACConfig` field (``damping``, ``factor_decay``, ``kl_clip``, ``lr``,
            ``factor_update_steps``, ``inv_update_steps``, ``method``, ``mode``, ``skip_layers``,
            ``bucket_cap_mb``), overriding ``kfac_config``; every other keyword goes to
            :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``, ``timeout``,
            ``find_unused_parameters``, ...).

    ``lr`` left at ``None`` makes KL-clip read the learning rate of the optimizer's first parameter group.
    """

    strategy_name = "dpkfac"

    def __init__(self, kfac_config: KFACConfig | None = None, **kwargs: Any) -> None:
        kfac_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in FIELDS}
        for name in kwargs:  # DDPStrategy would only fail on these after the ranks started
            if name not in _DDP_STRATEGY_ARGS | _DDP_MODULE_ARGS:
                known = (*FIELDS, *sorted(_DDP_STRATEGY_ARGS | _DDP_MODULE_ARGS))
                raise ValueError(unknown_key_message(name, known, "DPKFACStrategy"))
        self.kfac_config = (kfac_config or KFACConfig()).replace(**kfac_kwargs)
        super().__init__(**kwargs)
        self.preconditioner: KFACPreconditioner | None = None
        self._comm: Communicator | None = None
        self._callback: KFACCallback | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        # One communicator (one set of byte counters) for DDP's gradient traffic and K-FAC's.
        self._comm = Communicator(None, int(self.kfac_config.bucket_cap_mb * 2**20))
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_same_config_on_all_ranks()
        self.preconditioner = KFACPreconditioner(self.lightning_module, self.kfac_config, comm=self._comm)
        rank_zero_info(self.preconditioner.describe())
        self._callback = KFACCallback(self.preconditioner)
        trainer.callbacks.append(self._callback)

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

    def _register_ddp_hooks(self) -> None:
        """Replace DDP's gradient all-reduce by the same all-reduce with a byte counter (CPU and CUDA),
        unless the user set their own ``ddp_comm_hook``."""
        if self._ddp_comm_hook is not None or self._ddp_comm_wrapper is not None:
            super()._register_ddp_hooks()
            return
        assert isinstance(self.model, DistributedDataParallel) and self._comm is not None
        self.model.register_comm_hook(self._comm, _counting_allreduce_hook)

    def teardown(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove_hooks()
        if self._callback is not None and self.lightning_module is not None and self.lightning_module._trainer:
            callbacks = self.lightning_module.trainer.callbacks
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


def _counting_allreduce_hook(comm, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce (average) of one gradient bucket (a ``dist.GradBucket``), counted as
    "gradients" traffic.

    No annotations on purpose: DDP compares a hook's annotations with the real ``dist.GradBucket`` and
    ``Future`` classes, and ``from __future__ import annotations`` turns them into strings it rejects.
    """
    buffer = bucket.buffer()
    comm.count("gradients", "all_reduce", buffer.numel() * buffer.element_size())
    buffer.div_(comm.world_size)
    future = dist.all_reduce(buffer, group=comm.group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def _fingerprint(config: KFACConfig) -> dict[str, Any]:
    return {
        name: (f"<schedule {getattr(value, '__qualname__', type(value).__name__)}>" if callable(value) else value)
        for name, value in dataclasses.asdict(config).items()
    }


DPKFACStrategy.register_strategies(StrategyRegistry)
