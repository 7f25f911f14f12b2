"""On the device: the ONNX incremental decoder, ``splitkd-edge generate`` and ``POST /v1/generate``."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from edge_agent.cli import main as edge_main
from edge_agent.errors import EdgeError
from edge_agent.generate import MAX_NEW_TOKENS, Generator, heldout_scores
from edge_agent.http_api import create_app
from edge_agent.model_store import ModelStore
from splitkd.data.text import decode, encode
from splitkd.errors import InvalidArgument
from splitkd.lm_export import token_parity
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.onnx_export import export_checked

CONTEXT = 24
SPEC = ModelSpec("transformer_lm", (CONTEXT,), 256, widths=(32, 32))


@pytest.fixture(scope="module")
def language_model() -> tuple[torch.nn.Module, bytes]:
    model = zoo.build(SPEC, seed=5).eval()
    onnx_bytes, diff = export_checked(model, SPEC.input_shape)  # the cloud's publish path
    assert diff <= 1e-4
    return model, onnx_bytes


@pytest.fixture
def onnx_file(tmp_path: Path, language_model: tuple[torch.nn.Module, bytes]) -> Path:
    path = tmp_path / "student.onnx"
    path.write_bytes(language_model[1])
    return path


def _torch_greedy(model: torch.nn.Module, prompt: bytes, count: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            logits = model(torch.tensor([ids], dtype=torch.float32))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_decoding_matches_pytorch_token_by_token(
    language_model: tuple[torch.nn.Module, bytes], onnx_file: Path
) -> None:
    model, onnx_bytes = language_model
    ids = np.random.default_rng(1).integers(0, 256, (3, CONTEXT))
    assert token_parity(model, onnx_bytes, ids) < 1e-4
    prompt = "split KD"
    generator = Generator(onnx_file)
    count = CONTEXT - len(prompt)
    assert list(generator.tokens(prompt, count)) == _torch_greedy(model, prompt.encode(), count)
    # Without the cache: the same tokens, by recomputing the window each time.
    assert list(generator.recompute_tokens(prompt, count)) == list(generator.tokens(prompt, count))
    assert generator.stats.tokens == count and generator.stats.first_token_seconds > 0


def test_generation_slides_past_the_context_and_streams_whole_characters(onnx_file: Path) -> None:
    generator = Generator(onnx_file)
    tokens = list(generator.tokens("é", 3 * CONTEXT, temperature=1.0, seed=3))
    assert len(tokens) == 3 * CONTEXT
    pieces = list(generator.text("é", 3 * CONTEXT, temperature=1.0, seed=3))
    assert "".join(pieces) == decode(tokens)
    # Sampling is seeded: the same seed gives the same text, another seed another.
    assert list(generator.tokens("é", 40, temperature=1.0, seed=3)) == tokens[:40]
    assert list(generator.tokens("é", 40, temperature=1.0, seed=4)) != tokens[:40]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ("x" * (CONTEXT + 1), 5, rf"prompt is {CONTEXT + 1} bytes .* reads 1\.\.{CONTEXT}"),
        ("", 5, "prompt is 0 bytes"),
        ("hi", 0, rf"max tokens must be in 1\.\.{MAX_NEW_TOKENS}, got 0"),
        ("hi", MAX_NEW_TOKENS + 1, "max tokens must be in"),
    ],
)
def test_bad_requests_are_refused_before_decoding(
    onnx_file: Path, prompt: str, max_tokens: int, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        next(Generator(onnx_file).tokens(prompt, max_tokens))


def test_a_classifier_model_cannot_generate(tmp_path: Path) -> None:
    spec = ModelSpec("mlp", (4,), 3, widths=(8,))
    path = tmp_path / "classifier.onnx"
    path.write_bytes(export_checked(zoo.build(spec), spec.input_shape)[0])
    with pytest.raises(EdgeError, match="not a splitkd language model"):
        Generator(path)


def test_heldout_perplexity_matches_pytorch(
    language_model: tuple[torch.nn.Module, bytes], onnx_file: Path
) -> None:
    model, _ = language_model
    tokens = encode("held-out text, never trained on. " * 8)
    x = np.stack([tokens[i : i + CONTEXT] for i in (0, 30, 60)]).astype(np.float32)
    y = np.stack([tokens[i + 1 : i + CONTEXT + 1] for i in (0, 30, 60)]).astype(np.int64)
    perplexity, accuracy = heldout_scores(Generator(onnx_file), x, y, batch=2)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).reshape(-1, 256)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).reshape(-1))
    assert perplexity == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    assert 0.0 <= accuracy <= 1.0


def test_generate_command_streams_and_refuses_bad_input(
    onnx_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        edge_main(
            ["generate", "--prompt", "edge", "--max-tokens", "8", "--onnx-model", str(onnx_file)]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "8 tokens" in out.err and "tokens/s" in out.err
    assert out.out[:-1] == "".join(Generator(onnx_file).text("edge", 8))
    code = edge_main(["generate", "--prompt", "x" * 99, "--onnx-model", str(onnx_file)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"splitkd-edge: error: the prompt is 99 bytes of UTF-8; this model reads 1..{CONTEXT}"
    ]


def test_generation_needs_no_torch(onnx_file: Path) -> None:
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from pathlib import Path\n"
        "from edge_agent.generate import Generator\n"
        f"print(''.join(Generator(Path({str(onnx_file)!r})).text('no torch', 5)) != '')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_http_generate_streams_text(tmp_path: Path, onnx_file: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.root.mkdir(parents=True)
    data = onnx_file.read_bytes()
    metadata = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "input_shape": [CONTEXT],
        "num_classes": 256,
        "size_bytes": len(data),
    }
    store.install("student-lm", 1, onnx_file, metadata)
    expected = "".join(Generator(store.current().path).text("hello", 12))
    client = TestClient(create_app(store, token="secret"))
    auth = {"authorization": "Bearer secret"}
    assert client.get("/healthz").json()["status"] == "ok"
    classify = client.post("/v1/predict", json={"inputs": [[0.0] * CONTEXT]}, headers=auth)
    assert classify.status_code == 503 and "is a language model" in classify.json()["detail"]
    assert client.post("/v1/generate", json={"prompt": "hello"}).status_code == 401
    with client.stream(
        "POST", "/v1/generate", json={"prompt": "hello", "max_tokens": 12}, headers=auth
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "".join(response.iter_text()) == expected
    refused = client.post("/v1/generate", json={"prompt": "x" * 50, "max_tokens": 3}, headers=auth)
    assert refused.status_code == 400 and "this model reads 1..24" in refused.json()["detail"]
    refused = client.post("/v1/generate", json={"prompt": "x", "max_tokens": 0}, headers=auth)
    assert refused.status_code == 400 and "max tokens must be in" in refused.json()["detail"]


def test_a_language_model_does_not_classify(onnx_file: Path) -> None:
    from edge_agent.inference import Predictor

    with pytest.raises(EdgeError, match="is a language model: it generates text"):
        Predictor(onnx_file, (CONTEXT,))
