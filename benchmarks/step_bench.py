"""``make bench``: what the split costs, measured side by side in one run.

1. Step time: one split-KD step over loopback gRPC (edge heads forward, round
   trip, cloud tails, head backward) against the same KD step computed in one
   process (teacher and student whole). Goal: ratio <= 1.25.
2. Bytes on the wire per step, counted on the socket by a byte-counting TCP
   relay between the edge and the cloud (HTTP/2 framing and headers
   included), against the raw tensor bytes (activations, labels, gradient).
   Goal: ratio <= 1.02.
3. Metrics overhead: the Prometheus and energy bookkeeping of one step (edge
   and cloud) against the step time. Goal: <= 3%.

Blocks of steps alternate between the variants so that machine noise hits
both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.relay import CountingRelay
from cloud_service.metrics import CloudMetrics
from cloud_service.teacher import Teacher
from edge_agent.client import CloudClient
from edge_agent.metrics import EdgeMetrics
from edge_agent.telemetry import TrainingTelemetry
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, Shard
from splitkd.demo import free_port, wait_healthy
from splitkd.hyper import Hyperparameters
from splitkd.kd import kd_loss
from splitkd.models import zoo
from splitkd.training import batch_order, make_optimizer


def cloud_figures(http_port: int) -> tuple[float, float, float]:
    """Mean per step, from the cloud's /metrics: teacher tail compute (off the critical path
    when sent ahead), student tail compute, and the whole Step handler."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "splitkd_cloud_compute_duration_seconds":
                key = sample.labels["model"]
            elif (
                family.name == "splitkd_cloud_rpc_duration_seconds"
                and sample.labels.get("method") == "Step"
                and sample.labels.get("code") == "OK"
            ):
                key = "rpc"
            else:
                continue
            if sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
    return tuple(
        sums.get(k, 0.0) / max(counts.get(k, 0.0), 1.0) for k in ("teacher", "student", "rpc")
    )  # type: ignore[return-value]


def start_cloud(folder: Path, hyper: Hyperparameters) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "cloud_service.cli", "-q", "serve", "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--teacher", str(folder / "teacher.safetensors"), "--state-dir", str(folder),
        "--epochs", str(hyper.epochs), "--seed", str(hyper.seed), "--batch-size", str(hyper.batch_size),
    ]  # fmt: skip
    cloud = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{http_port}/healthz", cloud, folder / "cloud.log")
    return cloud, grpc_port, http_port


def timed_blocks(
    variants: dict[str, Callable[[], None]], blocks: int, steps: int
) -> dict[str, float]:
    """Median seconds per step of each variant, blocks interleaved."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, step in variants.items():
            started = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - started) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_bench", description=__doc__)
    parser.add_argument("--blocks", type=int, default=21, help="interleaved blocks per variant")
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument(
        "--batch", type=int, default=32, help="batch size (default: the default, 32)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_dataset("digits")
    split = edge_split(data, Shard(0, 2), presumed_fraction=DEMO_PRESUMED_FRACTION)
    hyper = Hyperparameters(epochs=1000, batch_size=args.batch)
    teacher_spec = zoo.default_teacher(data.signature)
    teacher = Teacher(teacher_spec, zoo.build(teacher_spec, 7), None, "digits")
    teacher.model.eval()
    folder = Path(tempfile.mkdtemp(prefix="splitkd-bench-"))
    teacher.save(folder / "teacher.safetensors")
    # The cloud is its own process, as in production: sharing this process's
    # GIL with the edge loop would charge the edge for the cloud's Python time.
    cloud, port, cloud_http = start_cloud(folder, hyper)
    relay = CountingRelay(port)

    # The reference: the same KD step, teacher and student whole, one process.
    student_spec = zoo.default_student(data.signature)
    student = zoo.build(student_spec, hyper.seed)
    optimizer = make_optimizer(student.parameters(), hyper)
    x_all, y_all = torch.from_numpy(split.train.x), torch.from_numpy(split.train.y)
    batches = [torch.from_numpy(ix) for ix in batch_order(len(split.train), hyper.batch_size, 0, 0)]
    full = [b for b in batches if len(b) == hyper.batch_size]
    counter = {"local": 0}

    def local_step() -> None:
        index = full[counter["local"] % len(full)]
        counter["local"] += 1
        with torch.no_grad():
            teacher_logits = teacher.model(x_all[index])
        loss = kd_loss(
            student(x_all[index]),
            teacher_logits,
            y_all[index],
            hyper.kd_alpha,
            hyper.kd_temperature,
        )
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()

    with (
        CloudClient(f"127.0.0.1:{port}") as client,
        CloudClient(f"127.0.0.1:{relay.port}") as relayed,
    ):
        session = client.register("bench", data.signature)
        trainer = EdgeTrainer(
            session,
            split.train,
            split.heldout,
            GrpcTransport(client, session),
        )
        step_number = {"n": 0}
        records = []

        def split_step() -> None:
            index = full[step_number["n"] % len(full)]
            ahead = full[(step_number["n"] + 1) % len(full)]
            records.append(
                trainer._step(
                    step_number["n"],
                    0,
                    x_all[index],
                    split.train.y[index.numpy()],
                    None,
                    x_all[ahead],
                )
            )
            step_number["n"] += 1

        for _ in range(20):  # warm-up: connection, allocator, first-call costs
            local_step()
            split_step()
        seconds = timed_blocks(
            {"in-process": local_step, "split over gRPC": split_step}, args.blocks, args.steps
        )

        records_timed = list(records)
        teacher_s, student_s, handler_s = cloud_figures(cloud_http)
        # Wire bytes over a fresh run of steps through the relay, against the
        # tensors' own bytes (same session: steps go on where timing stopped).
        trainer.transport = GrpcTransport(relayed, session)
        records.clear()
        up0, down0 = relay.snapshot()
        wire_steps = 100
        for _ in range(wire_steps):
            split_step()
        time.sleep(0.2)  # let the relay threads count the last bytes
        up1, down1 = relay.snapshot()
        act = zoo.activation_elements(session.student_spec, session.student_cut)
        teacher_act = zoo.activation_elements(session.teacher_spec, session.teacher_cut)
        batch = hyper.batch_size
        raw_up = batch * (act + teacher_act) * 4 + batch * 8  # float32 activations + int64 labels
        raw_down = batch * act * 4  # float32 gradient
        wire_up, wire_down = (up1 - up0) / wire_steps, (down1 - down0) / wire_steps

        # Metrics: the bookkeeping of one step on both sides, timed alone.
        telemetry = TrainingTelemetry("raspberry-pi-4", "wifi", EdgeMetrics(inference=False))
        cloud_metrics = CloudMetrics()
        record = records[-1]
        repeats = 5000
        started = time.perf_counter()
        for _ in range(repeats):
            telemetry.on_traffic(record.bytes_up, record.bytes_down)
            telemetry.on_step(record)
            cloud_metrics.observe_rpc("Step", "OK", 0.001, 100_000, 20_000)
            cloud_metrics.observe_step(0.001, 0.001)
        metrics_seconds = (time.perf_counter() - started) / repeats
    cloud.terminate()
    cloud.wait(10)

    ratio = seconds["split over gRPC"] / seconds["in-process"]
    print(
        f"split-KD step, digits default models, batch {batch} (medians of {args.blocks} x {args.steps} steps)"
    )
    print(f"  in-process KD step     {1000 * seconds['in-process']:8.3f} ms")
    print(f"  split step over gRPC   {1000 * seconds['split over gRPC']:8.3f} ms")
    print(f"  ratio                  {ratio:8.3f}   (goal <= 1.25)")
    timed = records_timed[-args.blocks * args.steps :]
    phase = {
        name: 1000 * statistics.median(getattr(r, f"{name}_seconds") for r in timed)
        for name in ("forward", "network", "backward")
    }
    print(
        f"  split step by phase (medians): device forward {phase['forward']:.3f} ms, "
        f"round trip {phase['network']:.3f} ms (cloud means: Step handler {1000 * handler_s:.3f} ms, "
        f"student tail {1000 * student_s:.3f} ms, teacher tail {1000 * teacher_s:.3f} ms sent ahead), "
        f"device backward {phase['backward']:.3f} ms"
    )
    print("bytes per step on the socket (HTTP/2 frames + headers) vs raw tensor bytes")
    print(
        f"  up    {wire_up:10.0f} B on the wire, {raw_up:10d} B raw, ratio {wire_up / raw_up:.4f}"
    )
    print(
        f"  down  {wire_down:10.0f} B on the wire, {raw_down:10d} B raw, ratio {wire_down / raw_down:.4f}"
    )
    total_ratio = (wire_up + wire_down) / (raw_up + raw_down)
    print(f"  both  ratio {total_ratio:.4f}   (goal <= 1.02)")
    overhead = metrics_seconds / seconds["split over gRPC"]
    print("metrics and energy bookkeeping per step (edge + cloud)")
    print(
        f"  {1e6 * metrics_seconds:.1f} us per step = {100 * overhead:.2f}% of the split step   (goal <= 3%)"
    )


if __name__ == "__main__":
    main()
