"""``splitkd-cloud``: the cloud teacher service.

Every option also reads an environment variable (``SPLITKD_`` + the option's
name in capitals), so a container or a systemd unit configures it without
flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cloud_service import admin_cli, security
from splitkd.env import env
from splitkd.errors import SplitKDError

log = logging.getLogger("splitkd.cloud")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitkd-cloud",
        description="The splitkd cloud: holds the teacher, finishes split-KD training steps for edge "
        "devices over gRPC, exports the distilled student to ONNX and serves it over HTTP.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=1, help="more log detail (-vv for debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_const", const=0, dest="verbose", help="warnings only"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC training service and the HTTP API")
    serve.add_argument(
        "--host", default=env("HOST", "0.0.0.0"), help="address to listen on (SPLITKD_HOST)"
    )
    serve.add_argument(
        "--grpc-port",
        type=int,
        default=int(env("GRPC_PORT", "50051") or 50051),
        help="gRPC port for edge agents (SPLITKD_GRPC_PORT, default 50051)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=int(env("HTTP_PORT", "8000") or 8000),
        help="HTTP port: /healthz, /v1/models, /v1/sessions (SPLITKD_HTTP_PORT, default 8000)",
    )
    source = serve.add_mutually_exclusive_group()
    source.add_argument(
        "--teacher",
        type=Path,
        default=env("TEACHER"),
        help="teacher checkpoint (.safetensors from 'splitkd-cloud train-teacher')",
    )
    source.add_argument(
        "--teacher-data",
        default=env("TEACHER_DATA", "digits"),
        help="train the teacher at start-up on this data: digits, npz:PATH or csv:PATH "
        "(default digits); all of a file but its held-out 20 %% unless --presumed-fraction",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=Path(env("STATE_DIR", ".splitkd-cloud") or "."),
        help="where models and the trained teacher are kept (SPLITKD_STATE_DIR)",
    )
    _training_options(serve)
    serve.add_argument(
        "--max-message-mb", type=float, default=16.0, help="largest gRPC message accepted (MiB)"
    )
    serve.add_argument(
        "--session-timeout",
        type=float,
        default=900.0,
        help="seconds of silence after which a session expires",
    )
    serve.add_argument(
        "--max-steps-per-second",
        type=float,
        default=float(env("MAX_STEPS_PER_SECOND", "400") or 400),
        help="per device: more steps than this get RESOURCE_EXHAUSTED (SPLITKD_MAX_STEPS_PER_SECOND; "
        "default %(default)s; 0 = no limit)",
    )
    security.add_arguments(serve)

    train = sub.add_parser("train-teacher", help="train a teacher on the cloud's data and save it")
    train.add_argument("--data", default="digits", help="digits, npz:PATH or csv:PATH")
    train.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    _presumed_option(train)
    admin_cli.add_commands(sub)
    return parser


def _presumed_option(parser: argparse.ArgumentParser) -> None:
    from splitkd.data.partition import DEMO_PRESUMED_FRACTION

    fraction = env("PRESUMED_FRACTION")
    parser.add_argument(
        "--presumed-fraction",
        type=float,
        default=None if fraction is None else float(fraction),
        help="when the edges are handed the same data set: the share of it the teacher trains "
        "on (its 'presumed' data), which those edges then never use (SPLITKD_PRESUMED_FRACTION; "
        f"default {DEMO_PRESUMED_FRACTION} for the built-in digits, and all of a file of yours)",
    )


def _training_options(parser: argparse.ArgumentParser) -> None:
    from splitkd.hyper import Hyperparameters

    d = Hyperparameters()
    _presumed_option(parser)
    group = parser.add_argument_group("training (sent to every edge with its session)")
    group.add_argument(
        "--student-cut", type=int, default=1, help="student stages on the device (default 1)"
    )
    group.add_argument(
        "--teacher-cut", type=int, default=1, help="frozen teacher stages on the device (default 1)"
    )
    group.add_argument(
        "--epochs", type=int, default=d.epochs, help=f"default epochs per edge (default {d.epochs})"
    )
    group.add_argument("--batch-size", type=int, default=d.batch_size)
    group.add_argument("--learning-rate", type=float, default=d.learning_rate)
    group.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer)
    group.add_argument(
        "--kd-alpha", type=float, default=d.kd_alpha, help="weight of the KD term (default 0.9)"
    )
    group.add_argument(
        "--kd-temperature",
        type=float,
        default=d.kd_temperature,
        help="softmax temperature (default 4)",
    )
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument(
        "--wire-dtype",
        choices=["float32", "float16"],
        default=d.wire_dtype,
        help="dtype of activations and gradients on the wire",
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between session checkpoints on both sides; a fault repeats at most this many "
        f"steps (default {d.checkpoint_every})",
    )


def _serve(args: argparse.Namespace) -> None:
    import torch

    from cloud_service.checkpoints import SessionCheckpoints
    from cloud_service.limits import RateLimiter
    from cloud_service.registry import ModelRegistry
    from cloud_service.server import ServeOptions, serve
    from cloud_service.service import CloudConfig, CloudService
    from cloud_service.sessions import SessionStore
    from cloud_service.teacher import Teacher, train_teacher
    from splitkd.hyper import Hyperparameters

    # TLS files and the device registry are checked before minutes of teacher training.
    cloud_security = security.CloudSecurity.from_args(args)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    hyper = Hyperparameters(
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        epochs=args.epochs,
        kd_alpha=args.kd_alpha,
        kd_temperature=args.kd_temperature,
        seed=args.seed,
        wire_dtype=args.wire_dtype,
        checkpoint_every=args.checkpoint_every,
    )
    if args.teacher:
        teacher = Teacher.load(Path(args.teacher))
        log.info(
            "teacher loaded from %s: %s, trained on %s samples",
            args.teacher,
            teacher.spec.describe(),
            teacher.samples or "an unrecorded number of",
        )
    else:
        teacher = train_teacher(args.teacher_data, presumed_fraction=args.presumed_fraction)
        teacher.save(args.state_dir / "teacher.safetensors")
    # Serving: each step's tensors are tiny, so intra-op threads cost more in
    # synchronisation than they give; sessions run in parallel on gRPC's pool.
    torch.set_num_threads(1)
    service = CloudService(
        teacher,
        ModelRegistry(args.state_dir / "models"),
        SessionStore(idle_timeout=args.session_timeout),
        CloudConfig(student_cut=args.student_cut, teacher_cut=args.teacher_cut, hyper=hyper),
        checkpoints=SessionCheckpoints(args.state_dir / "sessions"),
        limiter=RateLimiter(args.max_steps_per_second),
    )
    serve(
        service,
        ServeOptions(
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024),
            security=cloud_security,
        ),
    )


def _train_teacher(args: argparse.Namespace) -> None:
    from cloud_service.teacher import train_teacher

    teacher = train_teacher(args.data, presumed_fraction=args.presumed_fraction)
    teacher.save(args.out)
    samples = teacher.samples
    print(
        f"teacher {teacher.spec.describe()}: {teacher.parameters} parameters, "
        f"held-out accuracy {teacher.accuracy:.4f} ({samples['train']} training, "
        f"{samples['heldout']} held-out samples, {samples['set_aside']} set aside for the edges), "
        f"saved to {args.out}"
    )


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    args = _parser().parse_args(argv)
    configure(args.verbose)
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command in admin_cli.COMMANDS:
            return admin_cli.run(args)
        else:
            _train_teacher(args)
    except SplitKDError as exc:
        print(f"splitkd-cloud: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"splitkd-cloud: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
