"""What both sides' Prometheus metrics share: bucket boundaries and the exposition.

Buckets span what we see: ~0.1 ms for a forward pass of a small head on a
laptop, a few ms for a loopback round trip, hundreds of ms on LTE, seconds
on NB-IoT or a Pi under load. Roughly x2.5 apart, so p50/p95/p99 are read
within one bucket's error on every link.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)

# Every counter and histogram would also export a ``_created`` series: twice the
# series for a timestamp Prometheus does not need (it sees resets itself).
disable_created_metrics()

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
