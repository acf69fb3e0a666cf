"""Hugging Face Llama / Mistral / Qwen2 checkpoints <-> ``models.LM``, with no torch.

    model = load_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)   # config.json + safetensors
    save_pretrained(model, "out_dir")   # transformers.AutoModelForCausalLM loads it back

HF ``nn.Linear`` weights are ``[out, in]``; our einsum kernels put inputs first and split
heads: q ``[D, N, H]`` = ``W_q.T.reshape(D, N, H)``, o ``[N, H, D]`` = ``W_o.T.reshape(N, H, D)``,
gate/up ``[D, F]``, down ``[F, D]``, lm_head ``[D, V]``; biases ``[N*H]`` become ``[N, H]``.
RoPE uses HF's rotate-half layout (``models.layers.rope``), so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.configs import ModelConfig
from models.hf.config import ConversionError, config_from_hf, config_to_hf, dtype_name
from models.hf.safetensors import Checkpoint, CheckpointNotFoundError, save_checkpoint
from models.lm import LM, abstract

CONFIG_FILE = "config.json"
# Tensors some checkpoints carry that hold no weights of the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the parameter it fills.

    ``kind``: ``"same"`` (identical layout), ``"bias"`` (HF flattens the trailing dims) or
    ``"linear"`` (an ``[out, in]`` HF weight; ``n_in`` leading dims of our kernel are inputs).
    """

    hf_name: str
    path: tuple
    kind: str = "same"
    n_in: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "bias":
            return (math.prod(shape),)
        if self.kind == "linear":
            return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))
        return tuple(shape)

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (w.T if self.kind == "linear" else w).reshape(shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(w.reshape(self.hf_shape(w.shape)[::-1]).T)
        return w.reshape(self.hf_shape(w.shape))


def tensor_map(cfg: ModelConfig) -> list[_Tensor]:
    """Every HF tensor of ``cfg``'s checkpoint and the ``LM`` parameter path it maps to."""
    specs = [_Tensor("model.embed_tokens.weight", ("embed", "embedding"))]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("blocks", i)
        specs.append(_Tensor(hf + "input_layernorm.weight", (*ours, "mixer_norm", "scale")))
        for name in "qkv":
            attn = (*ours, "mixer", name)
            specs.append(_Tensor(f"{hf}self_attn.{name}_proj.weight", (*attn, "kernel"), "linear"))
            if cfg.qkv_bias:
                specs.append(_Tensor(f"{hf}self_attn.{name}_proj.bias", (*attn, "bias"), "bias"))
        o = (*ours, "mixer", "o")
        specs.append(_Tensor(hf + "self_attn.o_proj.weight", (*o, "kernel"), "linear", n_in=2))
        if cfg.out_bias:
            specs.append(_Tensor(hf + "self_attn.o_proj.bias", (*o, "bias")))
        specs.append(
            _Tensor(hf + "post_attention_layernorm.weight", (*ours, "channel_norm", "scale"))
        )
        for name in ("gate", "up", "down"):
            mlp = (*ours, "channel", name)
            specs.append(_Tensor(f"{hf}mlp.{name}_proj.weight", (*mlp, "kernel"), "linear"))
            if cfg.mlp_bias:
                specs.append(_Tensor(f"{hf}mlp.{name}_proj.bias", (*mlp, "bias")))
    specs.append(_Tensor("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs


def _params(model: LM, specs: list[_Tensor]) -> dict:
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    unmapped = sorted(set(flat) - {s.path for s in specs})
    if unmapped:  # config_to_hf rejects such models first; this guards the mapping itself
        raise ConversionError(f"parameters with no Hugging Face name: {unmapped[:5]}")
    return flat


def read_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of the Hugging Face directory ``path``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"Hugging Face checkpoint directory not found: {path}")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointNotFoundError(
            f"{config_file} not found (a Hugging Face checkpoint needs config.json and "
            "*.safetensors)"
        )
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{config_file}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{config_file}: not a JSON object")
    return hf


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> LM:
    """A ``models.LM`` with the weights of a Hugging Face directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards listed by
        ``model.safetensors.index.json``) of a ``LlamaForCausalLM``, ``MistralForCausalLM`` or
        ``Qwen2ForCausalLM``.
      dtype: parameter and compute dtype (float32, bfloat16 or float16).

    Returns:
      The model; ``model(tokens_BT)`` gives float32 logits ``[B, T, V]``.

    Raises:
      CheckpointNotFoundError (a FileNotFoundError): no directory, config.json or safetensors.
      ConversionError (a ValueError): unsupported architecture or feature, missing, unexpected
        or mis-shaped tensor.
      SafetensorsError (a ValueError): truncated or malformed safetensors file.
    """
    path = os.fspath(path)
    dt = dtype_name(dtype)
    cfg = config_from_hf(read_config(path)).replace(param_dtype=dt, dtype=dt)
    ckpt = Checkpoint(path)
    model = abstract(cfg)
    specs = tensor_map(cfg)
    flat = _params(model, specs)
    values = {}
    for spec in specs:
        if spec.hf_name not in ckpt:
            raise ConversionError(
                f"{path}: tensor {spec.hf_name!r} missing from the checkpoint "
                f"({cfg.hf_architecture} per config.json)"
            )
        w = ckpt[spec.hf_name]
        shape = tuple(flat[spec.path].shape)
        if w.shape != spec.hf_shape(shape):
            raise ConversionError(
                f"{ckpt.location(spec.hf_name)}: tensor {spec.hf_name!r} has shape "
                f"{list(w.shape)}, config.json implies {list(spec.hf_shape(shape))}"
            )
        values[spec.path] = jnp.asarray(spec.to_ours(w, shape).astype(jnp.dtype(dt)))
    known = {s.hf_name for s in specs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unexpected = sorted(n for n in ckpt if n not in known and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(
            f"{path}: {len(unexpected)} checkpoint tensor(s) not described by config.json, e.g. "
            f"{unexpected[:3]}"
        )
    nnx.update(model, nnx.from_flat_state(values))
    return model


def save_pretrained(model: LM, path: str | os.PathLike, *, max_shard_bytes: int | None = None):
    """Write ``model`` as a Hugging Face directory: ``config.json`` and ``model.safetensors``.

    Args:
      model: a ``models.LM`` whose config a supported architecture can express
        (``config_to_hf``).
      path: output directory (created if needed; earlier checkpoint files there are replaced).
      max_shard_bytes: split the weights into shards of at most this size (plus
        ``model.safetensors.index.json``), as ``transformers`` does for large models.
    """
    hf = config_to_hf(model.config)
    specs = tensor_map(model.config)
    flat = _params(model, specs)
    tensors = {s.hf_name: s.to_hf(np.asarray(jax.device_get(flat[s.path][...]))) for s in specs}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_checkpoint(tensors, path, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
