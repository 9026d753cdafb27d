"""`adjust eval frontier`: quality against speed for every strategy family, and who dominates whom.

By concern: `sweep` (grids, the plan of points, measuring each one: `run_frontier`), `measures` (two-sided
quality measures for free text), `analysis` (Pareto fronts and dominance, pure functions of the measured
points) and `report` (Markdown, plot, the files as one set). Acceptance targets are not the library's:
benchmarks/frontier_targets.py reads a report and says where they stand.
"""

from .sweep import DEFAULT_GRIDS, QUALITY_MODES, parse_families, parse_grid, plan_points, run_frontier  # noqa: F401
