"""The cloud's Prometheus metrics: RPC latency by method and status, sessions, traffic, compute.

Labels stay bounded: ``method`` is one of the service's five RPCs, ``code`` a
gRPC status name, ``model`` teacher or student. Never a session or device id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from splitkd.telemetry import LATENCY_BUCKETS

METHODS = (
    "Register",
    "Step",
    "Evaluate",
    "Finish",
    "DownloadModel",
    "Resume",
    "Heartbeat",
    "JoinCohort",
    "FetchRound",
    "SubmitUpdate",
    "OpenAdaptation",
    "ReportKnowledge",
)


class CloudMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_duration = Histogram(
            "splitkd_cloud_rpc_duration_seconds",
            "Time to answer one gRPC call, by method and status code",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "splitkd_cloud_sessions", "Active split-training sessions", registry=r
        )
        self.teacher_cache_bytes = Gauge(
            "splitkd_cloud_teacher_cache_bytes",
            "Memory of the sessions' teacher-output caches: allocated, or reserved (the budget "
            "--teacher-cache-mb bounds the reserved bytes)",
            ["kind"],
            registry=r,
        )
        self.steps = Counter(
            "splitkd_cloud_training_steps",
            "Split-training steps applied (all sessions)",
            registry=r,
        )
        self.received_bytes = Counter(
            "splitkd_cloud_received_bytes",
            "Bytes of gRPC requests received",
            ["method"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "splitkd_cloud_sent_bytes", "Bytes of gRPC responses sent", ["method"], registry=r
        )
        self.compute_duration = Histogram(
            "splitkd_cloud_compute_duration_seconds",
            "Cloud compute per step: teacher tail forward, student tail forward + backward",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.models_published = Counter(
            "splitkd_cloud_models_published",
            "ONNX students exported, checked and published",
            registry=r,
        )
        self.cohort_round = Gauge(
            "splitkd_cloud_cohort_round", "Last closed round of each cohort", ["cohort"], registry=r
        )
        self.cohort_devices = Gauge(
            "splitkd_cloud_cohort_devices",
            "Devices that joined each cohort",
            ["cohort"],
            registry=r,
        )
        self.cohort_accuracy = Gauge(
            "splitkd_cloud_cohort_accuracy",
            "Sample-weighted held-out accuracy the cohort's devices reported in its last round",
            ["cohort"],
            registry=r,
        )
        self.server_model_version = Gauge(
            "splitkd_cloud_server_model_version",
            "Version of the server model (teacher); federated cohorts teach it new versions",
            registry=r,
        )
        self.server_model_version.set(1)
        for method in METHODS:
            self.received_bytes.labels(method=method)
            self.sent_bytes.labels(method=method)
            self.rpc_duration.labels(method=method, code="OK")
        self._teacher_compute = self.compute_duration.labels(model="teacher")
        self._student_compute = self.compute_duration.labels(model="student")
        # (method, code) -> its duration histogram and byte counters (observe_rpc).
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def track_sessions(self, count: Callable[[], int]) -> None:
        """Read the active session count at scrape time (never stale)."""
        self.sessions.set_function(lambda: float(count()))

    def track_teacher_cache(self, sizes: Callable[[], tuple[int, int]]) -> None:
        """Read (allocated, reserved) cache bytes at scrape time."""
        self.teacher_cache_bytes.labels(kind="allocated").set_function(lambda: float(sizes()[0]))
        self.teacher_cache_bytes.labels(kind="reserved").set_function(lambda: float(sizes()[1]))

    def observe_rpc(self, method: str, code: str, seconds: float, received: int, sent: int) -> None:
        # Every call lands here: the labelled children are looked up once, not per call.
        children = self._rpc_children.get((method, code))
        if children is None:
            children = (
                self.rpc_duration.labels(method=method, code=code),
                self.received_bytes.labels(method=method),
                self.sent_bytes.labels(method=method),
            )
            self._rpc_children[(method, code)] = children
        children[0].observe(seconds)
        children[1].inc(received)
        children[2].inc(sent)

    def observe_step(self, teacher_seconds: float, student_seconds: float) -> None:
        self.steps.inc()
        self._teacher_compute.observe(teacher_seconds)
        self._student_compute.observe(student_seconds)

    def observe_round(
        self, cohort: str, round_number: int, devices: int, accuracy: float, server_version: int
    ) -> None:
        self.cohort_round.labels(cohort=cohort).set(round_number)
        self.cohort_devices.labels(cohort=cohort).set(devices)
        self.cohort_accuracy.labels(cohort=cohort).set(accuracy)
        if server_version:
            self.server_model_version.set(server_version)
