"""Grafana dashboard, Prometheus rules and the local observability stack for loopwatch.

Not part of the installed library: this package holds the monitoring artifacts and
``python -m dashboards.stack``, which runs them on one machine without Docker.
"""
