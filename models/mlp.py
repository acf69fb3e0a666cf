"""Feed-forward channel blocks: gated (SwiGLU / GeGLU, Shazeer 2020) and plain GELU MLPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.configs import ModelConfig
from models.layers import Einsum
from partitioning.rules import shard_as

_ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer
        D, F = cfg.d_model, cfg.ffn_dim
        common = dict(
            std=cfg.init_std,
            param_dtype=jnp.dtype(cfg.param_dtype),
            dtype=jnp.dtype(cfg.dtype),
            rngs=rngs,
        )
        bias = 1 if cfg.mlp_bias else 0
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = _ACTIVATIONS[cfg.mlp]
        if self.gated:
            self.gate = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_dims=bias, **common)
        self.up = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_dims=bias, **common)
        self.down = Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), bias_dims=bias, **common)

    def __call__(self, x_BTD):
        hidden = ("act_batch", "act_seq", "act_mlp")
        h_BTF = shard_as(self.up(x_BTD), hidden)
        if self.gated:
            h_BTF = self.act(shard_as(self.gate(x_BTD), hidden)) * h_BTF
        else:
            h_BTF = self.act(h_BTF)
        return self.down(h_BTF)
