"""The K-FAC state in checkpoints: a versioned schema, gathering every owner's layers onto one rank, and
matching a saved state to this run's layers (on any world size, re-cutting blocks where needed).

Schema (format 2; only tensors, numbers and strings, so ``torch.load(weights_only=True)`` reads it)::

    {"format": 2, "steps": int, "world_size": int, "method": "eigen" | "inverse",
     "kl_peak_lr": float,                                        # the KL-clip's lr (absent: 0.0)
     "rows": {"phase", "layers", "world_size"},                  # distributed.rows.RowGatherer
     "faults": {"faults_total", "consecutive_faults", ...},      # core.faults.FaultCounter
     "layers": {name: {"d_a", "d_g", "module", "module_dims", "block",
                       "A", "G", <the decomposition's tensors>}}}

Format 1 (row and fault fields at the top level) is read by :func:`migrate`. Each layer is saved by its
owner and gathered onto rank 0, so one file holds every layer and any world size can resume from it: every
rank re-derives the owner map and keeps what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple
from typing import Any

import torch.distributed as dist

from lightning_dpkfac.core.layers import KFACLayer
from lightning_dpkfac.core.state import LayerState
from lightning_dpkfac.distributed.comm import Communicator

FORMAT = 2


def layer_entries(layers: Sequence[KFACLayer], owners: Sequence[int], rank: int,
                  states: dict[int, LayerState]) -> dict[str, dict[str, Any]]:
    """The entries of the layers this rank owns and has factors for, as CPU tensors."""
    out: dict[str, dict[str, Any]] = {}
    for i, state in states.items():
        if owners[i] != rank or state.A is None or state.G is None:
            continue
        layer = layers[i]
        entry: dict[str, Any] = {"d_a": layer.d_a, "d_g": layer.d_g, "module": layer.module_name,
                                 "module_dims": list(layer.module_dims), "block": list(astuple(layer.block))}
        out[layer.name] = entry | {key: t.detach().cpu().clone() for key, t in state.tensors().items()}
    return out


def gather(local: dict[str, Any], comm: Communicator, dst: int) -> dict[str, Any] | None:
    """Collective: ``local`` (a state of this rank's layers) with every rank's layers merged in, on rank
    ``dst``; ``None`` elsewhere."""
    if comm.world_size == 1:
        return local
    gathered: list[Any] | None = [None] * comm.world_size if comm.rank == dst else None
    dist.gather_object(local, gathered, dst=comm.global_rank(dst), group=comm.group)
    if gathered is None:
        return None
    for part in gathered[1:]:
        local["layers"].update(part["layers"])
    return local


def migrate(state: Any) -> dict[str, Any]:
    """``state`` in the current format; ``ValueError`` if it is no K-FAC state."""
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a K-FAC state of format {FORMAT}: got {keys}")
    if state["format"] == 1:
        state = dict(state, format=FORMAT)
        state["rows"] = {"phase": "decided" if state["steps"] > 0 else "off", "layers": state.pop("row_layers", []),
                         "world_size": state["world_size"]}
        state["faults"] = {key: state.pop(key, 0) for key in
                           ("faults_total", "consecutive_faults", "skipped_steps", "consecutive_skips")}
    return state


def match_layers(layers: Sequence[KFACLayer], state: dict[str, Any], world_size: int,
                 auto_blocks: bool) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Each of ``layers``' saved entry, and the names of those re-cut from a saved layer or block that
    contains them (:func:`_recut`). ``ValueError`` naming every mismatch, with the likely cause
    (``auto_blocks``: the run uses ``max_factor_dim="auto"``, whose cut depends on the world size)."""
    saved, recut, sources = _recut(layers, state["layers"])
    problems = [f"missing layer '{l.name}'" for l in layers if l.name not in saved]
    known = {l.name for l in layers} | sources
    problems += [f"unexpected layer '{n}'" for n in state["layers"] if n not in known]
    for layer in layers:
        entry = saved.get(layer.name)
        if entry is not None and (entry["d_a"], entry["d_g"]) != (layer.d_a, layer.d_g):
            problems.append(f"layer '{layer.name}' has factors A {entry['d_a']}x{entry['d_a']}, "
                            f"G {entry['d_g']}x{entry['d_g']} in the checkpoint but "
                            f"A {layer.d_a}x{layer.d_a}, G {layer.d_g}x{layer.d_g} in the model")
    if problems:
        hint = ". Was it saved from another model or with other skip_layers or max_factor_dim?"
        if auto_blocks and state["world_size"] != world_size:
            hint = (f". max_factor_dim='auto' splits layers for the world size: the checkpoint was saved on "
                    f"{state['world_size']} rank(s), this run has {world_size}, and a block resumes only "
                    f"inside a saved layer or block. Fix: resume on {state['world_size']} rank(s), or train "
                    "with a fixed max_factor_dim (an integer or None).")
        raise ValueError("The K-FAC state in the checkpoint does not match this model: " + "; ".join(problems) + hint)
    return saved, recut


def _recut(layers: Sequence[KFACLayer], saved: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], set[str], set[str]]:
    """``saved`` plus, for each of ``layers`` that it lacks, the diagonal blocks of its factors sliced from a
    saved layer or block of the same module that contains it (exact: a block's factors are those diagonal
    blocks). Returns the entries, the names of the re-cut layers, and the saved names they were cut from."""
    out, recut, sources = dict(saved), set(), set()
    for layer in layers:
        if layer.name in saved:
            continue
        b = layer.block
        for name, entry in saved.items():
            s0, s1, t0, t1 = entry.get("block", (0, entry["d_g"], 0, entry["d_a"]))
            if (entry.get("module", name) == layer.module_name
                    and tuple(entry.get("module_dims", (entry["d_g"], entry["d_a"]))) == layer.module_dims
                    and s0 <= b.r0 and b.r1 <= s1 and t0 <= b.c0 and b.c1 <= t1):
                out[layer.name] = {"d_a": layer.d_a, "d_g": layer.d_g,
                                   "A": entry["A"][b.c0 - t0 : b.c1 - t0, b.c0 - t0 : b.c1 - t0].clone(),
                                   "G": entry["G"][b.r0 - s0 : b.r1 - s0, b.r0 - s0 : b.r1 - s0].clone()}
                recut.add(layer.name)
                sources.add(name)
                break
    return out, recut, sources
