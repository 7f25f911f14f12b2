"""``splitkd-edge``: split training against a splitkd cloud, and ONNX inference.

``serve``, ``predict`` and ``pull`` need only the base install (onnxruntime,
no torch); ``train`` needs the ``[train]`` extra. Options read environment
variables named ``SPLITKD_`` + the option in capitals (e.g. SPLITKD_CLOUD).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from edge_agent import security
from splitkd.env import env
from splitkd.errors import SplitKDError


def _parser() -> argparse.ArgumentParser:
    from edge_agent.model_store import default_model_dir

    parser = argparse.ArgumentParser(
        prog="splitkd-edge",
        description="The splitkd edge agent: trains a small student with a cloud teacher by split "
        "knowledge distillation (raw data never leaves this device), then serves it with onnxruntime.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_dir = argparse.ArgumentParser(add_help=False)
    model_dir.add_argument(
        "--model-dir",
        type=Path,
        default=default_model_dir(),
        help="local model directory (SPLITKD_MODEL_DIR; default %(default)s)",
    )

    train = sub.add_parser(
        "train",
        parents=[model_dir],
        help="split-train a student, then download and verify it",
        description="Split-train with the cloud: this device runs the student's head and the "
        "teacher's frozen head on its data and sends only activations; the cloud sends back "
        "gradients. At the end the ONNX student is downloaded, verified and evaluated here.",
    )
    train.add_argument(
        "--cloud",
        default=env("CLOUD"),
        required=env("CLOUD") is None,
        help="cloud gRPC address HOST:PORT (SPLITKD_CLOUD)",
    )
    train.add_argument(
        "--data",
        default=env("DATA"),
        required=env("DATA") is None,
        help="local data: digits, npz:PATH (arrays x, y) or csv:PATH (numbers, label last, "
        "optional header row) (SPLITKD_DATA). Labels are the task's class numbers (the "
        "teacher's); a device may hold only some of the classes",
    )
    train.add_argument(
        "--shard", default=env("SHARD"), help="use shard I of N of the data (I from 0), e.g. 0/2"
    )
    train.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=None,
        help="non-IID shards: Dirichlet concentration per class (default: IID)",
    )
    fraction = env("PRESUMED_FRACTION")
    train.add_argument(
        "--presumed-fraction",
        type=float,
        default=None if fraction is None else float(fraction),
        help="when the cloud was handed the same data set: the share its teacher trains on, "
        "which this device then leaves out (SPLITKD_PRESUMED_FRACTION; default 0.4 for the "
        "built-in digits, 0 for a file: all of it is used)",
    )
    train.add_argument(
        "--class-weighting",
        choices=["none", "balanced"],
        default=env("CLASS_WEIGHTING", "none"),
        help="weights of the cross-entropy term per class: 'balanced' weighs each class by the "
        "inverse of its frequency in this device's training labels, for imbalanced data; the "
        "weights are sent to the cloud, which computes the loss (SPLITKD_CLASS_WEIGHTING; "
        "default %(default)s)",
    )
    train.add_argument(
        "--device-id",
        default=env("DEVICE_ID", socket.gethostname()),
        help="this device's id (SPLITKD_DEVICE_ID; default the host name)",
    )
    train.add_argument("--epochs", type=int, default=0, help="epochs (default: the cloud's)")
    train.add_argument(
        "--report",
        type=Path,
        default=Path(env("REPORT", "report.json") or "report.json"),
        help="JSON run report to write (default report.json)",
    )
    train.add_argument(
        "--device-profile",
        default=env("DEVICE_PROFILE", "laptop-x86"),
        help="device power profile for the energy estimate: raspberry-pi-4, raspberry-pi-5, "
        "jetson-nano or laptop-x86 (SPLITKD_DEVICE_PROFILE; default %(default)s; docs/ENERGY.md)",
    )
    train.add_argument(
        "--link-profile",
        default=env("LINK_PROFILE", "ethernet"),
        help="network link profile for the radio energy estimate: ethernet, wifi, lte or nb-iot "
        "(SPLITKD_LINK_PROFILE; default %(default)s)",
    )
    train.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("METRICS_PORT", "0") or 0),
        help="serve Prometheus metrics on this port while training (SPLITKD_METRICS_PORT; "
        "default 0: off)",
    )
    train.add_argument(
        "--metrics-host",
        default=env("METRICS_HOST", "0.0.0.0"),
        help="address for --metrics-port (SPLITKD_METRICS_HOST; default %(default)s)",
    )
    train.add_argument(
        "--metrics-linger",
        type=float,
        default=float(env("METRICS_LINGER", "0") or 0),
        help="keep /metrics up this many seconds after training so Prometheus scrapes the final "
        "figures (SPLITKD_METRICS_LINGER; default 0; report.json always has them exactly)",
    )
    train.add_argument("--no-plots", action="store_true", help="no PNG plots beside the report")
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where this device keeps its training checkpoints, to resume after a reboot or a "
        "lost link (SPLITKD_CHECKPOINT_DIR; default $XDG_STATE_HOME/splitkd/DEVICE_ID)",
    )
    train.add_argument(
        "--fresh",
        action="store_true",
        help="start a new session even if a checkpoint of an unfinished one exists",
    )
    train.add_argument(
        "--retry-seconds",
        type=float,
        default=float(env("RETRY_SECONDS", "300") or 300),
        help="keep retrying an unreachable cloud for this long before giving up "
        "(SPLITKD_RETRY_SECONDS; default %(default)s)",
    )
    train.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for one cloud call"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    security.add_client_arguments(train)

    serve = sub.add_parser(
        "serve", parents=[model_dir], help="HTTP inference API over the current student"
    )
    serve.add_argument(
        "--host", default=env("HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=int(env("HTTP_PORT", "8001") or 8001),
        help="port (SPLITKD_HTTP_PORT; default 8001)",
    )
    serve.add_argument(
        "--device-id",
        default=env("DEVICE_ID", socket.gethostname()),
        help="this device's id, shown in splitkd_edge_info (SPLITKD_DEVICE_ID; default the host name)",
    )
    serve.add_argument("--device-profile", default=env("DEVICE_PROFILE", "laptop-x86"))
    serve.add_argument("--link-profile", default=env("LINK_PROFILE", "ethernet"))
    security.add_https_arguments(serve)

    predict = sub.add_parser(
        "predict",
        parents=[model_dir],
        help="classify once from the command line",
        description="Classify samples from a .npy or .json file (one sample or a batch) "
        "or from --json, with the current student.",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help=".npy or .json file")
    source.add_argument("--json", help="inline JSON array")

    pull = sub.add_parser(
        "pull", parents=[model_dir], help="download a student over HTTP (no torch needed)"
    )
    pull.add_argument(
        "--cloud-http",
        default=env("CLOUD_HTTP"),
        required=env("CLOUD_HTTP") is None,
        help="cloud HTTP base URL, e.g. http://cloud:8000 (SPLITKD_CLOUD_HTTP)",
    )
    pull.add_argument("--model", required=True, help="model name, e.g. student-edge-0")
    pull.add_argument("--version", type=int, default=0, help="version (default: latest)")
    pull.add_argument(
        "--device-id",
        default=env("DEVICE_ID", socket.gethostname()),
        help="this device's id, sent with --credential (SPLITKD_DEVICE_ID; default the host name)",
    )
    security.add_client_arguments(pull)
    return parser


def _train(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        raise SplitKDError(
            "training needs the [train] extra: pip install 'splitkd[train]'"
        ) from None
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.model_store import default_checkpoint_dir
    from edge_agent.run import TrainOptions, train
    from splitkd import energy
    from splitkd.data.partition import parse_shard

    # Check the profiles before any work: a typo should not cost a training run.
    energy.device_profile(args.device_profile)
    energy.link_profile(args.link_profile)
    torch.set_num_threads(1)  # small heads: threads cost more than they give
    metrics = None
    if args.metrics_port:
        from splitkd.energy_counter import EnergyCounter

        metrics = EdgeMetrics(inference=False, measured_energy=EnergyCounter().available)
        metrics.serve(args.metrics_port, args.metrics_host)
    options = TrainOptions(
        cloud=args.cloud,
        data=args.data,
        shard=parse_shard(args.shard) if args.shard else None,
        device_id=args.device_id,
        report=args.report,
        model_dir=args.model_dir,
        epochs=args.epochs,
        dirichlet_alpha=args.dirichlet_alpha,
        presumed_fraction=args.presumed_fraction,
        class_weighting=args.class_weighting,
        device_profile=args.device_profile,
        link_profile=args.link_profile,
        progress=not args.no_progress,
        timeout=args.timeout,
        metrics=metrics,
        plots=not args.no_plots,
        checkpoint_dir=args.checkpoint_dir or default_checkpoint_dir(args.device_id),
        fresh=args.fresh,
        retry_seconds=args.retry_seconds,
        security=security.EdgeSecurity.from_args(args),
    )
    report = train(options)
    student, data = report["student"], report["data"]
    print(
        f"{args.device_id}: student {student['name']} v{student['version']} accuracy {student['accuracy']:.4f}, "
        f"macro recall {student['macro_recall']:.4f} (onnxruntime, {data['heldout_samples']} held-out samples), "
        f"{report['steps']} steps, "
        f"{report['traffic']['bytes_up'] / 1e6:.2f} MB up / {report['traffic']['bytes_down'] / 1e6:.2f} MB down, "
        f"{report['wall_seconds']:.1f} s, est. {report['energy']['estimate_joules']['total']:.1f} J "
        f"({report['energy']['device_profile']}, {report['energy']['link_profile']}); "
        f"report: {args.report}\n"
        f"{args.device_id}: data {data['spec']}: {data['train_samples']} training, "
        f"{data['heldout_samples']} held-out samples, {data['set_aside_samples']} set aside for "
        f"the cloud, {data['other_shard_samples']} in other shards; classes seen "
        f"{data['classes_seen']} of {data['signature']}"
    )
    if metrics is not None and args.metrics_linger > 0:
        import time

        time.sleep(args.metrics_linger)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_agent.http_api import create_app
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.model_store import ModelStore

    metrics = EdgeMetrics(training=False)
    metrics.describe_device(args.device_id, args.device_profile, args.link_profile)
    uvicorn.run(
        create_app(ModelStore(args.model_dir), metrics),
        host=args.host,
        port=args.http_port,
        log_level="warning",
        access_log=False,
        **security.https_options(args),
    )
    return 0


def _load_inputs(args: argparse.Namespace) -> Any:
    import numpy as np

    if args.json is not None:
        try:
            return np.asarray(json.loads(args.json), dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise SplitKDError(f"--json is not a numeric JSON array: {exc}") from None
    path: Path = args.input
    if not path.is_file():
        raise SplitKDError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32)
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    except (ValueError, TypeError, OSError) as exc:
        raise SplitKDError(f"{path}: cannot read numeric inputs ({exc})") from None


def _predict(args: argparse.Namespace) -> int:
    from edge_agent.inference import Predictor
    from edge_agent.model_store import ModelStore

    model = ModelStore(args.model_dir).current()
    predictor = Predictor(model.path, tuple(model.metadata["input_shape"]))
    result = predictor.predict(_load_inputs(args))
    out = {
        "model": {"name": model.name, "version": model.version},
        "predictions": [
            {"class": int(c), "probabilities": [round(float(p), 6) for p in probs]}
            for c, probs in zip(result.classes, result.probabilities, strict=True)
        ],
    }
    print(json.dumps(out))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from edge_agent.model_store import ModelStore
    from edge_agent.pull import pull

    edge_security = security.EdgeSecurity.from_args(args)
    model = pull(
        args.cloud_http,
        args.model,
        args.version,
        ModelStore(args.model_dir),
        headers=dict(edge_security.call_metadata(args.device_id)),
        context=edge_security.tls.ssl_context() if edge_security.tls is not None else None,
    )
    print(
        f"installed {model.name} v{model.version} ({model.metadata['size_bytes']} bytes, "
        f"SHA-256 {model.metadata['sha256'][:12]}…) in {model.path.parent}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    args = _parser().parse_args(argv)
    configure(args.verbose)
    handlers = {"train": _train, "serve": _serve, "predict": _predict, "pull": _pull}
    try:
        return handlers[args.command](args)
    except SplitKDError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
