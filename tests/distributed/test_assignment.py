"""The owner map: deterministic, every layer owned once, greedy-balanced; and the decomposition slots that
spread each owner's decompositions over the interval. (Where ``max_factor_dim="auto"`` cuts layers into
blocks to balance the map: ``tests/core/test_blocks.py``.)"""

from __future__ import annotations

import pytest

from lightning_dpkfac.distributed.assignment import (
    LayerShape,
    assign_owners,
    decomposes_at,
    decomposition_cost,
    decomposition_slots,
    layer_cost,
    load_imbalance,
    rank_loads,
)


def test_every_layer_gets_exactly_one_owner_in_range() -> None:
    owners = assign_owners([5.0, 1.0, 3.0, 2.0, 8.0], world_size=3)
    assert len(owners) == 5 and all(0 <= o < 3 for o in owners)


def test_costliest_layers_go_to_distinct_ranks_first() -> None:
    assert assign_owners([1.0, 9.0, 4.0, 8.0], world_size=2) == [0, 0, 1, 1]  # 9->r0, 8->r1, 4->r1, 1->r0


def test_ties_go_to_the_earlier_layer_and_the_lower_rank() -> None:
    """Every rank computes the map alone: a tie broken any other way (by hash, by dict order) could give
    two ranks different maps."""
    assert assign_owners([2.0, 2.0], 2) == [0, 1]
    # 7 -> r0; the three 3s in layer order -> r1, r2, r3; 1 -> the least-loaded rank with the lowest index, r1
    assert assign_owners([3.0, 3.0, 3.0, 1.0, 7.0], 4) == [1, 2, 3, 1, 0]


def test_ranks_beyond_the_layer_count_own_nothing() -> None:
    owners = assign_owners([4.0, 2.0], world_size=5)
    assert sorted(owners) == [0, 1]
    assert rank_loads([4.0, 2.0], owners, 5)[2:] == [0.0, 0.0, 0.0]


def test_greedy_balance_is_within_the_lpt_bound() -> None:
    costs = [float(c) for c in (97, 41, 63, 12, 88, 55, 30, 71, 19, 64, 8, 45)]
    for world in (2, 3, 4):
        owners = assign_owners(costs, world)
        loads = rank_loads(costs, owners, world)
        optimum_lower_bound = max(max(costs), sum(costs) / world)
        assert max(loads) <= (4 / 3 - 1 / (3 * world)) * optimum_lower_bound + 1e-9  # Graham's LPT bound
        assert load_imbalance(costs, owners, world) == pytest.approx(max(loads) / (sum(costs) / world))


def test_cost_grows_with_factor_size_and_shrinks_with_rarer_inversion() -> None:
    small, big = LayerShape(d_a=65, d_g=16), LayerShape(d_a=513, d_g=512)
    assert layer_cost(big) > layer_cost(small)
    assert layer_cost(big, inv_update_steps=10) < layer_cost(big, inv_update_steps=1)


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        assign_owners([1.0], 0)


def test_equal_layers_of_one_owner_take_one_slot_each() -> None:
    shapes = [LayerShape(65, 64)] * 4
    assert decomposition_slots(shapes, [0] * 4, world_size=1, inv_update_steps=4) == [0, 1, 2, 3]


def test_the_costliest_layer_decomposes_alone_and_the_others_share_the_rest_of_the_interval() -> None:
    big, small = LayerShape(1025, 512), LayerShape(129, 64)
    slots = decomposition_slots([small, big, small, small], [0] * 4, world_size=1, inv_update_steps=3)
    assert slots[1] == 0 and slots.count(0) == 1  # nothing joins the big one
    per_slot = [sum(decomposition_cost(s) for s, k in zip([small, big, small, small], slots) if k == j) for j in range(3)]
    assert per_slot[0] == max(per_slot) and 0 < per_slot[1] and 0 < per_slot[2]


def test_each_owner_spreads_its_own_layers_and_the_ranks_share_each_step() -> None:
    """Two ranks own two equal layers each: every step of the interval has one decomposition per rank."""
    slots = decomposition_slots([LayerShape(65, 64)] * 4, [0, 1, 0, 1], world_size=2, inv_update_steps=2)
    assert sorted(zip([0, 1, 0, 1], slots)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_slots_are_factor_update_steps_so_that_decompositions_use_fresh_factors() -> None:
    slots = decomposition_slots([LayerShape(65, 64)] * 6, [0] * 6, 1, inv_update_steps=6, factor_update_steps=2)
    assert sorted(slots) == [0, 0, 2, 2, 4, 4]


def test_every_layer_decomposes_at_step_zero_then_once_per_interval_in_its_slot() -> None:
    assert [k for k in range(9) if decomposes_at(k, slot=2, inv_update_steps=3)] == [0, 2, 5, 8]
