"""Griffin / RecurrentGemma temporal mixers: the RG-LRU recurrent block and local attention.

Griffin (De et al. 2024, arXiv:2402.19427) interleaves two mixers, registered in
``models.lm.MIXERS``; RecurrentGemma (arXiv:2404.07839) is the released model, and
transformers' ``modeling_recurrent_gemma`` is the oracle for every detail here.

``"rglru"`` (``RGLRUBlock``, §2.4 and Figure 2): ``linear_out(GELU(linear_y(x)) *
RG-LRU(conv(linear_x(x))))`` with a causal depthwise convolution (with bias) and the Real-Gated
Linear Recurrent Unit, per channel::

    r_t = sigmoid(W_a x_t + b_a)            i_t = sigmoid(W_x x_t + b_x)   (block-diagonal W)
    log a_t = -c * r_t * softplus(Λ)        c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

At position 0 the recurrence resets as transformers does: ``a = 0`` and the ``sqrt(1 - a^2)``
factor is 1. The square root's gradient is clipped as in the reference (``_sqrt_bounded``).
``linear_recurrence`` runs ``h_t = a_t h_{t-1} + b_t`` as a ``jax.lax.associative_scan`` over
``(a, b)`` pairs (training, prefill), a sequential ``lax.scan`` (``impl="sequential"``, the
oracle), or one step (decode). Decode state: the last ``lru_conv_width - 1`` convolution inputs
and ``h`` in float32 (``RGLRUState``), independent of the context length.

``"local_attention"`` (``LocalAttention``, §2.3): ``models.attention.Attention`` restricted to
``sliding_window`` keys, whose cache is a ring buffer of ``window`` slots (position ``p`` in slot
``p % window``), so its size is independent of the context length too.

    cfg = models.get_config("griffin-tiny"); model = models.build(cfg)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kernels import attention as attn_ops
from models.attention import Attention
from models.configs import ModelConfig
from models.layers import Einsum, param
from models.layers.linear import shard_weight
from models.state import KVCache, Segment
from partitioning.rules import shard_as

_HIDDEN = ("act_batch", "act_seq", "act_mlp")
_C = 8.0  # RG-LRU's fixed exponent scale c (arXiv:2402.19427 §2.4)
_MAX_SQRT_GRADIENT = 1000.0  # transformers' SqrtBoundDerivative clip
RECURRENCE_IMPLS = ("scan", "sequential")


@jax.custom_vjp
def _sqrt_bounded(x):
    """``sqrt(x)`` whose derivative is clipped at ``_MAX_SQRT_GRADIENT`` (near ``x = 0``)."""
    return jnp.sqrt(x)


def _sqrt_bounded_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bounded_bwd(x, g):
    return (g / jnp.sqrt(jnp.maximum(4.0 * x, 1.0 / _MAX_SQRT_GRADIENT**2)),)


_sqrt_bounded.defvjp(_sqrt_bounded_fwd, _sqrt_bounded_bwd)


def linear_recurrence(a_BTR, b_BTR, h0_BR=None, *, impl: str = "scan"):
    """``h_t = a_t * h_{t-1} + b_t`` over ``t`` from ``h_{-1} = h0`` (zeros if ``None``).

    Args:
      a_BTR, b_BTR: float32 coefficients and inputs.
      h0_BR: float32 initial state.
      impl: ``"scan"`` (``jax.lax.associative_scan``, ``O(log T)`` depth) or
        ``"sequential"`` (``jax.lax.scan``, one step at a time).

    Returns:
      ``(h_BTR, h_last_BR)``, float32.
    """
    if impl not in RECURRENCE_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {list(RECURRENCE_IMPLS)}")
    if a_BTR.shape != b_BTR.shape:
        raise ValueError(f"a_BTR {a_BTR.shape} and b_BTR {b_BTR.shape} differ in shape")
    a_BTR, b_BTR = a_BTR.astype(jnp.float32), b_BTR.astype(jnp.float32)
    if h0_BR is None:
        h0_BR = jnp.zeros((a_BTR.shape[0], a_BTR.shape[2]), jnp.float32)
    if impl == "sequential":

        def step(h_BR, ab):
            h_BR = ab[0] * h_BR + ab[1]
            return h_BR, h_BR

        last_BR, h_TBR = jax.lax.scan(step, h0_BR, (a_BTR.swapaxes(0, 1), b_BTR.swapaxes(0, 1)))
        return h_TBR.swapaxes(0, 1), last_BR

    def combine(left, right):  # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        return left[0] * right[0], right[0] * left[1] + right[1]

    b_BTR = b_BTR.at[:, 0].add(a_BTR[:, 0] * h0_BR)
    _, h_BTR = jax.lax.associative_scan(combine, (a_BTR, b_BTR), axis=1)
    return h_BTR, h_BTR[:, -1]


def _a_param_init(key, shape, dtype):
    # transformers' _init_weights: softplus(Λ) = -log(u) / 2 with u ~ U(0.9², 0.999²), so that
    # a = exp(-c r softplus(Λ)) starts in [0.9, 0.999]^(c r / 2) per channel.
    u = jax.random.uniform(key, shape, jnp.float32, 0.9**2 + 1e-8, 0.999**2 + 1e-8)
    return jnp.log(jnp.expm1(-0.5 * jnp.log(u))).astype(dtype)


@struct.dataclass
class RGLRUState:
    """Decode state of one ``"rglru"`` block.

    ``conv_BWR``: the last ``lru_conv_width - 1`` inputs of the convolution (compute dtype);
    ``h_BR``: the RG-LRU state, float32.
    """

    conv_BWR: jax.Array
    h_BR: jax.Array


class RGLRUBlock(nnx.Module):
    """Griffin's recurrent block (mixer ``"rglru"``); see the module docstring."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer
        D, R, N, W = cfg.d_model, cfg.rnn_width, cfg.rnn_heads, cfg.lru_conv_width
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        common = dict(std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs)
        normal = nnx.initializers.normal(cfg.init_std)
        self.linear_y = Einsum("BTD,DR->BTR", (D, R), ("embed", "mlp"), bias_dims=1, **common)
        self.linear_x = Einsum("BTD,DR->BTR", (D, R), ("embed", "mlp"), bias_dims=1, **common)
        self.linear_out = Einsum("BTR,RD->BTD", (R, D), ("mlp", "embed"), bias_dims=1, **common)
        self.conv_w = param(rngs, normal, (W, R), (None, "mlp"), pdt)
        self.conv_b = param(rngs, nnx.initializers.zeros, (R,), ("mlp",), pdt)
        # Block-diagonal gate matrices: head n maps its R/N channels to themselves.
        gate = ((N, R // N, R // N), ("heads", None, None))
        self.input_gate_w = param(rngs, normal, *gate, pdt)
        self.input_gate_b = param(rngs, nnx.initializers.zeros, (N, R // N), ("heads", None), pdt)
        self.a_gate_w = param(rngs, normal, *gate, pdt)
        self.a_gate_b = param(rngs, nnx.initializers.zeros, (N, R // N), ("heads", None), pdt)
        self.a_param = param(rngs, _a_param_init, (R,), ("mlp",), pdt)
        self.dtype, self.width, self.conv_width, self.heads = dt, R, W, N
        self.impl = "scan"

    def init_state(self, batch: int, max_len: int) -> RGLRUState:
        del max_len  # constant size
        return RGLRUState(
            jnp.zeros((batch, self.conv_width - 1, self.width), self.dtype),
            jnp.zeros((batch, self.width), jnp.float32),
        )

    def _conv(self, x_BTR, conv_BWR, num_new_B):
        """Causal depthwise convolution over the chunk after ``conv_BWR``; its new state."""
        T, W = x_BTR.shape[1], self.conv_width
        x_BSR = jnp.concatenate([conv_BWR.astype(x_BTR.dtype), x_BTR], axis=1)
        w_WR = shard_weight(self.conv_w).astype(jnp.float32)
        out_BTR = sum(x_BSR[:, k : k + T].astype(jnp.float32) * w_WR[k] for k in range(W))
        out_BTR = (out_BTR + self.conv_b[...].astype(jnp.float32)).astype(x_BTR.dtype)
        # The last W - 1 inputs up to each row's last real token: padding leaves them alone.
        new_BWR = jax.vmap(lambda x, n: jax.lax.dynamic_slice_in_dim(x, n, W - 1, 0))(
            x_BSR, num_new_B
        )
        return out_BTR, new_BWR

    def gates(self, x_BTR, positions_BT, valid_BT):
        """``(a_BTR, b_BTR)`` of the recurrence ``h_t = a_t h_{t-1} + b_t`` (float32).

        Padded positions (``~valid_BT``) get ``a = 1, b = 0``, leaving ``h`` unchanged.
        """
        B, T, R = x_BTR.shape
        x_BTNI = x_BTR.reshape(B, T, self.heads, R // self.heads)

        def block_diagonal(w, b):  # float32: small matrices, and gates feed the carry
            w_NIJ = shard_weight(w).astype(jnp.float32)
            y_BTNJ = jnp.einsum("BTNI,NIJ->BTNJ", x_BTNI.astype(jnp.float32), w_NIJ)
            return jax.nn.sigmoid(y_BTNJ + b[...].astype(jnp.float32)).reshape(B, T, R)

        i_BTR = block_diagonal(self.input_gate_w, self.input_gate_b)
        r_BTR = block_diagonal(self.a_gate_w, self.a_gate_b)
        log_a_BTR = -_C * r_BTR * jax.nn.softplus(self.a_param[...].astype(jnp.float32))
        reset_BT1 = (positions_BT == 0)[..., None]
        a_BTR = jnp.where(reset_BT1, 0.0, jnp.exp(log_a_BTR))
        scale_BTR = jnp.where(reset_BT1, 1.0, _sqrt_bounded(1.0 - jnp.exp(2.0 * log_a_BTR)))
        b_BTR = x_BTR.astype(jnp.float32) * i_BTR * scale_BTR
        valid_BT1 = valid_BT[..., None]
        return jnp.where(valid_BT1, a_BTR, 1.0), jnp.where(valid_BT1, b_BTR, 0.0)

    def __call__(self, x_BTD, segment: Segment, state: RGLRUState | None = None):
        B = x_BTD.shape[0]
        y_BTR = jax.nn.gelu(shard_as(self.linear_y(x_BTD), _HIDDEN), approximate=True)
        x_BTR = shard_as(self.linear_x(x_BTD), _HIDDEN)
        fresh_state = state is None
        if fresh_state:
            state = self.init_state(B, 0)
        num_new_B = segment.lengths_B - segment.starts_B
        x_BTR, conv_BWR = self._conv(x_BTR, state.conv_BWR, num_new_B)
        a_BTR, b_BTR = self.gates(x_BTR, segment.positions_BT, segment.valid_BT)
        if segment.num_tokens == 1:  # decode: one step of the recurrence
            h_BR = a_BTR[:, 0] * state.h_BR + b_BTR[:, 0]
            h_BTR = h_BR[:, None]
        else:
            h_BTR, h_BR = linear_recurrence(a_BTR, b_BTR, state.h_BR, impl=self.impl)
        out_BTD = self.linear_out(shard_as(h_BTR.astype(y_BTR.dtype) * y_BTR, _HIDDEN))
        return out_BTD, None if fresh_state else RGLRUState(conv_BWR, h_BR)


class LocalAttention(Attention):
    """Sliding-window attention (mixer ``"local_attention"``) with a ring-buffer cache.

    The cache (a ``KVCache`` of ``window`` slots) holds the keys and values of the last
    ``window`` positions of each sequence, position ``p`` in slot ``p % window``, already
    rotated by RoPE. A query at ``p`` sees keys in ``(p - window, p]``, as ``Attention`` does
    with ``sliding_window``; the parameters and projections are ``Attention``'s.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs=rngs)
        if self.window is None:
            raise ValueError(
                f"layer {layer} is 'local_attention' but has no window (sliding_window="
                f"{cfg.sliding_window}, sliding_window_layers={cfg.sliding_window_layers})"
            )
        if cfg.kv_cache_dtype is not None:
            raise NotImplementedError("local_attention supports only a float cache")

    def init_state(self, batch: int, max_len: int) -> KVCache:
        del max_len  # constant size
        return KVCache.zeros(batch, self.window, self.num_kv_heads, self.head_dim, self.cache_dtype)

    def _write(self, ring: KVCache, k_BTKH, v_BTKH, segment: Segment) -> KVCache:
        """Store the last ``window`` real tokens of the chunk in their slots."""
        B, T = k_BTKH.shape[:2]
        W = self.window
        pos_BT = segment.positions_BT
        keep_BT = segment.valid_BT & (pos_BT >= segment.lengths_B[:, None] - W)
        slot_BT = jnp.where(keep_BT, pos_BT % W, W)  # W: out of range, dropped
        b_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        return KVCache(
            ring.k_BSKH.at[b_BT, slot_BT].set(k_BTKH.astype(ring.dtype), mode="drop"),
            ring.v_BSKH.at[b_BT, slot_BT].set(v_BTKH.astype(ring.dtype), mode="drop"),
        )

    def _linearized(self, ring: KVCache, k_BTKH, v_BTKH, segment: Segment):
        """Keys and values of the cached positions then the chunk, in position order.

        Row ``b`` starts at position ``base = max(starts - window, 0)``: index ``j`` holds
        position ``base + j``; returns them with the chunk's start and end in that frame.
        """
        W = self.window
        starts_B = segment.starts_B
        base_B = jnp.maximum(starts_B - W, 0)
        slots_BW = (base_B[:, None] + jnp.arange(W)) % W
        cached_starts_B = starts_B - base_B  # min(starts, W): cached positions before the chunk

        def lay_out(ring_BWKH, new_BTKH):
            old_BWKH = jnp.take_along_axis(ring_BWKH, slots_BW[:, :, None, None], axis=1)
            pad = jnp.zeros_like(new_BTKH, dtype=new_BTKH.dtype)
            buf_BSKH = jnp.concatenate([old_BWKH.astype(new_BTKH.dtype), pad], axis=1)
            return jax.vmap(
                lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, 0)
            )(buf_BSKH, new_BTKH, cached_starts_B)

        new_lengths_B = cached_starts_B + segment.lengths_B - starts_B
        k_BSKH, v_BSKH = lay_out(ring.k_BSKH, k_BTKH), lay_out(ring.v_BSKH, v_BTKH)
        return k_BSKH, v_BSKH, cached_starts_B, new_lengths_B

    def __call__(self, x_BTD, segment: Segment, cache: KVCache | None = None):
        q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, segment.positions_BT)
        W = self.window
        opts = dict(impl=self.impl, interpret=self.interpret)
        ring = None if cache is None else self._write(cache, k_BTKH, v_BTKH, segment)
        if cache is None or segment.fresh:
            out_BTNH = attn_ops.attention(
                q_BTNH, k_BTKH, v_BTKH, lengths=segment.lengths_B, sliding_window=W, **opts
            )
        elif segment.num_tokens == 1:
            # After the write the ring holds exactly the visible keys: slots 0..p while the
            # sequence is shorter than the window, all of them after. Order is irrelevant to
            # attention once RoPE is applied, so no window mask is needed.
            visible_B = jnp.clip(segment.lengths_B, 1, W)
            out_BNH = attn_ops.decode_attention(
                q_BTNH[:, 0], ring.k_BSKH, ring.v_BSKH, visible_B, **opts
            )
            out_BTNH = out_BNH[:, None]
        else:
            k_BSKH, v_BSKH, starts_B, lengths_B = self._linearized(cache, k_BTKH, v_BTKH, segment)
            out_BTNH = attn_ops.cached_attention(
                q_BTNH, k_BSKH, v_BSKH, starts_B, lengths_B, sliding_window=W, **opts
            )
        return self.output(out_BTNH), ring
