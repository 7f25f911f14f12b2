"""The edge's Prometheus metrics: step latency by phase, traffic, energy, inference.

One ``EdgeMetrics`` per process, on its own registry (no global state, so
tests and the benchmark can make as many as they like). No device label: the
device is the scrape target, and the scrape configuration names it.

A process exports only what it does: ``train`` the training families,
``serve`` the inference ones, so that a dashboard never reads a zero from a
process that is not doing that work. Gauges without a value yet (accuracy
before the first evaluation) and the measured energy on a machine without an
energy counter are not exported at all.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from splitkd.telemetry import LATENCY_BUCKETS

PHASES = ("forward", "network", "backward")
ENERGY_COMPONENTS = ("compute", "idle", "radio")


class EdgeMetrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        training: bool = True,
        inference: bool = True,
        measured_energy: bool = False,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "splitkd_edge_info",
            "Always 1; labels name this edge's device and link profiles",
            ["device_id", "device_profile", "link_profile"],
            registry=r,
        )
        self.training = training
        self.inference = inference
        if training:
            self._training_families(measured_energy)
        if inference:
            self.inference_duration = Histogram(
                "splitkd_edge_inference_duration_seconds",
                "Time to answer one inference request with onnxruntime",
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
            self.inference_requests = Counter(
                "splitkd_edge_inference_requests",
                "Inference requests by outcome",
                ["outcome"],
                registry=r,
            )
            for outcome in ("ok", "error"):
                self.inference_requests.labels(outcome=outcome)

    def _training_families(self, measured_energy: bool) -> None:
        r = self.registry
        self.step_duration = Histogram(
            "splitkd_edge_step_duration_seconds",
            "Split-training step time by phase: device forward, network round trip, device backward",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "splitkd_edge_sent_bytes", "Bytes sent to the cloud (gRPC messages)", registry=r
        )
        self.received_bytes = Counter(
            "splitkd_edge_received_bytes",
            "Bytes received from the cloud (gRPC messages)",
            registry=r,
        )
        self.steps = Counter(
            "splitkd_edge_training_steps", "Split-training steps applied on this device", registry=r
        )
        self.loss = Gauge(
            "splitkd_edge_training_loss", "KD loss of the last training step", registry=r
        )
        self._accuracy: Gauge | None = None
        self.energy = Counter(
            "splitkd_edge_energy_joules",
            "Estimated device energy by component (docs/ENERGY.md)",
            ["component"],
            registry=r,
        )
        self.measured_energy: Counter | None = None
        if measured_energy:
            self.measured_energy = Counter(
                "splitkd_edge_measured_energy_joules",
                "Energy read from the machine's own counter (RAPL or hwmon)",
                registry=r,
            )
        # Create the labelled children now so every series exists from the first scrape.
        for phase in PHASES:
            self.step_duration.labels(phase=phase)
        for component in ENERGY_COMPONENTS:
            self.energy.labels(component=component)

    def describe_device(self, device_id: str, device_profile: str, link_profile: str) -> None:
        self.info.labels(
            device_id=device_id, device_profile=device_profile, link_profile=link_profile
        ).set(1)

    def observe_step(self, forward: float, network: float, backward: float, loss: float) -> None:
        self.step_duration.labels(phase="forward").observe(forward)
        self.step_duration.labels(phase="network").observe(network)
        self.step_duration.labels(phase="backward").observe(backward)
        self.steps.inc()
        self.loss.set(loss)

    def observe_accuracy(self, accuracy: float) -> None:
        if self._accuracy is None:  # registered at the first value: no fake 0 before it
            self._accuracy = Gauge(
                "splitkd_edge_training_accuracy",
                "Held-out accuracy of the split model (device head + cloud tail) after the last epoch",
                registry=self.registry,
            )
        self._accuracy.set(accuracy)

    def observe_traffic(self, up: int, down: int) -> None:
        self.sent_bytes.inc(up)
        self.received_bytes.inc(down)

    def observe_energy(self, compute: float, idle: float, radio: float) -> None:
        self.energy.labels(component="compute").inc(compute)
        self.energy.labels(component="idle").inc(idle)
        self.energy.labels(component="radio").inc(radio)

    def observe_measured(self, joules: float) -> None:
        if self.measured_energy is not None:
            self.measured_energy.inc(joules)

    def observe_inference(self, seconds: float | None) -> None:
        """One request: its duration, or None when it was refused."""
        if seconds is None:
            self.inference_requests.labels(outcome="error").inc()
        else:
            self.inference_requests.labels(outcome="ok").inc()
            self.inference_duration.observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on ``port`` from a background thread (for ``train``)."""
        start_http_server(port, addr=host, registry=self.registry)
