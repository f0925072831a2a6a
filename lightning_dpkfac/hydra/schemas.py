"""Typed Hydra schemas for the strategies, registered in Hydra's ConfigStore on import.

Group ``strategy``:

- ``dpkfac_schema``: every :class:`~lightning_dpkfac.core.config.KFACConfig` field (derived from the dataclass,
  never listed by hand) plus the DDP keywords below, ``_target_: lightning_dpkfac.DPKFACStrategy``.
- ``ddp_schema``: the DDP keywords below, ``_target_: lightning.pytorch.strategies.DDPStrategy``.

A YAML file in ``conf/strategy/`` puts a schema first in its defaults list; then a misspelt key
(``strategy.dampng=1e-3``) or a value of the wrong type (``strategy.damping=abc``) fails when Hydra
composes the config, with an error naming the key, before anything is built. Schedules (callables) have
no YAML form: pass numbers here, or build ``KFACConfig`` in Python.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from hydra.core.config_store import ConfigStore

from lightning_dpkfac.core.config import KFACConfig

#: ``DDPStrategy`` keywords a YAML config may set: (name, type, default). ``find_unused_parameters`` and
#: ``bucket_cap_mb`` go on to ``DistributedDataParallel``. Any other DDP keyword can be added here the same way.
DDP_KEYWORDS: tuple[tuple[str, Any, Any], ...] = (
    ("start_method", str, "popen"),
    ("process_group_backend", str | None, None),
    ("find_unused_parameters", bool, False),
    ("bucket_cap_mb", float | None, None),  # DDP's gradient buckets (MiB); None: DDP's default
)


def _ddp_fields() -> list[tuple[str, Any, Any]]:
    return [(name, type_, dataclasses.field(default=default)) for name, type_, default in DDP_KEYWORDS]


def _kfac_fields() -> list[tuple[str, Any, Any]]:
    """``KFACConfig``'s fields with their resolved types and defaults (the module uses string annotations)."""
    types = typing.get_type_hints(KFACConfig)
    return [
        (f.name, types[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(KFACConfig)
    ]


def _schema(name: str, target: str, fields: list[tuple[str, Any, Any]]) -> type:
    return dataclasses.make_dataclass(name, [("_target_", str, dataclasses.field(default=target)), *fields])


DPKFACStrategySchema = _schema(
    "DPKFACStrategySchema", "lightning_dpkfac.DPKFACStrategy", _kfac_fields() + _ddp_fields()
)
DDPStrategySchema = _schema("DDPStrategySchema", "lightning.pytorch.strategies.DDPStrategy", _ddp_fields())


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (group ``strategy``); called on import, idempotent."""
    store = ConfigStore.instance()
    store.store(group="strategy", name="dpkfac_schema", node=DPKFACStrategySchema)
    store.store(group="strategy", name="ddp_schema", node=DDPStrategySchema)


register_configs()
