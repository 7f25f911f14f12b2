"""The options of every ``splitkd-edge`` command, each declared once.

Flags, ``SPLITKD_*`` variables, config-file keys, ``--help`` and
docs/CONFIGURATION.md are generated from these fields; to add an option, add one
field (see :mod:`splitkd.settings`). No torch here: ``serve``, ``predict`` and
``pull`` run on the inference-only install.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from edge_agent.model_store import DEFAULT_MODEL_DIR, default_model_dir
from edge_agent.security import ClientSecurityOptions, HttpsOptions, HttpTokenOptions
from splitkd.settings import Options, option

TRAINING_DATA = (
    "digits, npz:PATH (arrays x, y), csv:PATH (label last), text:PATH (UTF-8) or pydoc-topics"
)


OBJECTIVES = ("time", "energy", "bytes")  # what the planner can save (edge_agent/plan.py)


def _objective(value: str) -> str:
    """One line for a typo, as for every other setting (not argparse's usage block)."""
    if value not in OBJECTIVES:
        raise ValueError(f"unknown objective {value!r}: use one of {', '.join(OBJECTIVES)}")
    return value


class ModelDirOptions(Options):
    model_dir: Path = option(
        help="local model directory",
        default_factory=default_model_dir,
        shown_default=f"$XDG_DATA_HOME/splitkd/models or {DEFAULT_MODEL_DIR}",
    )


class DeviceOptions(Options):
    device_id: str = option(
        help="this device's id: its name at the cloud, with --credential, and in metrics",
        default_factory=socket.gethostname,
        shown_default="the host name",
    )


class ProfileOptions(Options):
    device_profile: str = option(
        "laptop-x86",
        "device profile (power for the energy estimate, memory for a cohort's device class): "
        "raspberry-pi-4, raspberry-pi-5, raspberry-pi-zero-2w, jetson-nano or laptop-x86 "
        "(splitkd/profiles/devices.json, docs/ENERGY.md)",
    )
    link_profile: str = option(
        "ethernet",
        "network link profile for the radio energy estimate: ethernet, wifi, lte or nb-iot",
    )


class TrainSettings(ClientSecurityOptions, ProfileOptions, DeviceOptions, ModelDirOptions):
    cloud: str = option(help="cloud gRPC address HOST:PORT")
    data: str = option(help=f"local data: {TRAINING_DATA}")
    shard: str | None = option(None, "use shard I of N of the data (I from 0), e.g. 0/2")
    dirichlet_alpha: float | None = option(
        None, "non-IID shards: Dirichlet concentration per class (default: IID)"
    )
    presumed_fraction: float | None = option(
        None,
        "when the cloud was handed the same data set: the share its teacher trains on, which "
        "this device then leaves out",
        shown_default="0.4 for the built-in digits, 0 for a file (all of it is used)",
    )
    class_weighting: Literal["none", "balanced"] = option(
        "none",
        "weights of the cross-entropy term per class: 'balanced' weighs each class by the inverse "
        "of its frequency in this device's training labels, for imbalanced data; the weights are "
        "sent to the cloud, which computes the loss",
    )
    epochs: int = option(0, "epochs (0: the cloud's choice)")
    kd_alpha: Literal["cloud", "auto"] = option(
        "cloud",
        "KD weight: the cloud's, or auto: scaled down by the teacher's accuracy on this device's "
        "held-out data when it is weak",
    )
    wire_codec: Literal["cloud", "float32", "float16", "int8", "int8-stochastic", "topk"] = option(
        "cloud",
        "how activations and gradients travel: the cloud's default, float32, float16, int8 "
        "(per-channel affine, 1 byte per value), int8-stochastic, topk (largest values with "
        "error feedback); with --cohort: the cohort's default, and it may refuse a codec",
    )
    no_teacher_cache: bool = option(
        False,
        "send the teacher's activations every epoch instead of once per sample (the cloud then "
        "keeps no teacher outputs for this device; in a split cohort they are kept across rounds)",
    )
    eval_every: int = option(
        1,
        "measure held-out accuracy through the split every this many epochs (and after the "
        "last); each measurement sends the held-out activations up. A split cohort measures "
        "each round's starting model once instead",
    )
    student_cut: int = option(
        0, "student stages on this device (0: the cloud's choice, or a split cohort's)"
    )
    teacher_cut: int = option(0, "frozen teacher stages on this device (0: the cloud's choice)")
    # The planner (edge_agent/plan.py) and pipelining (edge_agent/pipeline.py).
    plan: Literal["", "auto"] = option(
        "",
        "auto: measure this device and the link first (as 'splitkd-edge plan' does) and train "
        "with the split cut and codec the plan chooses for --objective; empty: no plan",
        shown_default="no plan",
    )
    objective: str = option("time", "what --plan auto saves: time, energy (device joules) or bytes")

    @field_validator("objective")
    @classmethod
    def _check_objective(cls, value: str) -> str:
        return _objective(value)

    pipeline_depth: int = option(
        1,
        "steps in flight at once (1-4): above 1 the next batch goes out before the last "
        "gradient is back, and each head gradient is applied up to depth-1 steps late; pays on "
        "a high-latency link",
    )
    report: Path = option(Path("report.json"), "JSON run report to write")
    metrics_port: int = option(0, "serve Prometheus metrics on this port while training (0: off)")
    metrics_host: str = option("0.0.0.0", "address for --metrics-port")
    metrics_linger: float = option(
        0.0,
        "keep /metrics up this many seconds after training so Prometheus scrapes the final "
        "figures (report.json always has them exactly)",
    )
    no_plots: bool = option(False, "no PNG plots beside the report")
    checkpoint_dir: Path | None = option(
        None,
        "where this device keeps its training checkpoints, to resume after a reboot or a lost link",
        shown_default="$XDG_STATE_HOME/splitkd/DEVICE_ID",
    )
    cohort: str = option(
        "",
        "join this named cohort: the fleet's devices train one student per device class together "
        "(mode, rounds and epochs come from the cloud); without it the device trains alone",
    )
    weights_codec: Literal["cloud", "int8-delta", "float32"] = option(
        "cloud",
        "with --cohort in a federated cohort: how the student's weights travel each round: the "
        "cohort's default, int8-delta (int8 deltas against the version both sides hold) or "
        "float32 (whole); the cohort may refuse a codec",
    )
    fresh: bool = option(
        False,
        "end the saved unfinished session: discard this device's checkpoints of it (only the "
        "files splitkd wrote in --checkpoint-dir) and register a new one",
    )
    retry_seconds: float = option(
        300.0, "keep retrying an unreachable cloud for this long before giving up"
    )
    timeout: float = option(60.0, "seconds to wait for one cloud call")
    no_progress: bool = option(False, "no progress bar")


class PlanSettings(ClientSecurityOptions, ProfileOptions, DeviceOptions):
    cloud: str = option(help="cloud gRPC address HOST:PORT")
    data: str = option(help=f"local data: {TRAINING_DATA}")
    shard: str | None = option(None, "use shard I of N of the data (I from 0), e.g. 0/2")
    dirichlet_alpha: float | None = option(
        None, "non-IID shards: Dirichlet concentration per class (default: IID)"
    )
    presumed_fraction: float | None = option(
        None,
        "the share of a data set the cloud's teacher trains on, which this device leaves out "
        "(as for train)",
        shown_default="0.4 for the built-in digits, 0 for a file (all of it is used)",
    )
    epochs: int = option(0, "epochs (0: the cloud's choice)")
    objective: str = option("time", "what to save: time, energy (device joules) or bytes")

    @field_validator("objective")
    @classmethod
    def _check_objective(cls, value: str) -> str:
        return _objective(value)

    no_teacher_cache: bool = option(False, "plan without the cloud's teacher-output cache")
    eval_every: int = option(1, "epochs between held-out evaluations, as train --eval-every")
    teacher_cut: int = option(0, "frozen teacher stages on this device (0: the cloud's choice)")
    json_output: bool = option(False, "print the candidates and the choice as JSON", flag="--json")
    timeout: float = option(60.0, "seconds to wait for one cloud call (and to connect, at most 10)")


class FeedbackOptions(Options):
    feedback_db: Path | None = option(
        None,
        "the feedback store (SQLite) of users' corrections; it never leaves the device",
        shown_default="MODEL_DIR/feedback.sqlite3",
    )


class ServeSettings(
    FeedbackOptions, HttpTokenOptions, HttpsOptions, ProfileOptions, DeviceOptions, ModelDirOptions
):
    host: str = option("127.0.0.1", "address to listen on")
    http_port: int = option(8001, "HTTP port of the inference API")
    feedback_max_records: int = option(
        10_000, "records the feedback store holds at most; beyond, POST /v1/feedback answers 507"
    )


class PredictSettings(ModelDirOptions):
    input: Path | None = option(None, ".npy or .json file", exclusive="source")
    json_array: str | None = option(None, "inline JSON array", flag="--json", exclusive="source")

    @model_validator(mode="after")
    def _one_source(self) -> PredictSettings:
        if (self.input is None) == (self.json_array is None):
            raise ValueError("give one of --input FILE or --json ARRAY")
        return self


class GenerateSettings(ModelDirOptions):
    prompt: str = option(help="text to continue (UTF-8, at most the model's context in bytes)")
    max_tokens: int = option(128, "tokens (bytes) to generate, 1..2048")
    temperature: float = option(0.0, "sampling temperature; 0 picks the most likely byte")
    seed: int = option(0, "seed of the sampling (with --temperature above 0)")
    onnx_model: Path | None = option(
        None, "a language model's .onnx file instead of the current student"
    )


class PullSettings(ClientSecurityOptions, DeviceOptions, ModelDirOptions):
    cloud_http: str = option(help="cloud HTTP base URL, e.g. http://cloud:8000")
    model: str = option(help="model name, e.g. student-edge-0")
    version: int = option(0, "version (0: the latest)")


class AdaptSettings(FeedbackOptions, ClientSecurityOptions, DeviceOptions, ModelDirOptions):
    cloud: str = option(help="cloud gRPC address HOST:PORT")
    data: str | None = option(None, f"this device's exclusive data: {TRAINING_DATA}")
    feedback: bool = option(False, "learn from the feedback store's corrections too")
    report: Path = option(Path("adapt-report.json"), "JSON report to write")
    cohort: str = option(
        "",
        "also ask the cloud to re-distil this finished cohort's students (one per device class) "
        "from the updated teacher; this device must be a member",
    )
    timeout: float = option(
        600.0, "seconds to wait for the cloud's answer (it updates its teacher meanwhile)"
    )

    @model_validator(mode="after")
    def _some_data(self) -> AdaptSettings:
        if not self.data and not self.feedback:
            raise ValueError("give --data SPEC, --feedback, or both")
        return self


class RollbackSettings(ModelDirOptions):
    pass
