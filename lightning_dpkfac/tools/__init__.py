"""Tools around the engine: the benchmark, the planner and its shape tables, example models and data, and a
rank spawner. Nothing in the engine imports them (they need the ``examples`` extra for data and plots)."""
