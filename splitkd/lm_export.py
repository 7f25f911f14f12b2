"""A language model to ONNX for incremental decoding: a key/value cache in and out.

The exported graph takes ``ids`` ``[B, S]`` (int64), their ``positions`` ``[S]``
and the cache of every block, ``past_keys``/``past_values`` ``[L, B, H, P, D]``;
it returns ``logits`` ``[B, S, V]`` and ``present_keys``/``present_values``
``[L, B, H, P + S, D]``. A prompt is one call with an empty cache (P = 0), each
next token one call with S = 1: the work per token no longer grows with the text.
The runtime (edge_agent/generate.py) needs onnxruntime and numpy only.

The graph's metadata says what the runtime needs to know: the training context
(``splitkd.context``) and the tokenizer (``splitkd.tokenizer`` = ``bytes``).
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Protocol, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from splitkd.errors import FailedPrecondition
from splitkd.models.normalize import token_vocabulary
from splitkd.models.staged import StagedModel
from splitkd.models.transformer import KeyValue, causal_bias

log = logging.getLogger(__name__)

INPUTS = ("ids", "positions", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")
CONTEXT_KEY = "splitkd.context"
TOKENIZER_KEY = "splitkd.tokenizer"
# As for the classifiers' export (splitkd/onnx_export.py): summation-order noise only.
PARITY_TOLERANCE = 1e-4


def is_language_model(model: nn.Module) -> bool:
    """A staged model whose last stage gives next-token logits at every position."""
    return isinstance(model, StagedModel) and bool(
        getattr(model.stages[-1], "language_head", False)
    )


class CachedBlock(Protocol):
    """What a block of a language family offers (transformer.Block, llama.LlamaBlock)."""

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KeyValue | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]: ...

    def cache_layout(self) -> tuple[int, int]: ...


class IncrementalDecoder(nn.Module):
    """The staged model's blocks, each taking and returning its keys and values."""

    def __init__(self, model: StagedModel) -> None:
        super().__init__()
        first = model.stages[0]
        assert isinstance(first, nn.Sequential)
        self.embedding = first[0]
        self.blocks = nn.ModuleList([first[1], *model.stages[1:-1]])
        self.head = model.stages[-1]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.embedding(ids)
        bias = causal_bias(ids.shape[1], past_keys.shape[3] + ids.shape[1])
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            past: KeyValue = (past_keys[index], past_values[index])
            x, (k, v) = cast(CachedBlock, block).decode(x, positions, past, bias)
            keys.append(k)
            values.append(v)
        return self.head(x), torch.stack(keys), torch.stack(values)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """``[L, B, H, P, D]`` of a cache holding ``length`` positions."""
        heads, width = cast(CachedBlock, self.blocks[0]).cache_layout()
        return (len(self.blocks), batch, heads, length, width)


def export_decoder(model: StagedModel, context: int) -> bytes:
    """ONNX bytes of ``model``'s incremental decoder (dynamic batch, new and past lengths)."""
    decoder = IncrementalDecoder(model).eval()
    example_past = torch.zeros(decoder.cache_shape(1, 3))
    example = (
        torch.zeros((1, 2), dtype=torch.int64),
        torch.arange(3, 5),
        example_past,
        example_past,
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, as in onnx_export
        torch.onnx.export(
            decoder,
            example,
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes={
                "ids": {0: "batch", 1: "new"},
                "positions": {0: "new"},
                "past_keys": {1: "batch", 3: "past"},
                "past_values": {1: "batch", 3: "past"},
                "logits": {0: "batch", 1: "new"},
                "present_keys": {1: "batch", 3: "total"},
                "present_values": {1: "batch", 3: "total"},
            },
            opset_version=17,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {CONTEXT_KEY: str(context), TOKENIZER_KEY: "bytes"})
    return graph.SerializeToString()


def token_parity(model: StagedModel, onnx_bytes: bytes, ids: np.ndarray) -> float:
    """Max |logit difference| between onnxruntime decoding ``ids`` one token at a time
    (a prompt of half of them, then the rest through the cache) and PyTorch on the whole."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    decoder = IncrementalDecoder(model).eval()
    batch, length = ids.shape
    cache = np.zeros(decoder.cache_shape(batch, 0), dtype=np.float32)
    keys, values = cache, cache
    prompt = max(1, length // 2)
    pieces = [(0, prompt)] + [(t, t + 1) for t in range(prompt, length)]
    outputs = []
    for start, stop in pieces:
        feed = {
            "ids": ids[:, start:stop].astype(np.int64),
            "positions": np.arange(start, stop, dtype=np.int64),
            "past_keys": keys,
            "past_values": values,
        }
        logits, keys, values = session.run(list(OUTPUTS), feed)
        outputs.append(logits)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids.astype(np.float32))).numpy()
    return float(np.max(np.abs(np.concatenate(outputs, axis=1) - expected)))


def export_decoder_checked(model: StagedModel, context: int, seed: int = 0) -> tuple[bytes, float]:
    """Export, then check token by token against PyTorch; refuse a model that does not match."""
    onnx_bytes = export_decoder(model, context)
    vocabulary = token_vocabulary(model)
    ids = np.random.default_rng(seed).integers(0, vocabulary, (2, context))
    diff = token_parity(model, onnx_bytes, ids)
    if not diff <= PARITY_TOLERANCE:
        raise FailedPrecondition(
            f"ONNX decoder does not match PyTorch token by token (max abs diff {diff:.2e})"
        )
    log.info(
        "exported ONNX decoder (%d bytes), max abs diff vs PyTorch %.2e", len(onnx_bytes), diff
    )
    return onnx_bytes, diff
