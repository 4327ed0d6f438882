"""Grafana dashboard, Prometheus rules and the local observability stacks for loopwatch.

Not part of the installed library: this package holds the monitoring artifacts, the dashboard
as code (``python -m dashboards.loopwatch_dashboard`` writes ``loopwatch.json``), and
``python -m dashboards.stack`` / ``python -m dashboards.stack.fleet``, which run the demo stack
and a fleet on one machine without Docker.
"""
