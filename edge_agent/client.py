"""The edge's gRPC client: a context manager with plain methods over the stub.

It hides the channel, encodes numpy arrays, translates gRPC errors into one
line a person can act on, retries idempotent calls on transient failures,
and counts the bytes of every message it sends and receives.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
import numpy as np

from edge_agent.errors import CloudRefused, EdgeError
from edge_agent.model_store import check_model_id
from edge_agent.security import open_channel
from edge_agent.sticky import StickyUpstream
from splitkd import codec, serde
from splitkd.codecs import Encoded
from splitkd.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, ROUTE_HEADER, channel_options
from splitkd.messages import (
    JoinAnswer,
    RoundTask,
    SessionAsk,
    SessionInfo,
    StepOutcome,
    TaskDescription,
    Update,
    UpdateAnswer,
)
from splitkd.models.spec import ModelSpec
from splitkd.signature import DatasetSignature
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
# gRPC adds a 5-byte length prefix to every message on the stream.
GRPC_FRAME_BYTES = 5
FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)
# Worth retrying (idempotent calls only): the cloud is unreachable, slow, or was
# shutting down (a draining server cancels what it cannot finish in its grace).
_TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)
# Register is also retried when the cloud is full (RESOURCE_EXHAUSTED): a refused
# Register created nothing, and a lost one only leaves a session that holds no
# capacity on the cloud until it is evicted (cloud_service/sessions.py).
_REGISTER_RETRY = (*_TRANSIENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Traffic:
    bytes_up: int = 0
    bytes_down: int = 0
    calls: int = 0


def _spec(message: pb.ModelSpec) -> ModelSpec:
    return ModelSpec.from_json(message.family, message.spec_json)


class CloudClient:
    """``with CloudClient("host:port") as cloud: cloud.register(...)``."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 5,
        retry_seconds: float = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        routing_key: str = "",
        sticky: bool = False,
    ) -> None:
        """``credentials``: TLS (None: plaintext); ``metadata``: the device's credential,
        sent on every call (edge_agent/security.py builds both); ``routing_key``: sent
        on every call for the load balancer in front of cloud replicas (deploy/envoy/);
        ``sticky``: ask it for balanced placement, then follow the replica its answers
        name (a solo device, edge_agent/sticky.py; a cohort's members meet by the key)."""
        self.address = address
        self._credentials = credentials
        self._metadata = tuple(metadata) + (((ROUTE_HEADER, routing_key),) if routing_key else ())
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        # Idempotent calls are retried for this long: a Pi rebooting its router
        # or an LTE link lost for a minute must not end a training run.
        self.retry_seconds = retry_seconds
        self.traffic = Traffic()
        self.on_traffic: Callable[[int, int], None] | None = None
        self.last_call = time.monotonic()
        self.retried_calls = 0
        self._max_message_bytes = max_message_bytes
        # Kept across _reset_channel: a fresh connection still goes to the same replica.
        self._interceptors = (StickyUpstream(),) if sticky else ()
        self._channel = self._open_channel()
        self._stub = pb_grpc.SplitTrainingStub(self._channel)
        self._fleet = pb_grpc.FleetStub(self._channel)
        self._heartbeat_stop = threading.Event()

    @property
    def upstream(self) -> str | None:
        """The replica a sticky client's calls go to, as the load balancer names it."""
        return self._interceptors[0].upstream if self._interceptors else None

    def _open_channel(self) -> grpc.Channel:
        return open_channel(
            self.address,
            channel_options(self._max_message_bytes),
            self._credentials,
            self._metadata,
            self._interceptors,
        )

    def _reset_channel(self) -> None:
        """A fresh connection: after a deadline the old one may be a black hole
        that TCP keepalive would only notice minutes later."""
        old = self._channel
        self._channel = self._open_channel()
        self._stub = pb_grpc.SplitTrainingStub(self._channel)
        self._fleet = pb_grpc.FleetStub(self._channel)
        old.close()

    def __enter__(self) -> CloudClient:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            hint = (
                "if the cloud uses TLS, give --tls-ca"
                if self._credentials is None
                else "TLS: does --tls-ca trust the cloud's certificate, is this host name in it, and "
                "does the cloud want a client certificate (--tls-cert/--tls-key)?"
            )
            raise EdgeError(
                f"cannot reach the cloud at {self.address} within {self.connect_timeout:.0f} s "
                f"(is splitkd-cloud running, and is the address right? {hint})"
            ) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._heartbeat_stop.set()
        self._channel.close()

    def _count(self, up: int, down: int) -> None:
        self.traffic.bytes_up += up + GRPC_FRAME_BYTES
        self.traffic.bytes_down += down + GRPC_FRAME_BYTES
        self.traffic.calls += 1
        if self.on_traffic is not None:
            self.on_traffic(up + GRPC_FRAME_BYTES, down + GRPC_FRAME_BYTES)

    def _call(
        self,
        method: str,
        call: Callable[[], T],
        *,
        idempotent: bool,
        retry_on: tuple[grpc.StatusCode, ...] = _TRANSIENT,
    ) -> T:
        """``idempotent`` calls are retried on ``retry_on`` within ``retry_seconds``."""
        attempt = 0
        deadline = time.monotonic() + self.retry_seconds
        while True:
            try:
                result = call()
                self.last_call = time.monotonic()
                if attempt:
                    log.warning("%s succeeded again after %d retries", method, attempt)
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if idempotent and code in retry_on and time.monotonic() < deadline:
                    # Exponential backoff with full jitter, capped at 10 s: a fleet
                    # that lost the cloud at the same moment does not come back in
                    # lockstep, and a device notices a returning cloud quickly.
                    delay = random.uniform(0, min(10.0, 0.5 * 2**attempt))
                    delay = min(delay, max(0.0, deadline - time.monotonic()))  # within the budget
                    log.warning(
                        "%s failed (%s: %s); retrying in %.1f s", method, code.name, details, delay
                    )
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self._reset_channel()
                    time.sleep(delay)
                    attempt += 1
                    self.retried_calls += 1
                    continue
                raise CloudRefused(method, code.name, details) from None

    def register(
        self,
        device_id: str,
        signature: DatasetSignature,
        *,
        requested_epochs: int = 0,
        device_profile: str = "",
        link_profile: str = "",
        class_weights: Sequence[float] = (),
        ask: SessionAsk | None = None,
    ) -> SessionInfo:
        """A new session; ``signature.num_classes`` is the class count of this device's
        labels (max + 1), which the cloud checks against its teacher's."""
        request = pb.RegisterRequest(
            device_id=device_id,
            profile=pb.DeviceProfile(name=device_profile, link=link_profile),
            signature=serde.signature_to_pb(signature),
            requested_epochs=requested_epochs,
            class_weights=list(class_weights),
        )
        if ask is not None:
            serde.session_ask_to_pb(ask, request)
        reply: pb.RegisterResponse = self._call(
            "Register",
            lambda: self._stub.Register(request, timeout=self.timeout),
            idempotent=True,
            retry_on=_REGISTER_RETRY,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return _session_info(reply)

    def resume(self, session_id: str, available_steps: list[int]) -> tuple[int, SessionInfo]:
        """Agree with the cloud on a step both can restore; returns it and the session."""
        request = pb.ResumeRequest(session_id=session_id, available_steps=available_steps)
        # The cloud rolls back to the answer, and answers the same again: a retry is safe.
        reply: pb.ResumeResponse = self._call(
            "Resume", lambda: self._stub.Resume(request, timeout=self.timeout), idempotent=True
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return reply.step, _session_info(reply.session)

    def heartbeat(self, session_id: str) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(session_id=session_id)
        reply: pb.HeartbeatResponse = self._call(
            "Heartbeat",
            lambda: self._stub.Heartbeat(request, timeout=self.timeout),
            idempotent=True,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return reply

    def keep_alive(self, session_id: str, interval: float = 60.0) -> None:
        """Send a heartbeat whenever no call reached the cloud for ``interval`` seconds.

        Long device work (a slow epoch, an evaluation, a checkpoint on an SD
        card) then never lets the session expire or an idle-killing load
        balancer drop the connection.
        """

        def beat() -> None:
            while not self._heartbeat_stop.wait(interval / 4):
                if time.monotonic() - self.last_call >= interval:
                    try:
                        self.heartbeat(session_id)
                    except EdgeError as exc:
                        log.warning("heartbeat failed: %s", exc)
                        self.last_call = time.monotonic()

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def step(
        self,
        session_id: str,
        step: int,
        student: Encoded,
        teacher: Encoded | None,
        labels: np.ndarray | None,
        next_teacher: Encoded | None = None,
        kd_alpha: float | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> StepOutcome:
        """One step; activations come packed by the session's codec (``GrpcTransport``)."""
        request = pb.StepRequest(
            session_id=session_id, step=step, student_activations=codec.pack(student)
        )
        if labels is not None:
            request.labels.CopyFrom(codec.encode(labels.astype(np.int64)))
        if teacher is not None:
            request.teacher_activations.CopyFrom(codec.pack(teacher))
        if next_teacher is not None:
            request.next_teacher_activations.CopyFrom(codec.pack(next_teacher))
        if sample_ids is not None:
            request.sample_ids.CopyFrom(codec.encode(sample_ids.astype(np.int32)))
        if kd_alpha is not None:
            request.kd_alpha = kd_alpha
        # Steps are idempotent by number on the cloud, so a retry is safe.
        reply: pb.StepResponse = self._call(
            "Step", lambda: self._stub.Step(request, timeout=self.timeout), idempotent=True
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return serde.step_outcome_from_pb(reply, student.shape)

    def evaluate(
        self, session_id: str, activations: Encoded, *, teacher: bool = False
    ) -> np.ndarray:
        """Logits of the student's tail for its head's ``activations`` (or the teacher's)."""
        field = "teacher_activations" if teacher else "student_activations"
        request = pb.EvaluateRequest(session_id=session_id, **{field: codec.pack(activations)})
        reply: pb.EvaluateResponse = self._call(
            "Evaluate", lambda: self._stub.Evaluate(request, timeout=self.timeout), idempotent=True
        )
        self._count(request.ByteSize(), reply.ByteSize())
        logits = codec.decode(
            reply.logits, what="logits", dtypes=FLOATS, shape=(activations.shape[0], None)
        )
        return logits.astype(np.float32)

    def describe(self, signature: DatasetSignature) -> TaskDescription:
        """What the cloud would train for this data (no session is opened)."""
        request = pb.DescribeRequest(signature=serde.signature_to_pb(signature))
        reply: pb.DescribeResponse = self._call(
            "Describe", lambda: self._stub.Describe(request, timeout=self.timeout), idempotent=True
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return serde.task_description_from_pb(reply)

    def probe(self, payload_bytes: int, reply_bytes: int) -> float:
        """Seconds of one round trip carrying these many bytes each way (the planner's probe)."""
        request = pb.ProbeRequest(payload=bytes(payload_bytes), reply_bytes=reply_bytes)
        started = time.perf_counter()
        reply: pb.ProbeResponse = self._call(
            "Probe", lambda: self._stub.Probe(request, timeout=self.timeout), idempotent=True
        )
        seconds = time.perf_counter() - started
        self._count(request.ByteSize(), reply.ByteSize())
        return seconds

    def finish(self, session_id: str, head: dict[str, np.ndarray], steps: int) -> pb.ModelInfo:
        request = pb.FinishRequest(
            session_id=session_id, student_head=codec.encode_weights(head), steps=steps
        )
        # Finishing twice returns the same version, so a retry is safe.
        reply: pb.FinishResponse = self._call(
            "Finish",
            lambda: self._stub.Finish(request, timeout=max(self.timeout, 120.0)),
            idempotent=True,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        # The name and version become paths on this device: a cloud (or anyone on a
        # plaintext link) must not be able to point them outside the model directory.
        check_model_id(reply.model.name, reply.model.version)
        return reply.model

    def download(
        self, name: str, version: int, destination: Path, expected_sha256: str = ""
    ) -> pb.ModelChunk:
        """Stream a model into ``destination``, resuming after a dropped stream; verify SHA-256."""
        partial = destination.with_suffix(destination.suffix + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"")
        last: pb.ModelChunk | None = None
        for attempt in range(self.retries + 1):
            offset = partial.stat().st_size
            request = pb.DownloadModelRequest(name=name, version=version, offset=offset)
            try:
                with partial.open("ab") as handle:
                    for chunk in self._stub.DownloadModel(
                        request, timeout=max(self.timeout, 120.0)
                    ):
                        if chunk.offset != handle.tell():
                            raise EdgeError(
                                f"download of {name}: chunk at {chunk.offset}, expected {handle.tell()}"
                            )
                        handle.write(chunk.data)
                        self._count(
                            request.ByteSize() if chunk.offset == offset else 0, chunk.ByteSize()
                        )
                        last = chunk
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in _TRANSIENT or attempt == self.retries:
                    raise CloudRefused("DownloadModel", code.name, exc.details() or "") from None
                time.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))
        if last is None:
            raise EdgeError(f"download of {name} returned no data")
        data = partial.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if (
            len(data) != last.total_size
            or digest != last.sha256
            or (expected_sha256 and digest != expected_sha256)
        ):
            partial.unlink(missing_ok=True)
            raise EdgeError(
                f"download of {name} v{last.version} failed verification (SHA-256 {digest[:12]}…)"
            )
        partial.replace(destination)
        return last

    # -- fleets ------------------------------------------------------------------
    def join_cohort(
        self,
        device_id: str,
        cohort: str,
        signature: DatasetSignature,
        num_samples: int,
        *,
        device_profile: str = "",
        link_profile: str = "",
        ask: SessionAsk | None = None,
        weights_codec: str = "",
    ) -> JoinAnswer:
        """``ask``: the wire this device wants for its round sessions (split cohorts);
        ``weights_codec``: how its weights travel in federated ones ("": the cohort's)."""
        request = pb.JoinCohortRequest(
            device_id=device_id,
            cohort=cohort,
            profile=pb.DeviceProfile(name=device_profile, link=link_profile),
            signature=serde.signature_to_pb(signature),
            num_samples=num_samples,
            weights_codec=weights_codec,
        )
        serde.cohort_ask_to_pb(ask or SessionAsk(), request)
        # Joining again returns the same member: a retry is safe.
        reply: pb.JoinCohortResponse = self._call(
            "JoinCohort",
            lambda: self._fleet.JoinCohort(request, timeout=self.timeout),
            idempotent=True,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return serde.join_answer_from_pb(reply)

    def fetch_round(
        self, member_id: str, after_round: int, expected: dict[str, tuple[int, ...]], held: int = 0
    ) -> RoundTask:
        """``held``: the digest of the student this device holds (fedwire; 0: none)."""
        request = pb.FetchRoundRequest(
            member_id=member_id, after_round=after_round, held_weights=held
        )
        reply: pb.RoundTask = self._call(
            "FetchRound",
            lambda: self._fleet.FetchRound(request, timeout=self.timeout),
            idempotent=True,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        task = serde.round_task_from_pb(reply, expected)
        if isinstance(task.session, pb.RegisterResponse):
            task = replace(task, session=_session_info(task.session))
        return task

    def submit_update(self, update: Update) -> UpdateAnswer:
        request = serde.update_to_pb(update)
        # The cloud takes one update per device and round; a retry is answered "duplicate".
        reply: pb.SubmitUpdateResponse = self._call(
            "SubmitUpdate",
            lambda: self._fleet.SubmitUpdate(request, timeout=self.timeout),
            idempotent=True,
        )
        self._count(request.ByteSize(), reply.ByteSize())
        return serde.update_answer_from_pb(reply)


def _session_info(reply: pb.RegisterResponse) -> SessionInfo:
    return serde.session_from_pb(reply)
