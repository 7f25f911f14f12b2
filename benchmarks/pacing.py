"""How long a real device spends on its side of a step: ``make loadtest``'s paced phase.

A real edge does not send its next step the moment the cloud answers: it runs its
heads (the student head forward and backward, the frozen teacher head forward) and
moves the step's bytes over its link. The paced phase makes each simulated edge wait
that long between steps, so the cloud sees the arrivals of a fleet, not a saturating
closed loop.

- **Compute**: the step's FLOPs (``splitkd.flops``: the student head trained, 3x its
  forward, plus the teacher head's forward, for one batch) over the device's FLOP rate:
  the reference device's measured rate times the profile's ``relative_compute_speed``
  (``splitkd/profiles/devices.json``).
- **Link**: the planner's arithmetic (``edge_agent.plan_model.LinkFigures``) fed with
  the link profile (``splitkd/profiles/links.json``): one round trip (twice the one-way
  latency, each way drawn within the profile's jitter) plus the step's bytes over the
  up and down bandwidths.

Jitter (latency within the profile's jitter, compute +-10 %, a random first offset)
keeps the edges from marching in lockstep. No clock and no network here: unit-tested.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge_agent.plan_model import LinkFigures
from splitkd import energy
from splitkd.demo import DEMO_PROFILES

# The reference device of the profiles (relative_compute_speed 1.0) and its FLOP rate:
# about 8 GFLOP/s in High Performance Linpack on a Raspberry Pi 4 with the 64-bit OS, all
# four cores (B. Feiereisen, "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64",
# 2022, feiereisen.net/?page_id=924). The heads' small layers reach a fraction of HPL's
# rate, so this underestimates device seconds: pauses come out shorter and the load on
# the cloud heavier than a real fleet's (the safe side for a capacity figure).
REFERENCE_DEVICE = "raspberry-pi-4"
REFERENCE_FLOPS_PER_SECOND = 8e9
# Device compute varies from step to step (other work, caches, clocks): +-10 %.
COMPUTE_JITTER = 0.10


@dataclass(frozen=True)
class Pace:
    """One simulated edge's side of a step: its device and link, and what a step moves."""

    device: energy.DeviceProfile
    link: energy.LinkProfile
    step_flops: float
    bytes_up: int
    bytes_down: int

    @property
    def compute_seconds(self) -> float:
        return device_seconds(self.device, self.step_flops)

    def link_seconds(self, one_way_latency_ms: float | None = None) -> float:
        latency = self.link.latency_ms if one_way_latency_ms is None else one_way_latency_ms
        figures = LinkFigures(
            rtt=2 * latency / 1000,
            up_bytes_per_second=self.link.up_mbps * 1e6 / 8,
            down_bytes_per_second=self.link.down_mbps * 1e6 / 8,
        )
        return figures.seconds(self.bytes_up, self.bytes_down)

    @property
    def mean_seconds(self) -> float:
        return self.compute_seconds + self.link_seconds()

    def sample(self, rng: random.Random) -> float:
        """One step's pause: latency within the link's jitter each way, compute +-10 %."""
        jitter = self.link.jitter_ms
        one_way = [max(0.0, self.link.latency_ms + rng.uniform(-jitter, jitter)) for _ in "ud"]
        compute = self.compute_seconds * rng.uniform(1 - COMPUTE_JITTER, 1 + COMPUTE_JITTER)
        return compute + self.link_seconds(sum(one_way) / 2)

    @property
    def label(self) -> str:
        return f"{self.device.name}/{self.link.name}"


def device_seconds(device: energy.DeviceProfile, flops: float) -> float:
    """Seconds ``flops`` take on ``device``: the reference rate scaled by its profile."""
    reference = energy.device_profile(REFERENCE_DEVICE).relative_compute_speed
    rate = REFERENCE_FLOPS_PER_SECOND * device.relative_compute_speed / reference
    return flops / rate


def step_flops(student_head_forward: int, teacher_head_forward: int, batch: int) -> float:
    """One step's device FLOPs: the student head trained (forward, input and weight
    gradients: ``splitkd.flops.TRAIN_FORWARD_RATIO``), the frozen teacher head forward."""
    from splitkd.flops import TRAIN_FORWARD_RATIO

    return float(batch * (TRAIN_FORWARD_RATIO * student_head_forward + teacher_head_forward))


# The demo's device and link profiles; edge i of the loadtest gets entry i mod 4.
DEMO_MIX: list[tuple[str, str]] = list(DEMO_PROFILES)


def parse_mix(text: str) -> list[tuple[str, str]]:
    """``device/link,device/link``, each name checked against the profiles."""
    mix = []
    for item in text.split(","):
        device, _, link = item.strip().partition("/")
        energy.device_profile(device)  # raise InvalidArgument naming the known ones
        energy.link_profile(link)
        mix.append((device, link))
    return mix


def make_pace(profiles: tuple[str, str], step_flops: float, bytes_up: int, bytes_down: int) -> Pace:
    device, link = profiles
    return Pace(
        energy.device_profile(device), energy.link_profile(link), step_flops, bytes_up, bytes_down
    )
