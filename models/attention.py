"""Attention mixer: MHA, GQA and MQA with RoPE, optional qkv bias and sliding window.

Calls ``kernels.attention`` for all attention math: ``attention`` over a fresh chunk (full
forward, prefill), ``decode_attention`` for one-token steps against the KV cache, and
``cached_attention`` for multi-token chunks appended to a non-empty cache.

With ``kv_cache_dtype="int8"`` the cache stores int8 keys/values with per-token-per-head
scales, passed to the kernels beside them. A fresh chunk (prefill) attends to its own float
keys and values; only later calls read the quantized cache.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kernels import attention as attn_ops
from models.configs import ModelConfig
from models.layers import Einsum, apply_rope, rope_frequencies
from models.state import KVCache, Segment
from partitioning.rules import shard_as

# Logical axes of q/k/v after the projections, inside the attention op, and of the cache.
_PROJ_Q = ("act_batch", "act_seq", "act_heads", "head_dim")
_PROJ_KV = ("act_batch", "act_seq", "act_kv_heads", "head_dim")
_ATTN_Q = ("attn_batch", "act_seq", "attn_heads", "head_dim")
_REGROUP_Q = ("attn_regroup_batch", "act_seq", "act_heads", "head_dim")
_ATTN_KV = ("attn_batch", "act_seq", "cache_heads", "head_dim")
_CACHE = ("cache_batch", "cache_seq", "cache_heads", "head_dim")
_CACHE_SCALE = ("cache_batch", "cache_seq", "cache_heads")
_CACHE_DTYPES = {None: None, "int8": jnp.int8}  # None: the compute dtype


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        common = dict(std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs)
        bias = 2 if cfg.qkv_bias else 0
        self.q = Einsum(
            "BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), bias_dims=bias, **common
        )
        self.k = Einsum(
            "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), bias_dims=bias, **common
        )
        self.v = Einsum(
            "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), bias_dims=bias, **common
        )
        self.o = Einsum(
            "BTNH,NHD->BTD",
            (N, H, D),
            ("heads", "head_dim", "embed"),
            bias_dims=1 if cfg.out_bias else 0,
            **common,
        )
        self.window = cfg.window(layer)
        self.impl, self.interpret = cfg.attention_impl, cfg.attention_interpret
        self.num_kv_heads, self.head_dim = K, H
        self.cache_dtype = _CACHE_DTYPES[cfg.kv_cache_dtype] or dt
        self.rope = (int(H * cfg.rope_fraction), cfg.rope_theta, cfg.rope_scaling)

    def init_state(self, batch: int, max_len: int) -> KVCache:
        return KVCache.zeros(batch, max_len, self.num_kv_heads, self.head_dim, self.cache_dtype)

    def project(self, x_BTD, positions_BT):
        """Queries, keys (both rotated by RoPE at ``positions_BT``) and values of a chunk."""
        inv_freq = rope_frequencies(*self.rope)
        # Batch-sharded attention (Pope et al. 2022 §3.3) regroups queries by batch here;
        # RoPE comes after, so queries and keys share one layout of its tables.
        q_BTNH = shard_as(shard_as(shard_as(self.q(x_BTD), _PROJ_Q), _REGROUP_Q), _ATTN_Q)
        k_BTKH = shard_as(shard_as(self.k(x_BTD), _PROJ_KV), _ATTN_KV)
        v_BTKH = shard_as(shard_as(self.v(x_BTD), _PROJ_KV), _ATTN_KV)
        q_BTNH = shard_as(apply_rope(q_BTNH, positions_BT, inv_freq), _ATTN_Q)
        k_BTKH = shard_as(apply_rope(k_BTKH, positions_BT, inv_freq), _ATTN_KV)
        return q_BTNH, k_BTKH, v_BTKH

    def output(self, out_BTNH):
        """The output projection of the attention result ``[B, T, N, H]``."""
        out_BTNH = shard_as(shard_as(shard_as(out_BTNH, _ATTN_Q), _REGROUP_Q), _PROJ_Q)
        return self.o(out_BTNH)

    def __call__(self, x_BTD, segment: Segment, cache: KVCache | None = None):
        q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, segment.positions_BT)
        opts = dict(sliding_window=self.window, impl=self.impl, interpret=self.interpret)
        if cache is not None:
            cache = cache.write(k_BTKH, v_BTKH, segment)
            scales = (cache.k_scale_BSK, cache.v_scale_BSK) if cache.quantized else ()
            cache = KVCache(
                shard_as(cache.k_BSKH, _CACHE),
                shard_as(cache.v_BSKH, _CACHE),
                *(shard_as(s, _CACHE_SCALE) for s in scales),
            )
            cached_opts = dict(opts, k_scale_BSK=cache.k_scale_BSK, v_scale_BSK=cache.v_scale_BSK)
        if segment.fresh:
            out_BTNH = attn_ops.attention(q_BTNH, k_BTKH, v_BTKH, lengths=segment.lengths_B, **opts)
        elif segment.num_tokens == 1:
            out_BNH = attn_ops.decode_attention(
                q_BTNH[:, 0], cache.k_BSKH, cache.v_BSKH, segment.lengths_B, **cached_opts
            )
            out_BTNH = out_BNH[:, None]
        else:
            out_BTNH = attn_ops.cached_attention(
                q_BTNH,
                cache.k_BSKH,
                cache.v_BSKH,
                segment.starts_B,
                segment.lengths_B,
                **cached_opts,
            )
        return self.output(out_BTNH), cache
