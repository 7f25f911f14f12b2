"""Text generation on the device: onnxruntime and numpy only (no torch).

Runs the incremental decoder that splitkd/lm_export.py exports: the prompt in
one call, then one call per new token with the key/value cache. Past the
training context the cache slides: the oldest position is dropped, and rotary
positions keep every remaining pair at its true distance, so each token sees
the last ``context`` tokens, as the model saw text in training.

Decoding is greedy (the most likely next byte) at temperature 0, else sampled
from the softmax at that temperature with a seeded generator.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import EdgeError
from edge_agent.inference import open_session
from splitkd.data.text import encode
from splitkd.errors import InvalidArgument

MAX_NEW_TOKENS = 2048
INPUTS = ("ids", "positions", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")


@dataclass
class GenerationStats:
    tokens: int = 0
    first_token_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def is_language_model(path: Path) -> bool:
    """Whether the ONNX file at ``path`` is a splitkd language model's decoder (its inputs)."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # a damaged file: the predictor refuses it in its own words
        return False
    return tuple(i.name for i in session.get_inputs()) == INPUTS


class Generator:
    def __init__(self, path: Path, threads: int = 1) -> None:
        self.session = open_session(path, threads)
        names = tuple(i.name for i in self.session.get_inputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        if names != INPUTS or meta.get("splitkd.tokenizer") != "bytes":
            raise EdgeError(f"{path} is not a splitkd language model (it cannot generate text)")
        self.context = int(meta["splitkd.context"])
        layers, _, heads, _, width = self.session.get_inputs()[2].shape
        self._cache_layout = (int(layers), int(heads), int(width))
        self.stats = GenerationStats()

    def check(self, prompt: str, max_tokens: int) -> np.ndarray:
        """The prompt's tokens, or one line saying why this request cannot run."""
        if not 1 <= max_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(f"max tokens must be in 1..{MAX_NEW_TOKENS}, got {max_tokens}")
        tokens = encode(prompt)
        if not 1 <= len(tokens) <= self.context:
            raise InvalidArgument(
                f"the prompt is {len(tokens)} bytes of UTF-8; this model reads 1..{self.context}"
            )
        return tokens

    def empty_cache(self, batch: int = 1) -> np.ndarray:
        layers, heads, width = self._cache_layout
        return np.zeros((layers, batch, heads, 0, width), dtype=np.float32)

    def tokens(
        self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> Iterator[int]:
        """The next ``max_tokens`` byte tokens after ``prompt``, as they are decoded."""
        ids = self.check(prompt, max_tokens)
        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        self.stats = GenerationStats()
        keys = values = self.empty_cache()
        positions = np.arange(len(ids), dtype=np.int64)
        feed_ids = ids[None].astype(np.int64)
        outputs = list(OUTPUTS)
        for _ in range(max_tokens):
            feed = {
                "ids": feed_ids,
                "positions": positions,
                "past_keys": keys,
                "past_values": values,
            }
            logits, keys, values = self.session.run(outputs, feed)
            token = _choose(logits[0, -1], temperature, rng)
            self.stats.tokens += 1
            self.stats.seconds = time.perf_counter() - started
            if self.stats.tokens == 1:
                self.stats.first_token_seconds = self.stats.seconds
            yield token
            # Keep context - 1 positions: with the new token, the model sees `context`.
            keys, values = keys[:, :, :, 1 - self.context :], values[:, :, :, 1 - self.context :]
            feed_ids = np.array([[token]], dtype=np.int64)
            positions = positions[-1:] + 1

    def text(
        self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> Iterator[str]:
        """The continuation as text pieces: each complete UTF-8 character as soon as it is."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in self.tokens(prompt, max_tokens, temperature, seed):
            piece = decoder.decode(bytes([token]))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def recompute_tokens(self, prompt: str, max_tokens: int) -> Iterator[int]:
        """Greedy tokens without the cache: the whole window again for every token (the
        baseline the cache is measured against; same tokens as ``tokens``)."""
        ids = list(self.check(prompt, max_tokens))
        for _ in range(max_tokens):
            window = np.array([ids[-self.context :]], dtype=np.int64)
            feed = {
                "ids": window,
                "positions": np.arange(window.shape[1], dtype=np.int64),
                "past_keys": self.empty_cache(),
                "past_values": self.empty_cache(),
            }
            (logits,) = self.session.run(["logits"], feed)
            ids.append(int(np.argmax(logits[0, -1])))
            yield ids[-1]


@dataclass(frozen=True)
class LanguageScores:
    """A language-model student on held-out text, as the training report shows it."""

    accuracy: float  # next-token accuracy
    perplexity: float

    @classmethod
    def of(cls, path: Path, heldout: Any) -> LanguageScores:
        perplexity, accuracy = heldout_scores(Generator(path), heldout.x, heldout.y)
        return cls(accuracy, perplexity)

    def as_report(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "perplexity": self.perplexity}


def heldout_scores(
    generator: Generator, x: np.ndarray, y: np.ndarray, batch: int = 64
) -> tuple[float, float]:
    """Perplexity and next-token accuracy on windows ``x`` (ids) with next tokens ``y``."""
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(x), batch):
        ids = x[start : start + batch].astype(np.int64)
        labels = y[start : start + batch]
        empty = generator.empty_cache(len(ids))
        feed = {"ids": ids, "positions": np.arange(ids.shape[1], dtype=np.int64)}
        (logits,) = generator.session.run(
            ["logits"], {**feed, "past_keys": empty, "past_values": empty}
        )
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_probabilities, labels[..., None], axis=-1)
        total_loss -= float(picked.sum())
        correct += int((logits.argmax(axis=-1) == labels).sum())
        count += labels.size
    return float(np.exp(total_loss / max(1, count))), correct / max(1, count)


def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    scaled = (logits - logits.max()) / temperature
    probabilities = np.exp(scaled)
    return int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))
