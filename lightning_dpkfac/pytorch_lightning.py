"""The same strategy for code that imports the ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

``pytorch_lightning`` is a copy of ``lightning.pytorch`` with classes and a strategy registry of its own, so
its ``Trainer`` accepts only strategies and callbacks built on its own base classes. Importing this module
registers "dpkfac" and "dkfac" with ``pytorch_lightning``'s registry and defines :class:`DPKFACStrategy` on
its ``DDPStrategy``; the engine, the callback's hooks and every behaviour are the ones of
:mod:`lightning_dpkfac.lightning.strategy`. ``import lightning_dpkfac`` imports this module by itself when
``pytorch_lightning`` was imported before it.

    import pytorch_lightning as pl
    from lightning_dpkfac.pytorch_lightning import DPKFACStrategy

    trainer = pl.Trainer(strategy="dpkfac", accelerator="cpu", devices=2)
    trainer = pl.Trainer(strategy=DPKFACStrategy(damping=1e-2), accelerator="cpu", devices=2)
"""

from __future__ import annotations

from pytorch_lightning import Callback
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_dpkfac.lightning.callback import KFACCallbackMixin
from lightning_dpkfac.lightning.strategy import KFACStrategyMixin


class KFACCallback(KFACCallbackMixin, Callback):
    __doc__ = KFACCallbackMixin.__doc__
    _info = staticmethod(rank_zero_info)
    _warn = staticmethod(rank_zero_warn)


class DPKFACStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    strategy_name = "dpkfac"
    _callback_class = KFACCallback
    _info = staticmethod(rank_zero_info)


DPKFACStrategy.register_strategies(StrategyRegistry)
