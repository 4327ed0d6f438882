"""loopwatch's monitoring on one machine, without Docker: the demo stack and the fleet.

``python -m dashboards.stack`` runs the demo app, its upstream simulator and Prometheus with
the repository's rules (:mod:`.demo`, :mod:`.cli`); ``python -m dashboards.stack.fleet`` runs
a fleet of multi-worker app instances, Prometheus in agent mode, VictoriaMetrics and vmalert
(:mod:`.fleet`). One module per job:

* :mod:`.processes`: find the binaries, start each process with a log, stop its group;
* :mod:`.rules`: copy the rule files, alert holds capped for tests and demos;
* :mod:`.promapi`: the Prometheus query and rules API (Prometheus, VictoriaMetrics, vmalert);
* :mod:`.panels`: the dashboard's queries and variables, run as Grafana would;
* :mod:`.durations`: Prometheus durations;
* :mod:`.fleet_app`: the app each fleet instance runs; :mod:`.fleet_cli`: its command line.

Nothing is imported here, so that an app process importing :mod:`.fleet_app` loads only that.
"""
