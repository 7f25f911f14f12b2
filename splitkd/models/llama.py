"""The LLaMA architecture as a staged model (family ``llama``), for users' own teachers.

A Hugging Face LLaMA-style checkpoint (cloud_service/hf_teacher.py) is loaded
into this re-implementation, not into ``transformers``: the device runs the
teacher's first blocks, and a device must not need ``transformers`` for that.
tests/test_lm_hf.py checks it gives the logits ``transformers`` gives.

Blocks are pre-norm with RMSNorm, rotary positions (the same pairing of the
first and second halves of a head as ``transformers``' ``rotate_half``),
grouped-query attention and a SwiGLU MLP; no biases. Stages: ``[embedding +
block 1, block 2, ..., norm + lm_head]``, as for ``transformer_lm``. The spec's
``options`` carry what widths cannot: ``intermediate``, ``heads``,
``kv_heads``, ``head_dim``, ``eps`` and ``rope_theta``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitkd.errors import InvalidArgument
from splitkd.models.spec import ModelSpec
from splitkd.models.transformer import KeyValue, TokenEmbedding, causal_bias, rotary, rotate
from splitkd.models.zoo import register_family

FAMILY = "llama"
OPTIONS = ("eps", "head_dim", "heads", "intermediate", "kv_heads", "rope_theta")


class RMSNorm(nn.Module):
    constant_init = True  # weights start at 1 (zoo._initialise draws nothing for it)

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaBlock(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        width, eps = spec.widths[0], spec.option("eps", 1e-6)
        self.heads, self.kv_heads = int(spec.option("heads", 1)), int(spec.option("kv_heads", 1))
        self.head_dim = int(spec.option("head_dim", width // self.heads))
        self.theta = spec.option("rope_theta", 10000.0)
        inner = int(spec.option("intermediate", 4 * width))
        self.input_layernorm = RMSNorm(width, eps)
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=False)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.gate_proj = nn.Linear(width, inner, bias=False)
        self.up_proj = nn.Linear(width, inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x, torch.arange(x.shape[1]))[0]

    def cache_layout(self) -> tuple[int, int]:
        return self.kv_heads, self.head_dim

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KeyValue | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        mixed, cache = self._attend(self.input_layernorm(x), positions, past, bias)
        x = x + mixed
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), cache

    def _attend(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KeyValue | None,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary(positions, self.head_dim, self.theta)
        q, k = rotate(q, cos, sin, self.head_dim), rotate(k, cos, sin, self.head_dim)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        groups = self.heads // self.kv_heads
        keys, values = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if bias is None:
            bias = causal_bias(length, k.shape[2])
        scores = (q @ keys.transpose(-1, -2)) * self.head_dim**-0.5 + bias
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights @ values).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(mixed), (k, v)


class LlamaHead(nn.Module):
    language_head = True  # read by splitkd/lm_export.py

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = RMSNorm(spec.widths[0], spec.option("eps", 1e-6))
        self.lm_head = nn.Linear(spec.widths[0], spec.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def check_llama(spec: ModelSpec) -> None:
    options = dict(spec.options)
    if set(options) != set(OPTIONS):
        raise InvalidArgument(f"a llama spec needs options {list(OPTIONS)}, got {sorted(options)}")
    heads, kv_heads, head_dim = (int(options[k]) for k in ("heads", "kv_heads", "head_dim"))
    if len(set(spec.widths)) != 1 or spec.hidden:
        raise InvalidArgument("a llama's blocks share one width and it has no hidden layers")
    if min(heads, kv_heads, head_dim) < 1 or heads % kv_heads or head_dim % 2:
        raise InvalidArgument(
            f"llama heads {heads} must be a multiple of kv_heads {kv_heads}, head_dim "
            f"{head_dim} even"
        )
    if not 1 <= options["intermediate"] <= 65536 or options["eps"] <= 0:
        raise InvalidArgument("llama intermediate size must be in 1..65536 and eps > 0")


@register_family(FAMILY, input_rank=1, standardise=False)
def _llama(spec: ModelSpec) -> list[nn.Module]:
    check_llama(spec)
    blocks = [LlamaBlock(spec) for _ in spec.widths]
    embedding = TokenEmbedding(spec.num_classes, spec.widths[0])
    return [nn.Sequential(embedding, blocks[0]), *blocks[1:], LlamaHead(spec)]
