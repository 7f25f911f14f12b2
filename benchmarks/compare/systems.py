"""The registry of systems ``make compare`` measures side by side.

A system is a function ``RunContext -> SystemRun`` (see ``results.py``): it runs
one scenario with one seed end to end as separate processes on loopback, puts
every device behind its own ``CountingRelay`` and reports, per device, the
final model's accuracy on its own held-out split and on the union of the
held-out splits, and the bytes counted on its socket.

A new system is one function here (see ``splitkd_systems.py``); it then appears
in the table, report.json and the plot.
"""

from __future__ import annotations

from benchmarks.compare.flower import run_fedavg
from benchmarks.compare.results import System
from benchmarks.compare.scenarios import Scenario
from benchmarks.compare.splitkd_systems import (
    run_federated_cohort,
    run_federated_fedavg_cohort,
    run_split_cohort,
    run_split_kd,
)
from splitkd.device_classes import STANDARD

SYSTEMS: dict[str, System] = {
    "flower-fedavg": run_fedavg,
    "splitkd-split-kd": run_split_kd,
    "splitkd-split-cohort": run_split_cohort,
    "splitkd-federated-cohort": run_federated_cohort,
    # An ablation, not a default: the federated cohort without the server model's knowledge.
    "splitkd-federated-fedavg-cohort": run_federated_fedavg_cohort,
}
DEFAULT_SYSTEMS = [name for name in SYSTEMS if name != "splitkd-federated-fedavg-cohort"]

# A solo split-KD session trains the cloud's one standard student whatever the device's
# profile: on a fleet of smaller devices it would measure a student that does not fit them.
STANDARD_DEVICES_ONLY = frozenset({"splitkd-split-kd"})


def applies(system: str, scenario: Scenario) -> bool:
    """Whether ``system`` can run ``scenario`` with the student the scenario's devices hold."""
    return scenario.classes == {STANDARD} or system not in STANDARD_DEVICES_ONLY
