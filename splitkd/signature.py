"""The dataset signature: what the edge's data looks like, without the data."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from splitkd.errors import InvalidArgument

# A sample with more values than this is not something an edge model here is
# built for; refusing early keeps a hostile signature from allocating gigabytes.
MAX_SAMPLE_ELEMENTS = 1 << 22
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class DatasetSignature:
    input_shape: tuple[int, ...]
    num_classes: int
    name: str = ""
    # Samples are token ids and labels the next tokens (text, splitkd/lm/text.py):
    # picks the language-model family. Known where the data is loaded, not sent.
    tokens: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.input_shape) <= 3:
            raise InvalidArgument(
                f"input shape {list(self.input_shape)} is not supported: use features (F), "
                "sequences (C, L) or images (C, H, W)"
            )
        if any(d <= 0 for d in self.input_shape):
            raise InvalidArgument(f"input shape {list(self.input_shape)} has a non-positive size")
        if prod(self.input_shape) > MAX_SAMPLE_ELEMENTS:
            raise InvalidArgument(
                f"input shape {list(self.input_shape)} has more than {MAX_SAMPLE_ELEMENTS} values"
            )
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise InvalidArgument(
                f"number of classes must be in 2..{MAX_CLASSES}, got {self.num_classes}"
            )

    @property
    def kind(self) -> str:
        """``text``, ``features``, ``sequence`` or ``image``: picks the model family."""
        if self.tokens:
            return "text"
        return {1: "features", 2: "sequence", 3: "image"}[len(self.input_shape)]

    def describe(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        if self.tokens:
            return f"text of {shape}-token windows, {self.num_classes} tokens"
        return f"{self.kind} {shape}, {self.num_classes} classes"
