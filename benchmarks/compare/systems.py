"""The registry of systems ``make compare`` measures side by side.

A system is a function ``RunContext -> SystemRun`` (see ``results.py``): it runs
one scenario with one seed end to end as separate processes on loopback, puts
every device behind its own ``CountingRelay`` and reports, per device, the
final model's accuracy on its own held-out split and on the union of the
held-out splits, and the bytes counted on its socket.

HOOK for the cohort modes of issue 9: add
    "splitkd-split-cohort": run_split_cohort,   # splitkd-cloud serve --cohort-mode split
    "splitkd-federated": run_federated,         # splitkd-cloud serve --cohort-mode federated
here (e.g. in ``splitkd_systems.py``, modelled on ``run_split_kd``: cloud with
``--seed ctx.seed``, edges with ``--cohort NAME`` and ``ctx.rounds`` /
``ctx.local_epochs``), and they appear in the table, report.json and the plot.
"""

from __future__ import annotations

from benchmarks.compare.flower import run_fedavg
from benchmarks.compare.results import System
from benchmarks.compare.splitkd_systems import run_split_kd

SYSTEMS: dict[str, System] = {
    "flower-fedavg": run_fedavg,
    "splitkd-split-kd": run_split_kd,
}
