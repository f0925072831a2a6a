"""The owner map: deterministic, every layer owned once, greedy-balanced."""

from __future__ import annotations

import pytest

from lightning_dpkfac.distributed.assignment import (
    MIN_AUTO_PART,
    LayerShape,
    assign_owners,
    block_limits,
    layer_cost,
    load_imbalance,
    rank_loads,
)
from lightning_dpkfac.tools.shape_tables import BUILTIN

#: The MLP 784-512-512-10 of the benchmark: its first layer costs 65% of the K-FAC work.
MLP = [LayerShape(785, 512), LayerShape(513, 512), LayerShape(513, 10)]


def test_every_layer_gets_exactly_one_owner_in_range() -> None:
    owners = assign_owners([5.0, 1.0, 3.0, 2.0, 8.0], world_size=3)
    assert len(owners) == 5 and all(0 <= o < 3 for o in owners)


def test_costliest_layers_go_to_distinct_ranks_first() -> None:
    assert assign_owners([1.0, 9.0, 4.0, 8.0], world_size=2) == [0, 0, 1, 1]  # 9->r0, 8->r1, 4->r1, 1->r0


def test_map_depends_only_on_costs_and_is_repeatable() -> None:
    costs = [3.0, 3.0, 3.0, 1.0, 7.0]
    assert assign_owners(costs, 4) == assign_owners(list(costs), 4)
    assert assign_owners([2.0, 2.0], 2) == [0, 1]  # ties: earlier layer, lower rank


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


def test_a_fixed_max_factor_dim_bounds_both_sides_of_every_layer() -> None:
    assert block_limits(MLP, 256) == [(256, 256)] * 3
    assert block_limits(MLP, None, world_size=8) == [(None, None)] * 3


def test_auto_leaves_every_layer_whole_on_one_rank() -> None:
    assert block_limits(MLP, "auto", world_size=1) == [(512, 785), (512, 513), (10, 513)]


def test_auto_cuts_only_a_layer_above_the_fair_share_and_its_larger_side_first() -> None:
    # 785 columns -> 2 x 393 brings the first layer under half the total; G (512) stays whole
    assert block_limits(MLP, "auto", world_size=2) == [(512, 393), (512, 513), (10, 513)]


@pytest.mark.parametrize("world_size", [2, 8, 64, 1024])
@pytest.mark.parametrize("table", list(BUILTIN))
def test_every_auto_block_fits_the_fair_share_unless_its_sides_reach_the_floor(table: str, world_size: int) -> None:
    shapes = BUILTIN[table]().shapes
    fair = sum(layer_cost(s, 10) for s in shapes) / world_size
    for shape, (rows, cols) in zip(shapes, block_limits(shapes, "auto", world_size)):
        if layer_cost(shape, 10) <= fair:
            assert (rows, cols) == (shape.d_g, shape.d_a)
        else:
            floor = rows < 2 * MIN_AUTO_PART and cols < 2 * MIN_AUTO_PART
            assert layer_cost(LayerShape(cols, rows), 10) <= fair or floor, (shape, rows, cols)
            assert min(rows, cols) >= min(MIN_AUTO_PART, shape.d_g, shape.d_a)


def test_auto_balances_resnet50_on_64_ranks_with_few_blocks() -> None:
    shapes = BUILTIN["resnet50"]()
    whole, auto = shapes.shapes, shapes.split("auto", 64).shapes
    imbalance = {name: load_imbalance(costs, assign_owners(costs, 64), 64)
                 for name, costs in (("whole", [layer_cost(s, 10) for s in whole]),
                                     ("auto", [layer_cost(s, 10) for s in auto]))}
    assert imbalance["auto"] < 2.0 < 10 < imbalance["whole"]
    assert len(auto) < 1.5 * len(whole)
