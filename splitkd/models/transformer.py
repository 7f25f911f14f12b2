"""Decoder-only causal transformers: a language model and a sequence classifier.

Pre-norm blocks (LayerNorm, causal self-attention, LayerNorm, GELU MLP) with
rotary positions (RoPE): attention depends only on how far apart two tokens are,
so the incremental decoder (splitkd/lm/decoder.py) can slide its key/value cache
past the training context without re-encoding anything.

Stages: ``[embedding + block 1, block 2, ..., block L, final norm + head]``. The
embedding is not a stage of its own: it is a table lookup, so its output *is*
the token ids, and a cut right after it would send the raw text. Every cut is
therefore a block boundary after at least one block (cut 0, which would send
the ids themselves, is refused like raw inputs by ``ModelSpec.check_cut``).

A spec's ``widths`` are the blocks' widths (all equal, one per block),
``input_shape`` is ``(context,)`` and ``num_classes`` the vocabulary for the
language model (``transformer_lm``) or the classes for ``transformer_cls``.
Samples are token ids held as float32 (as every ``Dataset`` holds its inputs;
exact up to 2**24): stage 0 casts them and never standardises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitkd.errors import InvalidArgument
from splitkd.models.spec import LM_FAMILY, ModelSpec
from splitkd.models.zoo import register_family

CLASSIFIER_FAMILY = "transformer_cls"
# Byte-level text (splitkd/lm/text.py): the classifier's inputs are bytes too.
BYTE_VOCABULARY = 256
HEAD_WIDTH = 16
MLP_RATIO = 4
ROPE_BASE = 10000.0

KeyValue = tuple[torch.Tensor, torch.Tensor]


def heads_of(width: int) -> int:
    return max(1, width // HEAD_WIDTH)


def check_transformer(spec: ModelSpec) -> None:
    """What the generic spec checks cannot know about a transformer."""
    width = spec.widths[0]
    if any(w != width for w in spec.widths):
        raise InvalidArgument(f"a transformer's blocks share one width, got {list(spec.widths)}")
    if width > HEAD_WIDTH and width % HEAD_WIDTH:
        raise InvalidArgument(
            f"transformer width {width} must be below {HEAD_WIDTH} or a multiple of it"
        )
    if spec.hidden:
        raise InvalidArgument("a transformer takes no hidden layers (its head is one stage)")
    if spec.family == LM_FAMILY and spec.num_classes > 65536:
        raise InvalidArgument(f"vocabulary of {spec.num_classes} tokens is above 65536")


def rotary(
    positions: torch.Tensor, head_width: int, base: float = ROPE_BASE
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[S, head_width / 2]`` of the rotation at each position."""
    half = head_width // 2
    inverse = base ** (-torch.arange(half, dtype=torch.float32) / max(1, half))
    angles = positions.to(torch.float32)[:, None] * inverse[None, :]
    return torch.cos(angles), torch.sin(angles)


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dimension of ``[B, H, S, D]``.

    ``width`` is D as a Python int when the caller knows it: the exported graph then
    slices by constants instead of computing the halves from the tensor's shape.
    """
    size = x.shape[-1] if width is None else width
    half = size // 2
    if half == 0:
        return x
    first, second = x[..., :half], x[..., half : 2 * half]
    rotated = (first * cos - second * sin, first * sin + second * cos)
    if 2 * half == size:
        return torch.cat(rotated, dim=-1)
    return torch.cat((*rotated, x[..., 2 * half :]), dim=-1)


def causal_bias(length: int, total: int) -> torch.Tensor:
    """``[S, P + S]``: 0 where the S newest queries may see a cached key, -inf elsewhere.

    By index in the cache, so keys keep the rotation of the position they were
    computed at (what RoPE needs), whatever was dropped before them. Built once
    per call and shared by every block (fewer nodes in the exported decoder).
    """
    query_index = torch.arange(length)[:, None] + (total - length)
    allowed = torch.arange(total)[None, :] <= query_index
    return torch.where(allowed, torch.tensor(0.0), torch.tensor(float("-inf")))


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = heads_of(width)
        self.head_width = width // self.heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KeyValue | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Causal attention of ``x`` ``[B, S, W]`` at ``positions`` over ``past`` + itself.

        Returns the output and the keys/values ``[B, H, P + S, D]`` to cache.
        ``bias`` is ``causal_bias(S, P + S)``, computed here when not given.
        """
        length = x.shape[1]
        # [B, S, 3W] -> [3, B, H, S, D]: one Reshape and one Transpose for q, k and v.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_width)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        cos, sin = rotary(positions, self.head_width)
        q, k = rotate(q, cos, sin, self.head_width), rotate(k, cos, sin, self.head_width)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if bias is None and past is None:
            # Training: PyTorch's fused attention, half the time of the plain form on a CPU.
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Decoding (what lm_export exports): the plain form, fewer ONNX nodes per token.
            if bias is None:
                bias = causal_bias(length, k.shape[2])
            scores = q @ k.transpose(-1, -2) / float(self.head_width) ** 0.5 + bias
            mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).flatten(2)), (k, v)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, MLP_RATIO * width), nn.GELU(), nn.Linear(MLP_RATIO * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x, torch.arange(x.shape[1]))[0]

    def cache_layout(self) -> tuple[int, int]:
        """Heads and width per head of the keys/values this block caches."""
        return self.attention.heads, self.attention.head_width

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KeyValue | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        mixed, cache = self.attention(self.norm1(x), positions, past, bias)
        x = x + mixed
        return x + self.mlp(self.norm2(x)), cache


class TokenEmbedding(nn.Module):
    """Token ids (any numeric dtype) to vectors; read by ``normalize``: never standardised."""

    takes_token_ids = True

    def __init__(self, vocabulary: int, width: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.table = nn.Embedding(vocabulary, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.long())


class LanguageHead(nn.Sequential):
    """Final norm, then next-token logits ``[B, T, V]``."""

    language_head = True  # read by splitkd/lm_export.py

    def __init__(self, width: int, vocabulary: int) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, vocabulary))


class ClassifierHead(nn.Module):
    """Final norm, mean over the sequence, then class logits ``[B, C]``."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(x).mean(dim=1))


def _stages(spec: ModelSpec, head: nn.Module, vocabulary: int) -> list[nn.Module]:
    check_transformer(spec)
    width = spec.widths[0]
    blocks = [Block(width) for _ in spec.widths]
    return [nn.Sequential(TokenEmbedding(vocabulary, width), blocks[0]), *blocks[1:], head]


@register_family(LM_FAMILY, input_rank=1, standardise=False)
def _language_model(spec: ModelSpec) -> list[nn.Module]:
    head = LanguageHead(spec.widths[0], spec.num_classes)
    return _stages(spec, head, spec.num_classes)


@register_family(CLASSIFIER_FAMILY, input_rank=1, standardise=False)
def _sequence_classifier(spec: ModelSpec) -> list[nn.Module]:
    return _stages(spec, ClassifierHead(spec.widths[0], spec.num_classes), BYTE_VOCABULARY)
