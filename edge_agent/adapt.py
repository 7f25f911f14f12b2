"""``splitkd-edge adapt``: the device's half of the DiReDi loop.

1. Open an adaptation at the cloud for the installed student: the cloud sends its
   weights (checked here against the installed ONNX file) and probe inputs.
2. Adapt a copy on the device's exclusive data (a data spec, the feedback store).
3. Report only the adapted model's logits on the cloud's probes (``ReportKnowledge``).
4. If the cloud's teacher accepted the knowledge, download the re-distilled student,
   verify it, evaluate it on the held-out exclusive data and switch to it only if it
   is better there; the previous version stays installed (``splitkd-edge rollback``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from edge_agent.client import CloudClient
from edge_agent.errors import CloudRefused, EdgeError
from edge_agent.feedback import FeedbackStore
from edge_agent.inference import Predictor
from edge_agent.model_store import LocalModel, ModelStore, check_model_id
from edge_agent.security import EdgeSecurity, open_channel
from splitkd import codec, rediredi, serde
from splitkd.data import load_dataset
from splitkd.data.partition import default_presumed_fraction, edge_split, train_heldout
from splitkd.grpc_options import channel_options
from splitkd.models import zoo
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# The weights the cloud sends must compute what the installed ONNX file computes.
WEIGHTS_TOLERANCE = 1e-3


@dataclass
class AdaptOptions:
    cloud: str
    model_dir: Path
    device_id: str
    report: Path
    data: str | None = None
    feedback_db: Path | None = None  # None: the feedback store is not used
    cohort: str = ""  # also re-distil this finished cohort's students (a member's request)
    timeout: float = 600.0
    security: EdgeSecurity = field(default_factory=EdgeSecurity)
    loop: rediredi.LoopSettings = field(default_factory=rediredi.LoopSettings)


@dataclass
class Exclusive:
    """The device's own data: never leaves it."""

    train_x: np.ndarray
    train_y: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray

    @property
    def raw_bytes(self) -> int:
        """What sending the data raw would cost (inputs as float32, labels as int64)."""
        arrays = (self.train_x, self.train_y, self.heldout_x, self.heldout_y)
        return sum(int(a.astype(np.float32 if a.ndim > 1 else np.int64).nbytes) for a in arrays)


def exclusive_data(options: AdaptOptions, shape: tuple[int, ...], classes: int) -> Exclusive:
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    if options.data:
        dataset = load_dataset(options.data)
        split = edge_split(dataset, presumed_fraction=default_presumed_fraction(options.data))
        parts.append((split.train.x, split.train.y, split.heldout.x, split.heldout.y))
    if options.feedback_db is not None:
        store = FeedbackStore(options.feedback_db)
        try:
            x, y = store.load(shape)
        finally:
            store.close()
        if len(y) >= 2:
            train, held = train_heldout(np.arange(len(y)))
            parts.append((x[train], y[train], x[held], y[held]))
    if not parts:
        raise EdgeError("no exclusive data: give --data SPEC, --feedback (with records), or both")
    data = Exclusive(*(np.concatenate([p[i] for p in parts]) for i in range(4)))
    if data.train_x.shape[1:] != shape:
        raise EdgeError(
            f"the data's inputs are {list(data.train_x.shape[1:])}, the installed model takes {list(shape)}"
        )
    if (
        len(data.heldout_y) == 0
        or (np.concatenate([data.train_y, data.heldout_y]) >= classes).any()
    ):
        raise EdgeError(f"the data must hold a held-out part and labels 0..{classes - 1}")
    return data


class _Link:
    """The Lifecycle calls over one channel, counting bytes on the wire (protobuf sizes)."""

    def __init__(self, options: AdaptOptions) -> None:
        metadata = options.security.call_metadata(options.device_id)
        self.channel = open_channel(
            options.cloud, channel_options(), options.security.channel_credentials(), metadata
        )
        self.stub = pb_grpc.LifecycleStub(self.channel)
        self.timeout = options.timeout
        self.up = self.down = 0

    def call(self, method: str, request: Any) -> Any:
        try:
            reply = getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CloudRefused(method, exc.code().name, exc.details() or "") from None
        self.up += request.ByteSize()
        self.down += reply.ByteSize()
        return reply


def _installed_weights(task: pb.AdaptationTask, installed: Predictor, x: np.ndarray) -> Any:
    """The student the cloud sent, refused unless it computes what the installed file computes."""
    spec = serde.spec_from_pb(task.student)
    model = zoo.build(spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = codec.decode_weights(task.weights, expected=expected, what="student weights")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        mine = torch.softmax(model(torch.from_numpy(x[:64])), dim=1).numpy()
    if np.abs(mine - installed.predict(x[:64]).probabilities).max() > WEIGHTS_TOLERANCE:
        raise EdgeError("the cloud's weights do not compute what the installed model computes")
    return model


def adapt(options: AdaptOptions) -> dict[str, Any]:
    started = time.perf_counter()
    store = ModelStore(options.model_dir)
    installed = store.current()
    shape = tuple(int(d) for d in installed.metadata["input_shape"])
    predictor = Predictor(installed.path, shape)
    data = exclusive_data(options, shape, int(installed.metadata.get("num_classes", 0)))
    before = predictor.accuracy(data.heldout_x, data.heldout_y)
    link = _Link(options)
    try:
        task = link.call(
            "OpenAdaptation",
            pb.OpenAdaptationRequest(
                device_id=options.device_id,
                model_name=installed.name,
                model_version=installed.version,
                model_sha256=str(installed.metadata.get("sha256", "")),
            ),
        )
        model = _installed_weights(task, predictor, data.heldout_x)
        adapted = rediredi.adapt(model, data.train_x, data.train_y, options.loop)
        probes = codec.decode(task.probes, what="probes", shape=(None, *shape), finite=True)
        logits = rediredi.predict(adapted, np.array(probes, dtype=np.float32))
        # float16 on the wire: soft outputs need no more, and it halves the bytes up.
        outcome = link.call(
            "ReportKnowledge",
            pb.KnowledgeReport(
                adaptation_id=task.adaptation_id,
                device_id=options.device_id,
                model_name=installed.name,
                model_version=installed.version,
                probe_logits=codec.encode(logits, pb.DTYPE_FLOAT16),
                num_samples=len(data.train_y),
                cohort=options.cohort,
            ),
        )
    finally:
        link.channel.close()
    figures = {
        "adapted_accuracy": rediredi.accuracy(adapted, data.heldout_x, data.heldout_y),
        "before": before,
        "probes": len(probes),
    }
    served, switched, downloaded = _redeploy(options, store, installed, outcome, data)
    return _report(options, outcome, figures, served, switched, data, started, link, downloaded)


def _redeploy(
    options: AdaptOptions, store: ModelStore, installed: LocalModel, outcome: Any, data: Exclusive
) -> tuple[tuple[LocalModel, float], bool, int]:
    """Download, verify and evaluate the new student; switch only if it is better here."""
    shape = tuple(int(d) for d in installed.metadata["input_shape"])
    before = Predictor(installed.path, shape).accuracy(data.heldout_x, data.heldout_y)
    if not outcome.accepted:
        log.warning("the cloud refused the knowledge report: %s", outcome.reason)
        return (installed, before), False, 0
    name, version = check_model_id(outcome.student.name, outcome.student.version)
    download = store.download_path(name, version)
    store.root.mkdir(parents=True, exist_ok=True)
    with CloudClient(
        options.cloud,
        timeout=options.timeout,
        credentials=options.security.channel_credentials(),
        metadata=options.security.call_metadata(options.device_id),
    ) as cloud:
        last = cloud.download(name, version, download, outcome.student.sha256)
        metadata = {
            "name": name,
            "version": version,
            "sha256": last.sha256,
            "size_bytes": last.total_size,
            "input_shape": list(outcome.student.input_shape),
            "num_classes": outcome.student.num_classes,
            "teacher_version": outcome.teacher_version_after,
        }
        candidate = store.install(name, version, download, metadata, make_current=False)
        downloaded = cloud.traffic.bytes_down + cloud.traffic.bytes_up
    after = Predictor(candidate.path, shape).accuracy(data.heldout_x, data.heldout_y)
    if after > before:
        store.switch(name, version)
        log.info("switched to %s v%d: held-out accuracy %.4f -> %.4f", name, version, before, after)
        return (candidate, after), True, downloaded
    log.warning(
        "kept %s v%d: the new %s v%d is not better on this device's held-out data (%.4f vs %.4f)",
        installed.name,
        installed.version,
        name,
        version,
        after,
        before,
    )
    return (installed, before), False, downloaded


def _report(
    options: AdaptOptions,
    outcome: Any,
    figures: dict[str, Any],
    served: tuple[LocalModel, float],
    switched: bool,
    data: Exclusive,
    started: float,
    link: _Link,
    downloaded: int,
) -> dict[str, Any]:
    model, accuracy = served
    guardrail = outcome.guardrail
    return {
        "device_id": options.device_id,
        "accepted": outcome.accepted,
        "reason": outcome.reason,
        "switched": switched,
        "before": {"accuracy": figures["before"]},
        "adapted": {"accuracy": figures["adapted_accuracy"]},
        "after": {"accuracy": accuracy},
        "teacher": {
            "version_before": outcome.teacher_version_before,
            "version_after": outcome.teacher_version_after,
            "probe_agreement": outcome.probe_agreement,
        },
        "student": {
            "name": model.name,
            "version": model.version,
            "onnx_sha256": model.metadata.get("sha256", ""),
            "path": str(model.path),
        },
        "traffic": {
            "bytes_up": link.up,
            "bytes_down": link.down + downloaded,
            "probes": figures["probes"],
            "raw_data_bytes": data.raw_bytes,
        },
        "guardrail": {
            "presumed_accuracy_before": guardrail.presumed_accuracy_before,
            "presumed_accuracy_after": guardrail.presumed_accuracy_after,
            "margin": guardrail.margin,
            "heldout_samples": guardrail.heldout_samples,
        },
        "data": {"train_samples": len(data.train_y), "heldout_samples": len(data.heldout_y)},
        "cohort_students": [
            {"name": m.name, "version": m.version, "onnx_sha256": m.sha256}
            for m in outcome.cohort_students
        ],
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
