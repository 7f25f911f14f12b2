"""``make bench`` (wire table): bytes and accuracy of each wire codec, side by side.

The demo's job (digits, two edges, the cloud's default hyperparameters and
seed) is trained once per wire configuration over real loopback gRPC, through
a byte-counting TCP relay (HTTP/2 framing included). The first row is the wire
before the frugal one (float32, student cut 1, teacher activations every
epoch, evaluation every epoch); every other row uses the teacher-output cache.
Printed per configuration: mean held-out accuracy of the two students through
the split, bytes per step (the edge's own count), MB per edge on the socket,
and the ratio to the old wire. The accuracy column is compared with float32
at the same cut (goal: within 0.5 points, else the table says by how much).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.relay import CountingRelay
from cloud_service.registry import ModelRegistry
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.teacher import Teacher, train_teacher
from edge_agent.client import CloudClient
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, Shard
from splitkd.demo import DEMO_EVAL_EVERY, DEMO_STUDENT_CUT, DEMO_WIRE_CODEC
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionAsk


@dataclass(frozen=True)
class Wire:
    codec: str
    cut: int
    cache: bool = True
    eval_every: int = DEMO_EVAL_EVERY

    @property
    def label(self) -> str:
        cache = "cache" if self.cache else "no cache"
        return f"{self.codec}, cut {self.cut}, {cache}, eval/{self.eval_every}"


OLD_WIRE = Wire("float32", 1, cache=False, eval_every=1)
WIRES = [
    OLD_WIRE,
    *(Wire(c, 1) for c in ("float32", "float16", "int8", "int8-stochastic", "topk")),
    *(Wire(c, 2) for c in ("float32", "float16", "int8", "int8-stochastic", "topk")),
]


@dataclass
class Figures:
    accuracy: float
    socket_bytes: int  # up + down on the relay, per edge
    step_up: float  # mean bytes per training step, the edge's count
    step_down: float
    seconds: float


def run_edge(teacher: Teacher, wire: Wire, edge: int, workdir: Path) -> Figures:
    data = load_dataset("digits")
    split = edge_split(data, Shard(edge, 2), presumed_fraction=DEMO_PRESUMED_FRACTION)
    service = CloudService(
        teacher,
        ModelRegistry(workdir / "models"),
        SessionStore(),
        CloudConfig(hyper=Hyperparameters()),
    )
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    relay = CountingRelay(port)
    started = time.perf_counter()
    try:
        with CloudClient(f"127.0.0.1:{relay.port}") as client:
            ask = SessionAsk(wire.codec, len(split.train) if wire.cache else 0, wire.cut)
            session = client.register(f"edge-{edge}", data.signature, ask=ask)
            trainer = EdgeTrainer(
                session, split.train, split.heldout, GrpcTransport(client, session)
            )
            trainer.eval_every = wire.eval_every
            result = trainer.run(
                traffic=lambda: (client.traffic.bytes_up, client.traffic.bytes_down)
            )
        relay.wait_closed(5.0)
    finally:
        server.stop(0)
    steps = [r for r in result.history if not r.replayed]
    return Figures(
        accuracy=result.evaluations[-1].accuracy,
        socket_bytes=relay.up + relay.down,
        step_up=statistics.fmean(r.bytes_up for r in steps),
        step_down=statistics.fmean(r.bytes_down for r in steps),
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wire_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the old wire and the demo's only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wires = WIRES
    if args.quick:
        wires = [OLD_WIRE, Wire(DEMO_WIRE_CODEC, DEMO_STUDENT_CUT)]
    print("wire table: the demo's job (digits, 2 edges, 60 epochs), one run per wire")
    teacher = train_teacher("digits", presumed_fraction=DEMO_PRESUMED_FRACTION)
    rows: dict[Wire, list[Figures]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, wire in enumerate(wires):
            rows[wire] = [
                run_edge(teacher, wire, edge, Path(tmp) / f"{i}-{edge}") for edge in (0, 1)
            ]
            print(f"  {wire.label}: done", file=sys.stderr, flush=True)
    _print(rows)
    return 0


def _print(rows: dict[Wire, list[Figures]]) -> None:
    old = statistics.fmean(f.socket_bytes for f in rows[OLD_WIRE])
    reference = {w.cut: _accuracy(f) for w, f in rows.items() if w.codec == "float32" and w.cache}
    header = ("wire", "accuracy", "vs float32", "B/step up", "B/step down", "MB/edge", "old/this")
    table = [header]
    for wire, figures in rows.items():
        accuracy = _accuracy(figures)
        delta = accuracy - reference.get(wire.cut, accuracy) if wire.cache else 0.0
        verdict = f"{100 * delta:+.1f} pt" + ("" if delta >= -0.005 else " (off)")
        mb = statistics.fmean(f.socket_bytes for f in figures)
        table.append(
            (
                wire.label + (" (the old wire)" if wire == OLD_WIRE else ""),
                f"{accuracy:.4f}",
                verdict if wire.cache else "",
                f"{statistics.fmean(f.step_up for f in figures):,.0f}",
                f"{statistics.fmean(f.step_down for f in figures):,.0f}",
                f"{mb / 1e6:.2f}",
                f"{old / mb:.1f}x",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    demo = rows.get(Wire(DEMO_WIRE_CODEC, DEMO_STUDENT_CUT))
    if demo is not None:
        ratio = old / statistics.fmean(f.socket_bytes for f in demo)
        print(
            f"  the demo's wire ({DEMO_WIRE_CODEC}, cut {DEMO_STUDENT_CUT}): {ratio:.1f}x fewer "
            f"bytes than the old wire (goal >= 20x), accuracy {_accuracy(demo):.4f} vs "
            f"{_accuracy(rows[OLD_WIRE]):.4f}"
        )


def _accuracy(figures: list[Figures]) -> float:
    return statistics.fmean(f.accuracy for f in figures)


if __name__ == "__main__":
    sys.exit(main())
