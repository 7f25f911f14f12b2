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

from pydantic import model_validator

from edge_agent.model_store import DEFAULT_MODEL_DIR, default_model_dir
from edge_agent.security import ClientSecurityOptions, HttpsOptions, HttpTokenOptions
from splitkd.settings import Options, option

TRAINING_DATA = (
    "digits, npz:PATH (arrays x, y), csv:PATH (label last), text:PATH (UTF-8) or pydoc-topics"
)


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
        "device power profile for the energy estimate: raspberry-pi-4, raspberry-pi-5, "
        "jetson-nano or laptop-x86 (docs/ENERGY.md)",
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


class ServeSettings(HttpTokenOptions, HttpsOptions, ProfileOptions, DeviceOptions, ModelDirOptions):
    host: str = option("127.0.0.1", "address to listen on")
    http_port: int = option(8001, "HTTP port of the inference API")


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
