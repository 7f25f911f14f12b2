"""A user's own teacher: a local Hugging Face causal LM directory (``--teacher-hf DIR``).

Read as data, never executed: ``config.json`` gives the architecture (only the
LLaMA family's, listed in ``SUPPORTED``), the ``*.safetensors`` files give the
weights, which are copied into splitkd's own LLaMA (splitkd/models/llama.py).
No ``transformers``, no remote code, no download; a ``pytorch_model.bin`` is a
pickle and is refused. The teacher's vocabulary must be splitkd's byte-level one
(256 tokens: id = UTF-8 byte, splitkd/data/text.py), since the devices tokenize
their text that way and the KD loss compares distributions token by token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cloud_service.teacher import Teacher
from splitkd.data.text import CONTEXT, VOCABULARY
from splitkd.errors import InvalidArgument
from splitkd.models import llama, zoo
from splitkd.models.spec import MAX_LAYERS, ModelSpec

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_UNSUPPORTED_KEYS = ("attention_bias", "mlp_bias")


def load_hf_teacher(folder: Path, context: int = CONTEXT) -> Teacher:
    """The teacher in ``folder`` as a staged model, or one line saying why not."""
    config = _config(folder)
    spec = _spec(folder, config, context)
    state = _weights(folder)
    model = zoo.build(spec)
    own = _renamed(folder, state, spec, bool(config.get("tie_word_embeddings", False)))
    expected = model.state_dict()
    if set(own) != set(expected):
        missing, extra = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
        raise InvalidArgument(
            f"{folder}: the weights do not match config.json (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, value in own.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise InvalidArgument(
                f"{folder}: weight for {name} has shape {list(value.shape)}, config.json "
                f"implies {list(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in own.items()})
    model.eval()
    log.info("teacher %s loaded from %s", spec.describe(), folder)
    return Teacher(spec, model, None, folder.name)


def _config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InvalidArgument(f"Hugging Face model folder {folder} does not exist")
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument(f"{folder} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} is not a JSON object")
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    if not any(a in SUPPORTED for a in architectures):
        raise InvalidArgument(
            f"{folder}: architecture {architectures} is not supported; splitkd loads "
            f"{', '.join(SUPPORTED)}"
        )
    for key in _UNSUPPORTED_KEYS:
        if config.get(key):
            raise InvalidArgument(f"{folder}: {key} is not supported (LLaMA has no biases)")
    return config


def _rope_theta(folder: Path, config: dict[str, Any]) -> float:
    """RoPE base; only the plain rotation (scaled variants would need their own code).

    Older configs say ``rope_theta`` and ``rope_scaling``, newer ``rope_parameters``."""
    theta = float(config.get("rope_theta", 10000.0))
    for key in ("rope_parameters", "rope_scaling"):
        parameters = config.get(key) or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"{folder}/config.json: {key} is not an object")
        kind = parameters.get("rope_type", parameters.get("type", "default"))
        if kind != "default":
            raise InvalidArgument(f"{folder}: RoPE type {kind!r} is not supported (only default)")
        theta = float(parameters.get("rope_theta", theta))
    return theta


def _spec(folder: Path, config: dict[str, Any], context: int) -> ModelSpec:
    try:
        width, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        vocabulary = int(config["vocab_size"])
        options = {
            "intermediate": float(config["intermediate_size"]),
            "heads": float(heads),
            "kv_heads": float(config.get("num_key_value_heads") or heads),
            "head_dim": float(config.get("head_dim") or width // heads),
            "eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": _rope_theta(folder, config),
        }
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise InvalidArgument(f"{folder}/config.json lacks a usable {exc}") from None
    if vocabulary != VOCABULARY:
        raise InvalidArgument(
            f"{folder}: a vocabulary of {vocabulary} tokens; splitkd's devices tokenize text "
            f"byte by byte ({VOCABULARY} tokens), so the teacher must use that vocabulary"
        )
    if not 1 <= layers <= MAX_LAYERS:
        raise InvalidArgument(f"{folder}: {layers} layers; splitkd takes 1..{MAX_LAYERS}")
    return ModelSpec(
        llama.FAMILY, (context,), vocabulary, (width,) * layers, (), tuple(sorted(options.items()))
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = f" ({', '.join(pickled)} are pickles, which splitkd never loads)" if pickled else ""
        raise InvalidArgument(f"{folder}: no .safetensors weights{why}; save with safetensors")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidArgument(f"{path} is not a readable safetensors file ({exc})") from None
    return state


def _renamed(
    folder: Path, state: dict[str, torch.Tensor], spec: ModelSpec, tied: bool
) -> dict[str, torch.Tensor]:
    """Hugging Face names to stage names; a tied lm_head becomes a copy of the embedding
    (the embedding lives on the device, the head in the cloud)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and tied and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    last = len(spec.widths)
    renamed: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            rest = rest.removeprefix("self_attn.").removeprefix("mlp.")
            block = int(index)
            renamed[f"stages.0.1.{rest}" if block == 0 else f"stages.{block}.{rest}"] = value
        elif name == "embed_tokens.weight":
            renamed["stages.0.0.table.weight"] = value
        elif name in ("norm.weight", "lm_head.weight"):
            renamed[f"stages.{last}.{name}"] = value
        else:
            raise InvalidArgument(f"{folder}: unexpected weight {name!r} for a LLaMA model")
    return renamed
