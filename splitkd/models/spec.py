"""Architecture specs: a registered family name plus plain JSON parameters.

A spec is data, never code: a peer or a config file can only choose among the
families this process registered, with numbers validated here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

from splitkd.errors import InvalidArgument
from splitkd.signature import DatasetSignature

MAX_WIDTH = 8192
MAX_LAYERS = 16
MAX_OPTIONS = 16
LM_FAMILY = "transformer_lm"
# Families whose outputs are next-token logits at every position ([B, T, V]).
LANGUAGE_FAMILIES = frozenset({LM_FAMILY, "llama"})


@dataclass(frozen=True)
class ModelSpec:
    """``family`` + layer widths for a given input shape and class count.

    ``widths`` are the feature extractor's widths (hidden units for ``mlp``,
    channels for the convolutional families); ``hidden`` are fully connected
    layers after the extractor. Each width and each hidden layer is one stage,
    the final classifier is the last stage.
    """

    family: str
    input_shape: tuple[int, ...]
    num_classes: int
    widths: tuple[int, ...]
    hidden: tuple[int, ...] = field(default=())
    # Named numbers a family needs beyond widths (e.g. a LLaMA's heads and RoPE
    # base), sorted by name; validated by the family's builder. Empty for most.
    options: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self) -> None:
        families = _registered()
        if self.family not in families:
            raise InvalidArgument(
                f"unknown model family {self.family!r}; known: {', '.join(sorted(families))}"
            )
        DatasetSignature(self.input_shape, self.num_classes)  # same limits as a signature
        expected_rank = families[self.family]
        if len(self.input_shape) != expected_rank:
            raise InvalidArgument(
                f"family {self.family} takes inputs of rank {expected_rank}, got shape {list(self.input_shape)}"
            )
        layers = list(self.widths) + list(self.hidden)
        if not self.widths or len(layers) > MAX_LAYERS:
            raise InvalidArgument(f"a model needs 1..{MAX_LAYERS} layers, got {len(layers)}")
        if any(not 1 <= w <= MAX_WIDTH for w in layers):
            raise InvalidArgument(f"layer widths must be in 1..{MAX_WIDTH}, got {layers}")
        if len(self.options) > MAX_OPTIONS or any(
            not isinstance(k, str) or not isfinite(v) for k, v in self.options
        ):
            raise InvalidArgument(f"model options must be at most {MAX_OPTIONS} finite numbers")

    def option(self, name: str, default: float) -> float:
        return dict(self.options).get(name, default)

    @property
    def num_stages(self) -> int:
        return len(self.widths) + len(self.hidden) + 1

    @property
    def signature(self) -> DatasetSignature:
        tokens = self.family in _token_families()
        return DatasetSignature(self.input_shape, self.num_classes, tokens=tokens)

    def to_json(self) -> str:
        fields: dict[str, Any] = {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "hidden": list(self.hidden),
        }
        if self.options:  # absent for the families without: their JSON is as before
            fields["options"] = dict(self.options)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, family: str, text: str) -> ModelSpec:
        try:
            raw: Any = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            return cls(
                family=family,
                input_shape=tuple(int(d) for d in raw["input_shape"]),
                num_classes=int(raw["num_classes"]),
                widths=tuple(int(w) for w in raw["widths"]),
                hidden=tuple(int(w) for w in raw.get("hidden", [])),
                options=_options(raw.get("options", {})),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument(f"model spec for {family!r} is not valid: {exc}") from exc

    def describe(self) -> str:
        return f"{self.family}(widths={list(self.widths)}, hidden={list(self.hidden)})"

    def check_cut(self, cut: int, what: str = "cut") -> None:
        """A cut k keeps stages [0, k) on the device. k = 0 would send raw inputs."""
        if cut <= 0:
            raise InvalidArgument(
                f"{what} {cut} would send raw inputs over the network; the first stage must run on the device"
            )
        if cut >= self.num_stages:
            raise InvalidArgument(
                f"{what} {cut} leaves no stage for the cloud (model has {self.num_stages} stages)"
            )


def _options(raw: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, dict):
        raise TypeError("options are not an object")
    return tuple(sorted((str(k), float(v)) for k, v in raw.items()))


def _registered() -> dict[str, int]:
    """The families ``@register_family`` registered (importing the zoo registers the built-ins)."""
    from splitkd.models import zoo  # here, not at the top: the zoo imports this module

    return zoo.input_ranks()


def _token_families() -> frozenset[str]:
    from splitkd.models import zoo

    return zoo.token_families()


def labels_per_sample(spec: ModelSpec) -> int:
    """A language model has a label (the next token) at every position; a classifier one."""
    return spec.input_shape[0] if spec.family in LANGUAGE_FAMILIES else 1
