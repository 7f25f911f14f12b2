"""Text as a dataset of next-token windows: ``text:PATH`` and the built-in ``pydoc-topics``.

The tokenizer is byte-level: a token is one byte of the UTF-8 text (vocabulary
256). It needs no file shipped with the model, has no unknown token, and any
device tokenizes exactly as the cloud does; the price is longer sequences than a
BPE (about one token per character of English). The text must be valid UTF-8 so
that what a model generates decodes back to text.

A sample is a window of ``CONTEXT`` tokens; its labels are the same window
shifted by one (the next token at every position). Windows do not overlap, so
a held-out window is text the model never trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitkd.data.files import DataError
from splitkd.signature import DatasetSignature

BUILTIN = "pydoc-topics"
VOCABULARY = 256
# 192 bytes: two or three lines of text. The key/value cache pays off with the context:
# generating after a full context, it is ~4x recomputing the window (README, "Language models").
CONTEXT = 192
# Enough windows for a held-out part and two edges' shards with some text each.
MIN_WINDOWS = 40
# A corpus is held in memory as bytes and float32 windows (5x): 64 MiB is plenty here.
MAX_BYTES = 64 * 2**20


def builtin_corpus() -> str:
    """The Python documentation's topic pages: ~460 kB of English every Python has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: Path) -> str:
    """The file's text, or one line saying why it cannot be used."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty")
    if size > MAX_BYTES:
        raise DataError(f"{path}: {size} bytes is more text than {MAX_BYTES} bytes")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. iconv -t UTF-8"
        ) from None


def encode(text: str) -> np.ndarray:
    """Byte-level tokens of ``text`` (uint8)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(tokens: list[int] | np.ndarray) -> str:
    """Text of byte tokens; a character cut in half by a window shows as U+FFFD."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def windows(tokens: np.ndarray, context: int = CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping inputs ``[N, context]`` (float32 ids) and next tokens ``[N, context]``."""
    count = (len(tokens) - 1) // context
    index = np.arange(count)[:, None] * context + np.arange(context)[None, :]
    return tokens[index].astype(np.float32), tokens[index + 1].astype(np.int64)


def text_dataset(
    text: str, name: str, source: str, context: int = CONTEXT
) -> tuple[np.ndarray, np.ndarray, DatasetSignature]:
    tokens = encode(text)
    needed = MIN_WINDOWS * context + 1
    if len(tokens) < needed:
        raise DataError(
            f"{source}: {len(tokens)} bytes of text are too few to train and evaluate a "
            f"language model; give at least {needed} ({MIN_WINDOWS} windows of {context})"
        )
    x, y = windows(tokens, context)
    return x, y, DatasetSignature((context,), VOCABULARY, name, tokens=True)


def load_text(spec: str) -> tuple[np.ndarray, np.ndarray, DatasetSignature]:
    """``pydoc-topics`` or ``text:PATH`` as windows and their signature."""
    if spec == BUILTIN:
        return text_dataset(builtin_corpus(), BUILTIN, BUILTIN)
    path = Path(spec.removeprefix("text:")).expanduser()
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    return text_dataset(read_text(path), path.stem, str(path))
