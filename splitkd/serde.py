"""The one place where protobuf messages and splitkd's typed values meet.

Servicers and clients call these functions; nothing else builds or reads the
fields of ``splitkd.v1`` messages that carry hyperparameters, specs or fleet
messages, so each mapping exists once.
"""

from __future__ import annotations

import numpy as np

from splitkd import codec, codecs, weights_codec
from splitkd.errors import InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.messages import (
    CohortConfig,
    JoinAnswer,
    ModelSummary,
    RoundState,
    RoundTask,
    SessionAsk,
    SessionInfo,
    StepOutcome,
    TaskDescription,
    Update,
    UpdateAnswer,
)
from splitkd.models.normalize import check_std
from splitkd.models.spec import ModelSpec
from splitkd.signature import DatasetSignature
from splitkd.v1 import splitkd_pb2 as pb

_ROUND_STATES = {
    RoundState.WAITING: pb.ROUND_STATE_WAITING,
    RoundState.TRAINING: pb.ROUND_STATE_TRAINING,
    RoundState.COMPLETE: pb.ROUND_STATE_COMPLETE,
}


def hyper_to_pb(hyper: Hyperparameters) -> pb.Hyperparameters:
    return pb.Hyperparameters(
        optimizer=hyper.optimizer,
        learning_rate=hyper.learning_rate,
        batch_size=hyper.batch_size,
        epochs=hyper.epochs,
        kd_alpha=hyper.kd_alpha,
        kd_temperature=hyper.kd_temperature,
        seed=hyper.seed,
        checkpoint_every=hyper.checkpoint_every,
        wire_codec=hyper.wire_codec,
        topk_ratio=hyper.topk_ratio,
    )


def hyper_from_pb(message: pb.Hyperparameters) -> Hyperparameters:
    return Hyperparameters(
        optimizer=message.optimizer,
        learning_rate=message.learning_rate,
        batch_size=message.batch_size,
        epochs=message.epochs,
        kd_alpha=message.kd_alpha,
        kd_temperature=message.kd_temperature,
        seed=message.seed,
        checkpoint_every=message.checkpoint_every or Hyperparameters.checkpoint_every,
        wire_codec=message.wire_codec or Hyperparameters.wire_codec,
        topk_ratio=message.topk_ratio or Hyperparameters.topk_ratio,
    )


def spec_to_pb(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(family=spec.family, spec_json=spec.to_json(), num_stages=spec.num_stages)


def spec_from_pb(message: pb.ModelSpec) -> ModelSpec:
    return ModelSpec.from_json(message.family, message.spec_json)


def signature_to_pb(signature: DatasetSignature) -> pb.DatasetSignature:
    return pb.DatasetSignature(
        input_shape=list(signature.input_shape),
        num_classes=signature.num_classes,
        name=signature.name,
    )


def signature_from_pb(message: pb.DatasetSignature) -> DatasetSignature:
    return DatasetSignature(tuple(message.input_shape), message.num_classes, message.name)


def cohort_config_to_pb(config: CohortConfig) -> pb.CohortConfig:
    return pb.CohortConfig(
        mode=config.mode,
        min_devices=config.min_devices,
        rounds=config.rounds,
        local_epochs=config.local_epochs,
        round_timeout_seconds=config.round_timeout_seconds,
        wire_codec=config.wire_codec,
        wire_codecs=list(config.wire_codecs),
        student_cut=config.student_cut,
        weights_codec=config.weights_codec,
        weights_codecs=list(config.weights_codecs),
    )


def cohort_config_from_pb(message: pb.CohortConfig) -> CohortConfig:
    return CohortConfig(
        mode=message.mode,
        min_devices=message.min_devices,
        rounds=message.rounds,
        local_epochs=message.local_epochs,
        round_timeout_seconds=message.round_timeout_seconds,
        wire_codec=message.wire_codec,
        wire_codecs=tuple(message.wire_codecs),
        student_cut=message.student_cut,
        # A cloud that predates fedwire sends none: its weights travel whole.
        weights_codec=message.weights_codec or weights_codec.FLOAT32,
        weights_codecs=tuple(message.weights_codecs),
    )


def join_answer_to_pb(answer: JoinAnswer) -> pb.JoinCohortResponse:
    return pb.JoinCohortResponse(
        member_id=answer.member_id,
        cohort=answer.cohort,
        device_class=answer.device_class,
        config=cohort_config_to_pb(answer.config),
        student=spec_to_pb(answer.student_spec),
        hyperparameters=hyper_to_pb(answer.hyper),
        model_name=answer.model_name,
        round=answer.round,
        server_model_version=answer.server_model_version,
        weights_codec=answer.weights_codec,
    )


def join_answer_from_pb(message: pb.JoinCohortResponse) -> JoinAnswer:
    return JoinAnswer(
        member_id=message.member_id,
        cohort=message.cohort,
        device_class=message.device_class,
        config=cohort_config_from_pb(message.config),
        student_spec=spec_from_pb(message.student),
        hyper=hyper_from_pb(message.hyperparameters),
        model_name=message.model_name,
        round=message.round,
        server_model_version=message.server_model_version,
        weights_codec=message.weights_codec or weights_codec.FLOAT32,
    )


def round_task_to_pb(task: RoundTask, session: pb.RegisterResponse | None = None) -> pb.RoundTask:
    message = pb.RoundTask(
        state=_ROUND_STATES[task.state],
        round=task.round,
        weights=(
            weights_codec.pack(task.packed)
            if task.weights_base
            else codec.encode_weights(task.weights)
        ),
        deadline_seconds=task.deadline_seconds,
        retry_after_seconds=task.retry_after_seconds,
        server_model_version=task.server_model_version,
        devices=task.devices,
        weights_base=task.weights_base,
        weights_digest=task.weights_digest,
    )
    if task.model is not None:
        message.model.CopyFrom(
            pb.ModelInfo(
                name=task.model.name,
                version=task.model.version,
                sha256=task.model.sha256,
                size_bytes=task.model.size_bytes,
            )
        )
    if session is not None:
        message.session.CopyFrom(session)
    return message


def round_task_from_pb(
    message: pb.RoundTask, expected: dict[str, tuple[int, ...]] | None = None
) -> RoundTask:
    states = {code: state for state, code in _ROUND_STATES.items()}
    if message.state not in states:
        raise InvalidArgument(f"round task: unknown state {message.state}")
    model = None
    if message.HasField("model"):
        model = ModelSummary(
            message.model.name,
            message.model.version,
            message.model.sha256,
            message.model.size_bytes,
        )
    if message.weights_base and message.weights.tensors:
        if expected is None:
            raise InvalidArgument("round task: weight deltas need the student's shapes")
        weights = weights_codec.unpack(message.weights, expected, "round weight deltas")
    elif message.weights.tensors:
        weights = codec.decode_weights(message.weights, expected=expected, what="round weights")
    else:
        weights = {}
    return RoundTask(
        state=states[message.state],
        round=message.round,
        weights={k: np.array(v, dtype=np.float32) for k, v in weights.items()},
        deadline_seconds=message.deadline_seconds,
        retry_after_seconds=message.retry_after_seconds,
        server_model_version=message.server_model_version,
        model=model,
        session=message.session if message.HasField("session") else None,
        devices=message.devices,
        weights_base=message.weights_base,
        weights_digest=message.weights_digest,
    )


def update_to_pb(update: Update) -> pb.SubmitUpdateRequest:
    return pb.SubmitUpdateRequest(
        member_id=update.member_id,
        round=update.round,
        weights=(
            weights_codec.pack(update.packed)
            if update.weights_base
            else codec.encode_weights(update.weights)
        ),
        num_samples=update.num_samples,
        heldout_accuracy=update.heldout_accuracy,
        steps=update.steps,
        weights_base=update.weights_base,
    )


def update_from_pb(message: pb.SubmitUpdateRequest, expected: dict[str, tuple[int, ...]]) -> Update:
    """Decode a device's update, refusing wrong names, shapes or non-finite values.

    With ``weights_base`` the weights are int8 deltas (fedwire), decoded here and
    checked once applied to their base (``cloud_service/fleet/weights.py``).
    """
    if message.weights_base:
        weights = weights_codec.unpack(message.weights, expected, "update weight deltas")
    else:
        weights = codec.decode_weights(message.weights, expected=expected, what="update weights")
        for name, value in weights.items():
            check_std(name, value)  # input statistics must not divide by zero
    if not 0.0 <= message.heldout_accuracy <= 1.0:
        raise InvalidArgument(f"heldout_accuracy must be in [0, 1], got {message.heldout_accuracy}")
    if not 1 <= message.num_samples <= 1 << 40:
        raise InvalidArgument(f"num_samples must be in 1..2^40, got {message.num_samples}")
    return Update(
        member_id=message.member_id,
        round=message.round,
        weights=weights,
        num_samples=message.num_samples,
        heldout_accuracy=message.heldout_accuracy,
        steps=message.steps,
        weights_base=message.weights_base,
    )


def update_answer_to_pb(answer: UpdateAnswer) -> pb.SubmitUpdateResponse:
    return pb.SubmitUpdateResponse(
        accepted=answer.accepted, round=answer.round, duplicate=answer.duplicate
    )


def update_answer_from_pb(message: pb.SubmitUpdateResponse) -> UpdateAnswer:
    return UpdateAnswer(message.accepted, message.round, message.duplicate)


def session_to_pb(session: SessionInfo) -> pb.RegisterResponse:
    return pb.RegisterResponse(
        session_id=session.session_id,
        student_cut=session.student_cut,
        teacher_cut=session.teacher_cut,
        student=spec_to_pb(session.student_spec),
        teacher=spec_to_pb(session.teacher_spec),
        student_head=codec.encode_weights(session.student_head),
        teacher_head=codec.encode_weights(session.teacher_head),
        hyperparameters=hyper_to_pb(session.hyper),
        next_step=session.next_step,
        model_name=session.model_name,
        teacher_accuracy=session.teacher_accuracy or 0.0,
        teacher_cache_samples=session.teacher_cache_samples,
    )


def session_from_pb(message: pb.RegisterResponse) -> SessionInfo:
    return SessionInfo(
        session_id=message.session_id,
        student_spec=spec_from_pb(message.student),
        teacher_spec=spec_from_pb(message.teacher),
        student_cut=message.student_cut,
        teacher_cut=message.teacher_cut,
        student_head=codec.decode_weights(message.student_head, what="student_head"),
        teacher_head=codec.decode_weights(message.teacher_head, what="teacher_head"),
        hyper=hyper_from_pb(message.hyperparameters),
        next_step=message.next_step,
        model_name=message.model_name,
        teacher_accuracy=message.teacher_accuracy or None,
        teacher_cache_samples=max(0, message.teacher_cache_samples),
    )


def task_description_to_pb(task: TaskDescription) -> pb.DescribeResponse:
    return pb.DescribeResponse(
        student=spec_to_pb(task.student_spec),
        teacher=spec_to_pb(task.teacher_spec),
        student_cuts=list(task.student_cuts),
        teacher_cuts=list(task.teacher_cuts),
        default_student_cut=task.default_student_cut,
        default_teacher_cut=task.default_teacher_cut,
        hyperparameters=hyper_to_pb(task.hyper),
        wire_codecs=list(task.wire_codecs),
        teacher_cache_samples=task.teacher_cache_samples,
    )


def task_description_from_pb(message: pb.DescribeResponse) -> TaskDescription:
    student, teacher = spec_from_pb(message.student), spec_from_pb(message.teacher)
    cuts = (tuple(message.student_cuts), tuple(message.teacher_cuts))
    for spec, allowed, what in ((student, cuts[0], "student"), (teacher, cuts[1], "teacher")):
        for cut in allowed:
            spec.check_cut(cut, f"the cloud's {what} cut")
    return TaskDescription(
        student_spec=student,
        teacher_spec=teacher,
        student_cuts=cuts[0],
        teacher_cuts=cuts[1],
        default_student_cut=message.default_student_cut,
        default_teacher_cut=message.default_teacher_cut,
        hyper=hyper_from_pb(message.hyperparameters),
        wire_codecs=tuple(codecs.check_name(n) for n in message.wire_codecs),
        teacher_cache_samples=message.teacher_cache_samples,
    )


def session_ask_from_pb(message: pb.RegisterRequest) -> SessionAsk:
    return SessionAsk(
        wire_codec=message.wire_codec,
        train_samples=message.train_samples,
        student_cut=message.student_cut,
        teacher_cut=message.teacher_cut,
        pipeline_depth=message.pipeline_depth or 1,
    )


def cohort_ask_from_pb(message: pb.JoinCohortRequest) -> SessionAsk:
    """What a device asks of its round sessions in a split cohort (its join)."""
    return SessionAsk(
        wire_codec=message.wire_codec,
        train_samples=message.train_samples,
        student_cut=message.student_cut,
    )


def cohort_ask_to_pb(ask: SessionAsk, message: pb.JoinCohortRequest) -> None:
    message.wire_codec = ask.wire_codec
    message.train_samples = ask.train_samples
    message.student_cut = ask.student_cut


def session_ask_to_pb(ask: SessionAsk, message: pb.RegisterRequest) -> None:
    """Fill ``message``'s ask fields (the rest of a RegisterRequest is the caller's)."""
    message.wire_codec = ask.wire_codec
    message.train_samples = ask.train_samples
    message.student_cut = ask.student_cut
    message.teacher_cut = ask.teacher_cut
    message.pipeline_depth = ask.pipeline_depth


def step_outcome_to_pb(outcome: StepOutcome) -> pb.StepResponse:
    encoded = outcome.encoded or codecs.Encoded(outcome.gradient.shape, outcome.gradient)
    return pb.StepResponse(
        step=outcome.step,
        gradient=codec.pack(encoded),
        loss=outcome.loss,
        kd_loss=outcome.kd_loss,
        ce_loss=outcome.ce_loss,
        correct=outcome.correct,
        replayed=outcome.replayed,
        next_teacher_accepted=outcome.next_teacher_accepted,
    )


def step_outcome_from_pb(message: pb.StepResponse, shape: tuple[int, ...]) -> StepOutcome:
    """Decode the cloud's answer; the gradient must have the activations' ``shape``."""
    encoded = codec.unpack(message.gradient, what="gradient", shape=shape)
    return StepOutcome(
        step=message.step,
        gradient=codecs.to_dense(encoded),
        encoded=encoded,
        loss=message.loss,
        kd_loss=message.kd_loss,
        ce_loss=message.ce_loss,
        correct=message.correct,
        replayed=message.replayed,
        next_teacher_accepted=message.next_teacher_accepted,
    )
