"""The hybrid engine for large graphs: decomposition into blocks, per-block MILP menus,
and a dynamic program across the chain of blocks."""
