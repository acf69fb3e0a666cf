"""Hugging Face Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE / RecurrentGemma <-> ``models.LM``.

    model = load_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)   # config.json + safetensors
    save_pretrained(model, "out_dir")   # transformers.AutoModelForCausalLM loads it back

HF ``nn.Linear`` weights are ``[out, in]``; our einsum kernels put inputs first and split
heads: q ``[D, N, H]`` = ``W_q.T.reshape(D, N, H)``, o ``[N, H, D]`` = ``W_o.T.reshape(N, H, D)``,
gate/up ``[D, F]``, down ``[F, D]``, lm_head ``[D, V]``; biases ``[N*H]`` become ``[N, H]``.
RoPE uses HF's rotate-half layout (``models.layers.rope``), so q/k need no permutation.
No torch is needed.

Mixture of experts: the router ``gate.weight`` ``[E, D]`` is our ``[D, E]``; expert ``e``'s
``[F, D]`` gate/up and ``[D, F]`` down weights are slice ``e`` of our ``[E, D, F]`` /
``[E, F, D]`` transposed. Checkpoints name them per expert, as transformers 5 still saves
them: Mixtral ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down),
Qwen2-MoE ``mlp.experts.{e}.{gate,up,down}_proj`` plus ``mlp.shared_expert.*`` and
``mlp.shared_expert_gate`` ``[1, D]``. Loading also accepts transformers 5's fused in-memory
layout (``mlp.experts.gate_up_proj`` ``[E, 2F, D]``, ``mlp.experts.down_proj`` ``[E, D, F]``,
and Mixtral's ``block_sparse_moe.`` renamed ``mlp.``).

RecurrentGemma: ``model.layers.{i}.temporal_block.`` holds the recurrent block (``linear_x``,
``linear_y``, ``linear_out``, ``conv_1d`` ``[R, 1, W]`` -> our ``[W, R]``, ``rg_lru.*`` in our
layout) or the attention (``{q,k,v,o}_proj``, ``o_proj.bias``); ``temporal_pre_norm`` /
``channel_pre_norm`` / ``model.final_norm`` are the norms, ``mlp_block.*`` the MLP (biases).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.configs import ModelConfig
from models.hf import mamba2
from models.hf.config import (
    ConversionError,
    _infer_architecture,
    config_from_hf,
    config_to_hf,
    dtype_name,
)
from models.hf.safetensors import Checkpoint, CheckpointNotFoundError, save_checkpoint
from models.lm import LM, abstract

CONFIG_FILE = "config.json"
# Tensors some checkpoints carry that hold no weights of the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the parameter it fills.

    ``kind``: ``"same"`` (identical layout), ``"bias"`` (HF flattens the trailing dims),
    ``"linear"`` (an ``[out, in]`` HF weight; ``n_in`` leading dims of our kernel are inputs),
    ``"conv"`` (a depthwise ``nn.Conv1d`` weight ``[R, 1, W]``, ours ``[W, R]``) or
    ``"expert"`` (the ``[out, in]`` weight of expert ``expert``: slice ``expert`` of our
    ``[E, in, out]`` kernel, transposed).
    """

    hf_name: str
    path: tuple
    kind: str = "same"
    n_in: int = 1
    expert: int | None = None

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "conv":
            return (shape[1], 1, shape[0])
        if self.kind == "expert":
            return (shape[2], shape[1])
        if self.kind == "bias":
            return (math.prod(shape),)
        if self.kind == "linear":
            return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))
        return tuple(shape)

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(w[:, 0, :].T)
        if self.kind == "expert":
            return w.T
        return (w.T if self.kind == "linear" else w).reshape(shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(w.T[:, None, :])
        if self.kind == "expert":
            return np.ascontiguousarray(w[self.expert].T)
        if self.kind == "linear":
            return np.ascontiguousarray(w.reshape(self.hf_shape(w.shape)[::-1]).T)
        return w.reshape(self.hf_shape(w.shape))


def tensor_map(cfg: ModelConfig) -> list[_Tensor]:
    """Every HF tensor of ``cfg``'s checkpoint and the ``LM`` parameter path it maps to."""
    if (cfg.hf_architecture or _infer_architecture(cfg)) == mamba2.ARCHITECTURE:
        return [_Tensor(*spec) for spec in mamba2.tensor_names(cfg)]
    if cfg.hf_architecture == "RecurrentGemmaForCausalLM":
        return _recurrent_gemma_tensors(cfg)
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
        if cfg.channel(i) == "moe":
            specs.extend(_moe_tensors(cfg, hf, (*ours, "channel")))
            continue
        for name in ("gate", "up", "down"):
            mlp = (*ours, "channel", name)
            specs.append(_Tensor(f"{hf}mlp.{name}_proj.weight", (*mlp, "kernel"), "linear"))
            if cfg.mlp_bias:
                specs.append(_Tensor(f"{hf}mlp.{name}_proj.bias", (*mlp, "bias")))
    specs.append(_Tensor("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs


def _recurrent_gemma_tensors(cfg: ModelConfig) -> list[_Tensor]:
    specs = [_Tensor("model.embed_tokens.weight", ("embed", "embedding"))]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("blocks", i)
        mixer, block = (*ours, "mixer"), hf + "temporal_block."
        specs.append(_Tensor(hf + "temporal_pre_norm.weight", (*ours, "mixer_norm", "scale")))
        specs.append(_Tensor(hf + "channel_pre_norm.weight", (*ours, "channel_norm", "scale")))
        if cfg.mixer(i) == "rglru":
            for name in ("linear_x", "linear_y", "linear_out"):
                path = (*mixer, name)
                specs.append(_Tensor(f"{block}{name}.weight", (*path, "kernel"), "linear"))
                specs.append(_Tensor(f"{block}{name}.bias", (*path, "bias")))
            specs.append(_Tensor(block + "conv_1d.weight", (*mixer, "conv_w"), "conv"))
            specs.append(_Tensor(block + "conv_1d.bias", (*mixer, "conv_b")))
            for hf_name, name in (
                ("recurrent_param", "a_param"),
                ("input_gate_weight", "input_gate_w"),
                ("input_gate_bias", "input_gate_b"),
                ("recurrent_gate_weight", "a_gate_w"),
                ("recurrent_gate_bias", "a_gate_b"),
            ):
                specs.append(_Tensor(f"{block}rg_lru.{hf_name}", (*mixer, name)))
        else:
            for name in "qkv":
                path = (*mixer, name)
                specs.append(_Tensor(f"{block}{name}_proj.weight", (*path, "kernel"), "linear"))
                if cfg.qkv_bias:
                    specs.append(_Tensor(f"{block}{name}_proj.bias", (*path, "bias"), "bias"))
            o = (*mixer, "o")
            specs.append(_Tensor(block + "o_proj.weight", (*o, "kernel"), "linear", n_in=2))
            specs.append(_Tensor(block + "o_proj.bias", (*o, "bias")))
        for name in ("gate", "up", "down"):
            mlp = (*ours, "channel", name)
            specs.append(_Tensor(f"{hf}mlp_block.{name}_proj.weight", (*mlp, "kernel"), "linear"))
            specs.append(_Tensor(f"{hf}mlp_block.{name}_proj.bias", (*mlp, "bias")))
    specs.append(_Tensor("model.final_norm.weight", ("final_norm", "scale")))
    return specs


# HF names of the expert matrices: (Mixtral, Qwen2-MoE) per ``MoE`` parameter.
_EXPERT_NAMES = {"gate": ("w1", "gate_proj"), "up": ("w3", "up_proj"), "down": ("w2", "down_proj")}


def _moe_tensors(cfg: ModelConfig, hf: str, ours: tuple) -> list[_Tensor]:
    mixtral = (cfg.hf_architecture or _infer_architecture(cfg)) == "MixtralForCausalLM"
    hf += "block_sparse_moe." if mixtral else "mlp."
    specs = [_Tensor(hf + "gate.weight", (*ours, "router", "kernel"), "linear")]
    for e in range(cfg.num_experts):
        for name, (mixtral_name, qwen_name) in _EXPERT_NAMES.items():
            hf_name = f"{hf}experts.{e}.{mixtral_name if mixtral else qwen_name}.weight"
            specs.append(_Tensor(hf_name, (*ours, name), "expert", expert=e))
    if cfg.shared_ffn_dim:
        for name in ("gate", "up", "down"):
            path = (*ours, "shared", name, "kernel")
            specs.append(_Tensor(f"{hf}shared_expert.{name}_proj.weight", path, "linear"))
    if cfg.shared_ffn_dim and cfg.shared_expert_gate:
        path = (*ours, "shared_gate", "kernel")
        specs.append(_Tensor(hf + "shared_expert_gate.weight", path, "linear"))
    return specs


_PER_EXPERT = re.compile(
    r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
    r"\.weight$"
)


def _fused(ckpt: Checkpoint, name: str):
    """``(source name, tensor)`` of the per-expert / ``block_sparse_moe.`` tensor ``name`` in
    transformers 5's fused in-memory layout, or ``None`` if the checkpoint lacks that too."""
    if ".block_sparse_moe." in name and name.replace(".block_sparse_moe.", ".mlp.") in ckpt:
        alias = name.replace(".block_sparse_moe.", ".mlp.")
        return alias, ckpt[alias]
    match = _PER_EXPERT.match(name)
    if match is None:
        return None
    layer, e, which = match.group(1), int(match.group(2)), match.group(3)
    if which in ("w2", "down_proj"):
        key = f"{layer}.mlp.experts.down_proj"  # [E, D, F]
        return (key, ckpt[key][e]) if key in ckpt else None
    key = f"{layer}.mlp.experts.gate_up_proj"  # [E, 2F, D]: gate rows, then up rows
    if key not in ckpt:
        return None
    gate_up = ckpt[key][e]
    half = gate_up.shape[0] // 2
    return key, gate_up[:half] if which in ("w1", "gate_proj") else gate_up[half:]


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
        ``model.safetensors.index.json``) of a ``LlamaForCausalLM``, ``MistralForCausalLM``,
        ``Qwen2ForCausalLM``, ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` or
        ``RecurrentGemmaForCausalLM`` (and ``Mamba2ForCausalLM``, ``models.hf.mamba2``).
      dtype: parameter and compute dtype (float32, bfloat16 or float16).

    Returns:
      The model; ``model(tokens_BT)`` gives float32 logits ``[B, T, V]`` (an ``LMOutput``
      holding them for the MoE architectures).

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
    values, known = {}, {s.hf_name for s in specs}
    for spec in specs:
        source = spec.hf_name
        if source in ckpt:
            w = ckpt[source]
        elif (fused := _fused(ckpt, source)) is not None:
            source, w = fused
            known.add(source)
        else:
            raise ConversionError(
                f"{path}: tensor {spec.hf_name!r} missing from the checkpoint "
                f"({cfg.hf_architecture} per config.json)"
            )
        shape = tuple(flat[spec.path].shape)
        if w.shape != spec.hf_shape(shape):
            raise ConversionError(
                f"{ckpt.location(source)}: tensor {spec.hf_name!r} has shape "
                f"{list(w.shape)}, config.json implies {list(spec.hf_shape(shape))}"
            )
        w = spec.to_ours(w, shape).astype(jnp.dtype(dt))
        if spec.kind == "expert":
            values.setdefault(spec.path, np.zeros(shape, w.dtype))[spec.expert] = w
        else:
            values[spec.path] = w
    values = {path: jnp.asarray(w) for path, w in values.items()}
    known |= {"lm_head.weight"} if cfg.tie_embeddings else set()
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
    arrays = {p: np.asarray(jax.device_get(v[...])) for p, v in flat.items()}
    tensors = {s.hf_name: s.to_hf(arrays[s.path]) for s in specs}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_checkpoint(tensors, path, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
