"""loopwatch's benchmarks: each module measures one thing and prints figures and ratios.

Run them from the repository root as modules, e.g. ``python -m benchmarks.overhead``, or all
of them with ``python -m benchmarks.run_all`` (docs/performance.md). Each writes its results to
``benchmarks/out/<name>.json`` (not tracked); the committed reference results are in
``benchmarks/results/``. Nothing here is part of loopwatch.
"""
