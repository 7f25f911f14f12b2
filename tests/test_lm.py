"""Language models: the transformer family, text data, token-level split KD."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_service.server import build_grpc_server
from cloud_service.teacher import Teacher
from edge_agent.client import CloudClient
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import Shard
from splitkd.data.specs import DataError, Dataset
from splitkd.data.text import CONTEXT, MIN_WINDOWS, text_dataset
from splitkd.errors import InvalidArgument
from splitkd.hyper import Hyperparameters
from splitkd.kd import kd_loss
from splitkd.messages import SessionAsk
from splitkd.models import zoo
from splitkd.models.normalize import fit_inputs, input_stage
from splitkd.models.spec import ModelSpec
from splitkd.training import train_kd_centralised
from tests.support import make_service

SMALL_LM = ModelSpec("transformer_lm", (16,), 256, widths=(16, 16))
SMALL_TEACHER = ModelSpec("transformer_lm", (16,), 256, widths=(32, 32, 32))


def _corpus(words: int = 1200) -> str:
    rng = np.random.default_rng(0)
    vocabulary = ["split", "teacher", "student", "edge", "cloud", "token", "gradient", "ünïcode"]
    return " ".join(rng.choice(vocabulary, words))


def _text(context: int = 16) -> Dataset:
    x, y, signature = text_dataset(_corpus(), "words", "words", context)
    return Dataset(x, y, signature)


def test_transformer_stages_are_blocks_and_the_ids_stay_on_the_device() -> None:
    model = zoo.build(SMALL_LM, seed=1)
    assert SMALL_LM.num_stages == len(model.stages) == 3  # [embedding + block, block, head]
    ids = torch.randint(0, 256, (2, 16)).float()
    assert model(ids).shape == (2, 16, 256)
    assert model.run(ids, 0, 1).shape == (2, 16, 16)  # a cut sends block outputs
    with pytest.raises(InvalidArgument, match="raw inputs"):
        SMALL_LM.check_cut(0)
    # Token ids are never standardised: no input statistics, and fitting is a no-op.
    assert input_stage(model) is None
    assert not any("input_mean" in k for k in model.state_dict())
    fit_inputs(model, ids.numpy())
    # Causal: changing the last token changes no earlier position's logits.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        np.testing.assert_allclose(model(ids)[:, :-1], model(changed)[:, :-1], atol=1e-6)
        assert not torch.allclose(model(ids)[:, -1], model(changed)[:, -1])


def test_sequence_classifier_and_bad_specs() -> None:
    spec = ModelSpec("transformer_cls", (16,), 3, widths=(16, 16))
    assert zoo.build(spec)(torch.zeros(4, 16)).shape == (4, 3)
    with pytest.raises(InvalidArgument, match="one width"):
        zoo.build(ModelSpec("transformer_lm", (16,), 256, widths=(16, 32)))
    with pytest.raises(InvalidArgument, match="multiple of"):
        zoo.build(ModelSpec("transformer_lm", (16,), 256, widths=(24,)))


def test_default_language_teacher_is_at_least_eight_times_the_student() -> None:
    signature = load_dataset("pydoc-topics").signature
    student, teacher = zoo.default_student(signature), zoo.default_teacher(signature)
    assert student.family == teacher.family == "transformer_lm"
    assert zoo.parameter_count(teacher) >= 8 * zoo.parameter_count(student)


def test_text_windows_are_next_tokens_and_shard_like_other_data() -> None:
    data = load_dataset("pydoc-topics")
    assert data.x.shape[1] == CONTEXT and data.signature.tokens
    np.testing.assert_array_equal(data.x[:, 1:], data.y[:, :-1])
    split = edge_split(data, Shard(1, 2), presumed_fraction=0.4)
    other = edge_split(data, Shard(0, 2), presumed_fraction=0.4)
    assert len(split.train) > 0 and len(split.heldout) > 0
    assert split.other_shards == len(other.train) + len(other.heldout)
    assert split.set_aside == round(0.4 * len(data))
    with pytest.raises(DataError, match="text has no classes"):
        edge_split(data, Shard(0, 2), alpha=0.5, presumed_fraction=0.4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"caf\xe9 au lait " * 400, r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
        (b"too short", "too few to train"),
    ],
)
def test_bad_text_files_are_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(f"text:{path}")
    assert "\n" not in str(caught.value)


def test_user_text_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(_corpus(), encoding="utf-8")
    data = load_dataset(f"text:{path}")
    assert len(data) >= MIN_WINDOWS and data.signature.name == "notes"


def test_kd_loss_per_token_is_the_mean_over_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator)
    teacher = torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    whole = kd_loss(student, teacher, labels, 0.7, 2.0)
    rows = [
        kd_loss(student[b, t : t + 1], teacher[b, t : t + 1], labels[b, t : t + 1], 0.7, 2.0)
        for b in range(2)
        for t in range(5)
    ]
    expected = torch.stack([r.total for r in rows]).mean()
    torch.testing.assert_close(whole.total, expected)


def test_split_language_model_losses_match_centralised_kd(tmp_path: Path) -> None:
    """Over two epochs: the second takes the teacher's per-token outputs from the cloud's
    teacher-output cache, and the losses are still those of centralised KD."""
    data = _text()
    hyper = Hyperparameters(epochs=2, batch_size=8, learning_rate=0.003, seed=3)
    teacher = Teacher(SMALL_TEACHER, zoo.build(SMALL_TEACHER, seed=7).eval(), None, "words")
    service = make_service(tmp_path, hyper=hyper, teacher=teacher)
    assert service.student_spec.family == "transformer_lm"
    split = edge_split(data, Shard(0, 1), presumed_fraction=0.0)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as client:
            ask = SessionAsk(train_samples=len(split.train))
            session = client.register("edge-lm", data.signature, ask=ask)
            assert session.teacher_cache_samples == len(split.train)
            transport = GrpcTransport(client, session)
            result = EdgeTrainer(session, split.train, split.heldout, transport).run()
            cached = service.sessions.get(session.session_id).cache
    finally:
        server.stop(0)
    reference = train_kd_centralised(service.student_spec, teacher.model, split.train, hyper)
    split_losses = [r.loss for r in result.history]
    assert len(split_losses) == len(reference.losses) == 2 * ((len(split.train) + 7) // 8)
    assert cached is not None and cached.samples == len(split.train)
    np.testing.assert_allclose(split_losses, reference.losses, rtol=1e-5, atol=0)
    assert reference.losses[-1] < reference.losses[0]
    # Per-token accuracy through the split, on the held-out windows.
    assert 0.0 < result.evaluations[-1].accuracy < 1.0
