"""The options of every ``splitkd-cloud`` command, each declared once.

Flags, ``SPLITKD_*`` variables, config-file keys, ``--help`` and
docs/CONFIGURATION.md are generated from these fields; to add an option, add one
field (see :mod:`splitkd.settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cloud_service.security import CloudSecurityOptions
from splitkd.data.partition import DEMO_PRESUMED_FRACTION
from splitkd.hyper import Hyperparameters
from splitkd.messages import CohortConfig
from splitkd.settings import Options, option

_HYPER = Hyperparameters()
TRAINING = "training (sent to every edge with its session)"
DATA = "digits, npz:PATH, csv:PATH, text:PATH or pydoc-topics"


class StateDirOptions(Options):
    state_dir: Path = option(
        Path(".splitkd-cloud"),
        "the cloud's state folder: models, sessions, the trained teacher, devices.json",
    )


class TrainingOptions(Options):
    presumed_fraction: float | None = option(
        None,
        "when the edges are handed the same data set: the share of --teacher-data the teacher "
        "trains on (its 'presumed' data), which those edges then never use",
        group=TRAINING,
        shown_default=f"{DEMO_PRESUMED_FRACTION} for the built-in digits, all of a file of yours",
    )
    student_cut: int = option(1, "student stages on the device", group=TRAINING)
    teacher_cut: int = option(1, "frozen teacher stages on the device", group=TRAINING)
    epochs: int = option(_HYPER.epochs, "default epochs per edge", group=TRAINING)
    batch_size: int = option(_HYPER.batch_size, "batch size", group=TRAINING)
    learning_rate: float = option(_HYPER.learning_rate, "learning rate", group=TRAINING)
    optimizer: Literal["adam", "sgd"] = option(_HYPER.optimizer, "optimizer", group=TRAINING)
    kd_alpha: float = option(_HYPER.kd_alpha, "weight of the KD term", group=TRAINING)
    kd_temperature: float = option(_HYPER.kd_temperature, "softmax temperature", group=TRAINING)
    seed: int = option(_HYPER.seed, "seed of every random choice", group=TRAINING)
    wire_codec: Literal["float32", "float16", "int8", "int8-stochastic", "topk"] = option(
        _HYPER.wire_codec,
        "how activations and gradients travel when the edge does not ask for a codec: float32, "
        "float16, int8 (per-channel affine), int8-stochastic, topk (largest values, error feedback)",
        group=TRAINING,
    )
    wire_dtype: Literal["", "float32", "float16"] = option(
        "",
        "deprecated, kept for existing scripts: the same as --wire-codec float32|float16",
        group=TRAINING,
        shown_default="unset",
    )
    topk_ratio: float = option(
        _HYPER.topk_ratio, "share of the elements the topk codec sends", group=TRAINING
    )
    teacher_cache_mb: float = option(
        256.0,
        "memory all sessions' teacher-output caches may take together (MB); a session that "
        "does not fit trains without one (its edge then sends teacher activations every step)",
        group=TRAINING,
    )
    teacher_cache_samples: int = option(
        1_000_000, "most samples one session's teacher-output cache holds", group=TRAINING
    )
    checkpoint_every: int = option(
        _HYPER.checkpoint_every,
        "steps between session checkpoints on both sides; a fault repeats at most this many steps",
        group=TRAINING,
    )


FLEETS = "fleets (defaults for cohorts; devices join with splitkd-edge train --cohort NAME)"
_COHORT = CohortConfig()


class FleetOptions(Options):
    cohort_mode: Literal["federated", "split"] = option(
        _COHORT.mode,
        "federated: devices train the whole small student locally, weights travel once per round "
        "and the server model learns from them (KOALA); split: devices train through the split "
        "against the teacher, heads and tails averaged per round",
        group=FLEETS,
    )
    cohort_min_devices: int = option(
        _COHORT.min_devices, "round 1 starts when this many devices joined", group=FLEETS
    )
    rounds: int = option(_COHORT.rounds, "rounds per cohort", group=FLEETS)
    local_epochs: int = option(_COHORT.local_epochs, "device epochs per round", group=FLEETS)
    round_timeout: float = option(
        _COHORT.round_timeout_seconds,
        "seconds after which a round closes with whoever delivered (stragglers never stall it)",
        group=FLEETS,
    )
    cohort_config: Path | None = option(
        None,
        "TOML file with per-cohort overrides ([cohorts.NAME] mode, rounds, local_epochs, "
        "min_devices, round_timeout, strategy, classes.CLASS.widths, for split cohorts "
        "wire_codec, wire_codecs, student_cut, for federated ones weights_codec, "
        "weights_codecs); see docs/FLEETS.md",
        group=FLEETS,
    )
    weights_codec: Literal["int8-delta", "float32"] = option(
        _COHORT.weights_codec,
        "how a federated cohort's weights travel when a device asks nothing: int8-delta (int8 "
        "per output row, stochastic rounding, against the version both sides hold; uploads "
        "with error feedback) or float32 (the whole student each way, each round)",
        group=FLEETS,
    )
    proxy_data: str | None = option(
        None,
        f"unlabelled inputs ({DATA}; labels ignored) on which the server model and the cohorts' "
        "students exchange knowledge in federated cohorts (default: the teacher's presumed data)",
        group=FLEETS,
    )
    labelled_data: str | None = option(
        None,
        f"the cloud's own labelled data ({DATA}), never a device's: anchors the server model's "
        "reverse KD, and every fifth sample decides whether a server model the fleet taught is "
        "kept (default: the teacher's presumed data when serve trains it; none with --teacher)",
        group=FLEETS,
    )


LIFECYCLE = (
    "lifecycle (DiReDi: base students, reverse distillation from devices; docs/LIFECYCLE.md)"
)


class GuardrailOptions(Options):
    guardrail_margin: float = option(
        0.02,
        "a device's knowledge report updates the teacher only if the teacher's accuracy on the "
        "held-out presumed data drops by at most this much (0.02 = 2 points); else it is refused",
        group=LIFECYCLE,
    )


REPLICAS = "replicas (several clouds behind Envoy; see docs/KUBERNETES.md)"


class ReplicaOptions(Options):
    store: str = option(
        "",
        "shared storage of sessions and their leases, and of the published models (with "
        "--lease-seconds: cohorts and the server model's versions too): a folder every replica mounts "
        "(a ReadWriteMany volume) or s3://BUCKET/PREFIX; empty: STATE_DIR, this cloud alone",
        group=REPLICAS,
    )
    store_endpoint: str = option(
        "",
        "S3 endpoint URL for MinIO, Ceph and others (credentials: the AWS_* variables)",
        group=REPLICAS,
    )
    lease_seconds: float = option(
        0.0,
        "session and cohort leases: a dead replica's sessions and cohorts move after this "
        "long; 0: this cloud is "
        "the only one (no leases, every stored session restored at start)",
        group=REPLICAS,
    )
    replica_id: str = option(
        "",
        "this replica's name in leases and logs (default: host name and process id)",
        group=REPLICAS,
    )


class ServeSettings(
    ReplicaOptions,
    CloudSecurityOptions,
    GuardrailOptions,
    FleetOptions,
    TrainingOptions,
    StateDirOptions,
):
    host: str = option("0.0.0.0", "address to listen on")
    grpc_port: int = option(50051, "gRPC port for edge agents")
    http_port: int = option(8000, "HTTP port: /healthz, /v1/models, /v1/sessions")
    teacher: Path | None = option(
        None,
        "teacher checkpoint (.safetensors from 'splitkd-cloud train-teacher')",
        exclusive="teacher",
    )
    teacher_hf: Path | None = option(
        None,
        "a local Hugging Face causal LM folder as the teacher (config.json + *.safetensors; "
        "LLaMA-style, byte vocabulary of 256 tokens)",
        exclusive="teacher",
    )
    teacher_data: str = option(
        "digits",
        f"train the teacher at start-up on this data: {DATA} (unused with --teacher)",
        exclusive="teacher",
    )
    keep_versions: int = option(
        5,
        "newest versions of each model kept in the registry; older ones are deleted when a new "
        "one is published (0 = keep all)",
    )
    max_message_mb: float = option(16.0, "largest gRPC message accepted (MiB)")
    grpc_workers: int = option(
        16,
        "threads answering gRPC calls (1-256); a step blocks one while it waits for its turn, "
        "its teacher batch or a checkpoint write",
    )
    session_timeout: float = option(900.0, "seconds of silence after which a session expires")
    max_steps_per_second: float = option(
        400.0, "per device: more steps than this get RESOURCE_EXHAUSTED (0: no limit)"
    )
    base_student: str | None = option(
        None,
        "at start-up, distil a student from the teacher on the presumed data alone and publish "
        "it under this name (e.g. base) for devices to pull and serve",
        group=LIFECYCLE,
    )
    no_teacher_batching: bool = option(
        False,
        "one teacher pass per step, instead of one pass for the steps of concurrent sessions",
    )
    parallel_tensor_work: bool = option(
        False,
        "let concurrent steps run their tensor work at the same time (large models on many "
        "cores); by default they take turns, which spares small models a fight over the GIL",
    )
    teacher_batch_ms: float = option(
        2.0,
        "longest wait for more steps to batch with, only under load (milliseconds)",
    )


class TrainTeacherSettings(Options):
    data: str = option("digits", f"the cloud's data: {DATA}")
    out: Path = option(help="output .safetensors file")
    presumed_fraction: float | None = option(
        None,
        "when the edges are handed the same data set: the share of it the teacher trains on",
        shown_default=f"{DEMO_PRESUMED_FRACTION} for the built-in digits, all of a file of yours",
    )


class DistillSettings(StateDirOptions):
    name: str = option("base", "publish the student under this model name")
    teacher_data: str = option("digits", f"the teacher's data, as 'serve' was given it: {DATA}")
    presumed_fraction: float | None = option(
        None,
        "as 'serve' was given it: the share of --teacher-data that is the presumed data",
        shown_default=f"{DEMO_PRESUMED_FRACTION} for the built-in digits, all of a file of yours",
    )
    keep_versions: int = option(5, "newest versions of each model kept in the registry")


# The admin commands act on what their arguments name: command line only.
class CertsSettings(Options):
    out: Path = option(help="folder for the PEM files", cli_only=True)
    cert_devices: list[str] = option(
        [],
        "issue a client certificate for this device (repeatable)",
        flag="--device",
        metavar="NAME",
        cli_only=True,
    )
    cert_hosts: list[str] = option(
        [],
        "extra DNS name or IP address in the server certificate (repeatable; localhost, "
        "127.0.0.1 and ::1 are always in it)",
        flag="--host",
        metavar="NAME",
        cli_only=True,
    )


class DevicesAddSettings(StateDirOptions):
    name: str = option(help="the device's id (its --device-id)", positional=True)
    replace: bool = option(
        False,
        "issue a new credential for an enrolled or revoked device (the old one stops working)",
        cli_only=True,
    )
    write_credential: Path | None = option(
        None,
        "write the credential to this file (mode 0600) instead of printing it",
        flag="--credential-file",
        cli_only=True,
    )


class DevicesListSettings(StateDirOptions):
    as_json: bool = option(False, "machine-readable output", flag="--json", cli_only=True)


class DevicesRevokeSettings(StateDirOptions):
    name: str = option(help="the device's id", positional=True)


class TeacherListSettings(StateDirOptions):
    as_json: bool = option(False, "machine-readable output", flag="--json", cli_only=True)


class TeacherRollbackSettings(StateDirOptions):
    version: int = option(help="the teacher version to serve again", positional=True)
