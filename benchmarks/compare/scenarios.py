"""The jobs every system runs: the demo's digits split, a non-IID fleet, and that
fleet with devices too small for the plain student (all of them, or half).

Shards come from splitkd's own partition functions (the cloud's presumed
share set aside, then edge shards, then each edge's held-out split), so a
Flower device and a splitkd edge with the same shard see the same samples.
Each shard is exported to an ``.npz`` for processes that do not load datasets
themselves (the Flower clients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitkd.data import Dataset, Shard, edge_split, load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION
from splitkd.device_classes import STANDARD, TINY, device_class, student_for
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec

DATA = "digits"
PI_4, PI_ZERO = "raspberry-pi-4", "raspberry-pi-zero-2w"  # classes standard and tiny


@dataclass(frozen=True)
class Scenario:
    name: str
    edges: int
    alpha: float | None  # Dirichlet concentration per class; None: IID (the demo's split)
    # The devices' profiles (``splitkd-edge train --device-profile``), device i taking
    # profiles[i % len]; none: no profile given, standard devices. A profile's class
    # (splitkd.device_classes) sets the student a cohort gives the device.
    profiles: tuple[str, ...] = ()

    def shard(self, index: int) -> str:
        return f"{index}/{self.edges}"

    def profile(self, index: int) -> str:
        return self.profiles[index % len(self.profiles)] if self.profiles else ""

    @property
    def classes(self) -> set[str]:
        return {device_class(self.profile(i)) for i in range(self.edges)}

    @property
    def fitting_class(self) -> str:
        """The class whose student every device can hold: one model for the whole fleet
        (FedAvg's) must fit its smallest device."""
        return TINY if TINY in self.classes else STANDARD


SCENARIOS = {
    "demo-2-iid": Scenario("demo-2-iid", 2, None),
    "noniid-4-a0.3": Scenario("noniid-4-a0.3", 4, 0.3),
    # The same shards, every device a Raspberry Pi Zero 2 W (512 MB: class tiny): FedAvg
    # trains the half-width student that fits it; splitkd's cohort gives it the same one.
    "noniid-4-a0.3-tiny": Scenario("noniid-4-a0.3-tiny", 4, 0.3, (PI_ZERO,)),
    # The same shards, Pi 4s and Pi Zeros in turn: FedAvg's one model must fit the Zeros;
    # splitkd's cohort gives each class its own student, linked by the server model.
    "noniid-4-a0.3-mixed": Scenario("noniid-4-a0.3-mixed", 4, 0.3, (PI_4, PI_ZERO)),
}


@dataclass(frozen=True)
class DeviceData:
    name: str
    shard: str
    path: Path  # .npz with train_x, train_y, heldout_x, heldout_y
    train_samples: int
    heldout_samples: int
    profile: str = ""  # splitkd-edge --device-profile; "": none given
    device_class: str = STANDARD


@dataclass
class RunContext:
    """What a system needs to run one (scenario, seed): shards, the student, the budget."""

    scenario: Scenario
    seed: int
    folder: Path
    devices: list[DeviceData]
    union_x: np.ndarray  # the union of the devices' held-out splits
    union_y: np.ndarray
    student: ModelSpec
    hyper: Hyperparameters
    rounds: int
    local_epochs: int
    options: dict[str, str] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        """Epochs over its data each device trains in all: the split demo's 60 by default."""
        return self.rounds * self.local_epochs


def prepare(
    scenario: Scenario, seed: int, folder: Path, rounds: int, local_epochs: int
) -> RunContext:
    """Export the scenario's shards to ``folder`` and describe the run."""
    dataset = load_dataset(DATA)
    folder.mkdir(parents=True, exist_ok=True)
    devices: list[DeviceData] = []
    heldouts: list[Dataset] = []
    for i in range(scenario.edges):
        split = edge_split(
            dataset,
            Shard(i, scenario.edges),
            alpha=scenario.alpha,
            presumed_fraction=DEMO_PRESUMED_FRACTION,
        )
        path = folder / f"edge-{i}.npz"
        np.savez(
            path,
            train_x=split.train.x,
            train_y=split.train.y,
            heldout_x=split.heldout.x,
            heldout_y=split.heldout.y,
        )
        profile = scenario.profile(i)
        devices.append(
            DeviceData(
                f"edge-{i}",
                scenario.shard(i),
                path,
                len(split.train),
                len(split.heldout),
                profile,
                device_class(profile),
            )
        )
        heldouts.append(split.heldout)
    hyper = Hyperparameters(seed=seed, epochs=rounds * local_epochs)
    return RunContext(
        scenario=scenario,
        seed=seed,
        folder=folder,
        devices=devices,
        union_x=np.concatenate([h.x for h in heldouts]),
        union_y=np.concatenate([h.y for h in heldouts]),
        # The student that fits every device, as a cohort's cloud builds it for that class
        # from its standard student (device_classes.student_for): what FedAvg trains.
        student=student_for(scenario.fitting_class, zoo.default_student(dataset.signature)),
        hyper=hyper,
        rounds=rounds,
        local_epochs=local_epochs,
    )
