"""``splitkd-cloud``: the cloud teacher service.

Each command's options are one settings class in :mod:`cloud_service.settings`:
flags, ``SPLITKD_*`` variables (so a container or a systemd unit configures it
without flags) and a config file, see :mod:`splitkd.settings`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cloud_service import admin_cli, lifecycle_cli, security
from cloud_service.settings import ServeSettings, TrainTeacherSettings
from splitkd.errors import SplitKDError
from splitkd.settings import Command, Program

log = logging.getLogger("splitkd.cloud")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=1, help="more log detail (-vv for debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_const", const=0, dest="verbose", help="warnings only"
    )


def _serve(args: ServeSettings) -> int:
    import torch

    from cloud_service.limits import RateLimiter
    from cloud_service.server import ServeOptions, serve
    from cloud_service.service import CloudConfig, CloudService
    from cloud_service.sessions import SessionStore
    from cloud_service.teacher import Teacher, train_teacher
    from splitkd.hyper import Hyperparameters

    if not 1 <= args.grpc_workers <= 256:
        raise SplitKDError(f"--grpc-workers must be in 1..256, got {args.grpc_workers}")
    # TLS files and the device registry are checked before minutes of teacher training.
    cloud_security = security.CloudSecurity.from_options(args, args.state_dir)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    hyper = Hyperparameters(
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        epochs=args.epochs,
        kd_alpha=args.kd_alpha,
        kd_temperature=args.kd_temperature,
        seed=args.seed,
        wire_codec=args.wire_dtype or args.wire_codec,
        topk_ratio=args.topk_ratio,
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
    elif args.teacher_hf:
        from cloud_service.hf_teacher import load_hf_teacher

        teacher = load_hf_teacher(Path(args.teacher_hf))
    else:
        teacher = train_teacher(args.teacher_data, presumed_fraction=args.presumed_fraction)
        teacher.save(args.state_dir / lifecycle_cli.TEACHER_FILE)
    # Serving: each step's tensors are tiny, so intra-op threads cost more in
    # synchronisation than they give; sessions run in parallel on gRPC's pool.
    torch.set_num_threads(1)
    # The first optimizer a process makes imports torch._dynamo (seconds): pay it now,
    # not inside the first Register, where a paused replica looks dead to Envoy.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    from cloud_service.batcher import TEACHER_BATCHER

    TEACHER_BATCHER.enabled = not args.no_teacher_batching
    TEACHER_BATCHER.window_seconds = max(0.0, args.teacher_batch_ms) / 1000
    from cloud_service.compute import TENSOR_WORK

    TENSOR_WORK.enabled = not args.parallel_tensor_work
    checkpoints = _session_checkpoints(args)
    service = CloudService(
        _teacher_versions(args, teacher, checkpoints),
        _registry(args, checkpoints),
        SessionStore(idle_timeout=args.session_timeout),
        CloudConfig(
            student_cut=args.student_cut,
            teacher_cut=args.teacher_cut,
            hyper=hyper,
            teacher_cache_bytes=int(args.teacher_cache_mb * (1 << 20)),
            teacher_cache_samples=args.teacher_cache_samples,
        ),
        checkpoints=checkpoints,
        limiter=RateLimiter(args.max_steps_per_second),
        restore_at_start=args.lease_seconds <= 0,
    )
    lifecycle = lifecycle_cli.build_lifecycle(service, args, args.guardrail_margin)
    if args.base_student and lifecycle is not None:
        lifecycle.distil(args.base_student)
    replica = _replica(args, service, checkpoints)
    serve(
        service,
        ServeOptions(
            lifecycle=lifecycle,
            replica=replica,
            fleet=_fleet(args, service, checkpoints),
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024),
            grpc_workers=args.grpc_workers,
            security=cloud_security,
        ),
    )
    return 0


def _registry(args: ServeSettings, checkpoints: Any) -> Any:
    """Replicas sharing a store share their models too: a device downloads its student
    from whichever replica it lands on. A folder store holds the registry in STORE/models;
    an S3 store under its ``models/`` keys, each replica keeping checked local copies."""
    from cloud_service.registry import ModelRegistry
    from cloud_service.shared_registry import StoreRegistry

    if args.store.startswith("s3://"):
        cache = args.state_dir / "model-cache"
        return StoreRegistry(checkpoints.store, cache, keep_versions=args.keep_versions)
    return ModelRegistry(_registry_root(args), keep_versions=args.keep_versions)


def _registry_root(args: ServeSettings) -> Path:
    """The folder registry: the shared folder store's, or this cloud's own."""
    if args.store:
        return Path(args.store) / "models"
    return args.state_dir / "models"


def _session_checkpoints(args: ServeSettings) -> Any:
    """Sessions in the state folder (one cloud), or in the replicas' shared store."""
    from cloud_service.checkpoints import SessionCheckpoints
    from cloud_service.storage import open_store

    if not args.store:
        return SessionCheckpoints(args.state_dir / "sessions")
    store = open_store(args.store, endpoint_url=args.store_endpoint)
    store.ping()  # fail at start, in one line, rather than at the first step
    return SessionCheckpoints(store, prefix="sessions/")


def _is_replica(args: ServeSettings) -> bool:
    if args.lease_seconds > 0 and not args.store:
        raise SplitKDError("--lease-seconds needs --store: the replicas' shared storage")
    return args.lease_seconds > 0


def _replica_name(args: ServeSettings) -> str:
    import socket

    return args.replica_id or f"{socket.gethostname()}-{os.getpid()}"


def _teacher_versions(args: ServeSettings, teacher: Any, checkpoints: Any) -> Any:
    """The server model's versions: in the state folder, or shared by the replicas."""
    from cloud_service.teacher import TeacherVersions
    from cloud_service.teacher_store import SharedTeacherVersions

    if _is_replica(args):
        return SharedTeacherVersions(teacher, checkpoints.store)
    return TeacherVersions(teacher, args.state_dir / lifecycle_cli.VERSIONS_FOLDER)


def _replica(args: ServeSettings, service: Any, checkpoints: Any) -> Any:
    from cloud_service.leases import Leases
    from cloud_service.replicas import Replica

    if not _is_replica(args):
        return None
    name = _replica_name(args)
    replica = Replica(
        service, Leases(checkpoints.store, name, args.lease_seconds, prefix=checkpoints.prefix)
    )
    log.info("replica %s: sessions shared in %s", name, checkpoints.store.description)
    return replica


def _shared_cohorts(args: ServeSettings, checkpoints: Any) -> Any:
    """Replicas: cohorts in the shared store, each run by the replica holding its lease."""
    from cloud_service.fleet.shared import PREFIX, SharedCohorts
    from cloud_service.fleet.store import CohortStore
    from cloud_service.leases import Leases

    if not _is_replica(args):
        return None
    store = checkpoints.store
    leases = Leases(store, _replica_name(args), args.lease_seconds, prefix=PREFIX, kind="cohort")
    return SharedCohorts(CohortStore(store, PREFIX), leases)


def _fleet(args: ServeSettings, service: Any, checkpoints: Any) -> Any:
    """The cohorts' service, with the proxy inputs KOALA's knowledge transfer runs on."""
    import numpy as np

    from cloud_service.fleet.config import load_plans
    from cloud_service.fleet.service import FleetService, FleetSettings
    from cloud_service.publish import publish_teacher
    from splitkd import koala
    from splitkd.data import load_dataset
    from splitkd.data.partition import cloud_split, default_presumed_fraction
    from splitkd.messages import CohortConfig

    defaults = CohortConfig(
        mode=args.cohort_mode,
        min_devices=args.cohort_min_devices,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        round_timeout_seconds=args.round_timeout,
        weights_codec=args.weights_codec,
    )
    plans = load_plans(args.cohort_config, defaults)
    labels = None
    if args.labelled_data:
        labels = koala.CloudLabels.split(load_dataset(args.labelled_data))
    elif not args.teacher and not args.teacher_hf:
        fraction = args.presumed_fraction
        if fraction is None:
            fraction = default_presumed_fraction(args.teacher_data)
        presumed = cloud_split(load_dataset(args.teacher_data), fraction)
        labels = koala.CloudLabels(presumed.train, presumed.heldout)
    proxy: np.ndarray | None = None
    if args.proxy_data:
        proxy = load_dataset(args.proxy_data).x
    elif labels is not None:
        proxy = labels.train.x
    publish_teacher(service)
    service.teachers.on_update.append(lambda _teacher: publish_teacher(service))
    shared = _shared_cohorts(args, checkpoints)
    return FleetService(
        service,
        FleetSettings(defaults, plans, proxy, labels, args.state_dir / "cohorts", shared),
    )


def _train_teacher(args: TrainTeacherSettings) -> int:
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
    return 0


PROGRAM = Program(
    prog="splitkd-cloud",
    description="The splitkd cloud: holds the teacher, finishes split-KD training steps for edge "
    "devices over gRPC, exports the distilled student to ONNX and serves it over HTTP.",
    global_options=_global_options,
    commands=(
        Command(
            "serve", ServeSettings, _serve, help="run the gRPC training service and the HTTP API"
        ),
        Command(
            "train-teacher",
            TrainTeacherSettings,
            _train_teacher,
            help="train a teacher on the cloud's presumed data and save it",
        ),
        *admin_cli.COMMANDS,
        *lifecycle_cli.COMMANDS,
    ),
    group_help=admin_cli.GROUP_HELP | lifecycle_cli.GROUP_HELP,
)


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    try:
        args, command, options = PROGRAM.parse(argv)
        configure(args.verbose)
        return command.handler(options)
    except SplitKDError as exc:
        print(f"splitkd-cloud: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"splitkd-cloud: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
