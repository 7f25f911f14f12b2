"""``--teacher-hf``: a local Hugging Face LLaMA directory as the teacher, split at a block."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_service.hf_teacher import load_hf_teacher
from splitkd.errors import InvalidArgument
from splitkd.models import zoo

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'splitkd[hf]')"
)


def _tiny_llama(folder: Path, **overrides: object) -> torch.nn.Module:
    settings: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    model.save_pretrained(folder)
    return model


def test_hf_llama_gives_the_logits_transformers_gives_and_splits_at_a_block(
    tmp_path: Path,
) -> None:
    reference = _tiny_llama(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    teacher = load_hf_teacher(tmp_path, context=16)
    assert teacher.spec.family == "llama" and teacher.spec.num_stages == 4
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = reference(ids).logits
        got = teacher.model(ids.float())
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)
        # Split at the boundary after block 1: the device's front, the cloud's tail.
        front = teacher.model.run(ids.float(), 0, 1)
        np.testing.assert_allclose(teacher.model.run(front, 1, 4).numpy(), got.numpy())
    # The cloud's default student for this teacher is a byte-level language model.
    student = zoo.default_student(teacher.signature)
    assert student.family == "transformer_lm" and student.num_classes == 256


def test_tied_embeddings_are_copied_into_the_cloud_head(tmp_path: Path) -> None:
    reference = _tiny_llama(tmp_path, tie_word_embeddings=True)
    teacher = load_hf_teacher(tmp_path, context=8)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        np.testing.assert_allclose(
            teacher.model(ids.float()).numpy(), reference(ids).logits.numpy(), atol=1e-4
        )


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "not supported; splitkd loads LlamaForCausalLM"),
        ({"vocab_size": 32000}, "byte by byte"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "RoPE type 'yarn'"),
    ],
)
def test_unsupported_configs_are_one_line(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    _tiny_llama(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(InvalidArgument, match=message) as caught:
        load_hf_teacher(tmp_path)
    assert "\n" not in str(caught.value)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    _tiny_llama(tmp_path)
    for path in tmp_path.glob("*.safetensors"):
        path.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InvalidArgument, match=r"pytorch_model\.bin are pickles"):
        load_hf_teacher(tmp_path)


def test_split_kd_from_an_hf_teacher_trains_a_byte_level_student(tmp_path: Path) -> None:
    from cloud_service.server import build_grpc_server
    from edge_agent.client import CloudClient
    from edge_agent.trainer import EdgeTrainer, GrpcTransport
    from splitkd.data import edge_split
    from splitkd.data.partition import Shard
    from splitkd.data.specs import Dataset
    from splitkd.data.text import text_dataset
    from splitkd.hyper import Hyperparameters
    from tests.support import make_service

    _tiny_llama(tmp_path / "hf")
    teacher = load_hf_teacher(tmp_path / "hf", context=16)
    x, y, signature = text_dataset("the teacher is a llama. " * 60, "llama", "llama", 16)
    split = edge_split(Dataset(x, y, signature), Shard(0, 1), presumed_fraction=0.0)
    hyper = Hyperparameters(epochs=1, batch_size=16, learning_rate=0.003, seed=1)
    service = make_service(tmp_path, hyper=hyper, teacher=teacher)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as client:
            session = client.register("edge-hf", signature)
            transport = GrpcTransport(client, session)
            result = EdgeTrainer(session, split.train, split.heldout, transport).run()
    finally:
        server.stop(0)
    # The device ran the LLaMA's first block itself: its head weights came in RegisterResponse.
    assert any(".q_proj." in name for name in session.teacher_head)
    losses = [r.loss for r in result.history]
    assert len(losses) >= 3 and losses[-1] < losses[0]


def test_serve_with_an_unsupported_hf_folder_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["BertModel"]}')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_service.cli",
            "serve",
            "--teacher-hf",
            str(tmp_path / "hf"),
            "--state-dir",
            str(tmp_path / "state"),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"splitkd-cloud: error: {tmp_path / 'hf'}: architecture ['BertModel'] is not supported; "
        "splitkd loads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    ]
