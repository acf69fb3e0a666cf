"""Mamba-2 mixer: the selective state-space duality (SSD) layer of Dao & Gu 2024.

"Transformers are SSMs" (arXiv:2405.21060 §7, Figure 6): one input projection gives
``[z, x, B, C, dt]``; a depthwise causal convolution (with bias, then SiLU) runs over
``(x, B, C)``; per head ``h`` with step ``dt = softplus(dt + dt_bias)`` (clamped to
``ssm_time_step_limit``) and ``A_h = -exp(A_log_h)`` the recurrence is

    S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t^T x_t,        y_t = C_t S_t + D_h x_t,

with ``B``/``C`` shared by the ``H / G`` heads of each of ``ssm_groups`` groups; the output is
``out_proj(RMSNorm_grouped(y * silu(z)))`` (§7.2: the norm has one group per B/C group).
Semantics follow ``transformers``' ``modeling_mamba2.Mamba2Mixer.torch_forward``.

In the notation of ``kernels.scan`` (a gated linear attention) this is ``q = C``, ``k = B``,
``v = dt x``, ``log_decay = dt A``, plus the ``D x`` skip added here. Three agreeing forms:

* ``naive_scan``: the per-step recurrence above (the oracle; ``ssm_impl="naive"``);
* ``kernels.scan.chunked_scan`` (the SSD block decomposition, §6) for full forwards and
  prefill, with ``impl=cfg.ssm_impl``;
* ``step``: one recurrent step, used for one-token decode calls.

Decode state (``SSMState``): the last ``W - 1`` conv inputs and the ``[H, N, P]`` float32 SSM
state per sequence, independent of ``max_len``. Padded positions get ``dt = 0`` (no decay, no
input) and ``B = 0``, and the conv state is taken from the last real tokens, so padding leaves
the state untouched.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

import kernels.scan
from models.configs import ModelConfig
from models.layers import Einsum, param
from models.state import Segment


@struct.dataclass
class SSMState:
    """Decode state of one Mamba-2 layer.

    Attributes:
      conv_BWC: the last ``W - 1`` inputs of the causal conv (``C = I + 2 G N`` channels of
        ``x, B, C``), oldest first, in the compute dtype.
      ssm_BHNP: float32 SSM state ``S`` per head, ``[state_size, head_dim]`` (the
        ``[K, V]`` layout of ``kernels.scan``).
    """

    conv_BWC: jax.Array
    ssm_BHNP: jax.Array


def naive_scan(q_BTGN, k_BTGN, v_BTHP, log_decay_BTH, initial_state_BHNP=None):
    """The per-step recurrence ``S_t = exp(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Head ``h`` uses q/k group ``h // (H // G)``. Float32 throughout.

    Args:
      q_BTGN, k_BTGN: ``[B, T, G, N]``.
      v_BTHP: ``[B, T, H, P]``.
      log_decay_BTH: ``a`` of each step, ``[B, T, H]`` (``<= 0``).
      initial_state_BHNP: ``[B, H, N, P]`` or ``None`` (zeros).

    Returns:
      ``(o_BTHP, final_state_BHNP)``, float32.
    """
    Bsz, _, G, N = q_BTGN.shape
    H, P = v_BTHP.shape[2:]
    rep = H // G
    f32 = lambda x: x.astype(jnp.float32)
    q_BTHN = jnp.repeat(f32(q_BTGN), rep, axis=2)
    k_BTHN = jnp.repeat(f32(k_BTGN), rep, axis=2)
    if initial_state_BHNP is None:
        initial_state_BHNP = jnp.zeros((Bsz, H, N, P), jnp.float32)

    def step(S_BHNP, inputs):
        q_BHN, k_BHN, v_BHP, a_BH = inputs
        S_BHNP = recurrent_step(S_BHNP, k_BHN, v_BHP, a_BH)
        return S_BHNP, jnp.einsum("BHN,BHNP->BHP", q_BHN, S_BHNP)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q_BTHN, k_BTHN, f32(v_BTHP), f32(log_decay_BTH)))
    final_BHNP, o_TBHP = jax.lax.scan(step, f32(initial_state_BHNP), xs)
    return jnp.swapaxes(o_TBHP, 0, 1), final_BHNP


def recurrent_step(S_BHNP, k_BHN, v_BHP, a_BH):
    """One step of the recurrence: ``exp(a) S + k^T v`` (k already repeated to heads)."""
    return jnp.exp(a_BH)[..., None, None] * S_BHNP + k_BHN[..., :, None] * v_BHP[..., None, :]


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _log_arange(key, shape, dtype):
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)


def _dt_bias(key, shape, dtype, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    # Mamba-2's init: dt log-uniform in [dt_min, dt_max], stored as softplus^-1(dt).
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class Mamba2(nnx.Module):
    """The Mamba-2 mixer (``mixer_pattern`` entry ``"mamba2"``); see the module docstring.

    Parameters (HF names in brackets): ``in_proj`` ``[D, 2I + 2GN + H]`` (``in_proj``),
    ``conv_weight`` ``[W, C]`` and ``conv_bias`` ``[C]`` (``conv1d``), ``dt_bias``, ``A_log``,
    ``D`` ``[H]``, ``norm_scale`` ``[I]`` (``norm``), ``out_proj`` ``[I, D]``.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        D, inner, H = cfg.d_model, cfg.ssm_intermediate, cfg.ssm_heads
        G, N, W = cfg.ssm_groups, cfg.ssm_state_size, cfg.ssm_conv_kernel
        C = inner + 2 * G * N
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        bias = 1 if cfg.ssm_bias else 0
        common = dict(std=cfg.init_std, param_dtype=pdt, dtype=dt, bias_dims=bias, rngs=rngs)
        self.in_proj = Einsum(
            "BTD,DE->BTE", (D, 2 * inner + 2 * G * N + H), ("embed", None), **common
        )
        self.conv_weight = param(rngs, _uniform(W**-0.5), (W, C), (None, None), pdt)
        self.conv_bias = (
            param(rngs, nnx.initializers.zeros, (C,), (None,), pdt) if cfg.ssm_conv_bias else None
        )
        self.dt_bias = param(rngs, _dt_bias, (H,), (None,), pdt)
        self.A_log = param(rngs, _log_arange, (H,), (None,), pdt)
        self.D = param(rngs, nnx.initializers.ones, (H,), (None,), pdt)
        self.norm_scale = param(rngs, nnx.initializers.ones, (inner,), ("norm",), pdt)
        self.out_proj = Einsum("BTI,ID->BTD", (inner, D), (None, "embed"), **common)
        self.sizes = (inner, H, cfg.ssm_head_dim, G, N, W)
        self.dtype = dt
        self.eps = cfg.norm_eps
        self.time_step_limit = tuple(cfg.ssm_time_step_limit)
        self.chunk_size, self.impl = cfg.ssm_chunk_size, cfg.ssm_impl
        self.interpret = cfg.ssm_interpret

    def init_state(self, batch: int, max_len: int) -> SSMState:
        """Zeros; ``max_len`` is ignored (the state does not grow with the context)."""
        inner, H, P, G, N, W = self.sizes
        return SSMState(
            conv_BWC=jnp.zeros((batch, W - 1, inner + 2 * G * N), self.dtype),
            ssm_BHNP=jnp.zeros((batch, H, N, P), jnp.float32),
        )

    def _conv(self, xbc_BTC, segment: Segment, state: SSMState | None):
        """Causal depthwise conv + SiLU, and the conv state after the chunk's real tokens."""
        W = self.sizes[-1]
        B, T, C = xbc_BTC.shape
        past_BWC = (
            jnp.zeros((B, W - 1, C), xbc_BTC.dtype)
            if state is None
            else state.conv_BWC.astype(xbc_BTC.dtype)
        )
        full_BSC = jnp.concatenate([past_BWC, xbc_BTC], axis=1)  # S = W - 1 + T
        w_WC = self.conv_weight[...].astype(jnp.float32)
        y_BTC = sum(full_BSC[:, w : w + T].astype(jnp.float32) * w_WC[w] for w in range(W))
        if self.conv_bias is not None:
            y_BTC = y_BTC + self.conv_bias[...].astype(jnp.float32)
        new_conv = None
        if state is not None:
            n_B = jnp.clip(segment.lengths_B - segment.starts_B, 0, T)
            new_conv = jax.vmap(lambda f, n: jax.lax.dynamic_slice_in_dim(f, n, W - 1, 0))(
                full_BSC, n_B
            )
        return jax.nn.silu(y_BTC), new_conv

    def _scan(self, q_BTGN, k_BTGN, v_BTHP, a_BTH, initial_BHNP):
        if self.impl == "naive":
            return naive_scan(q_BTGN, k_BTGN, v_BTHP, a_BTH, initial_BHNP)
        return kernels.scan.chunked_scan(
            q_BTGN,
            k_BTGN,
            v_BTHP,
            a_BTH,
            chunk_size=self.chunk_size,
            initial_state_BHKV=initial_BHNP,
            impl=self.impl,
            interpret=self.interpret,
        )

    def __call__(self, x_BTD, segment: Segment, state: SSMState | None = None):
        inner, H, P, G, N, _ = self.sizes
        Bsz, T, _ = x_BTD.shape
        zxbcdt_BTE = self.in_proj(x_BTD)
        z_BTI, xbc_BTC, dt_BTH = jnp.split(zxbcdt_BTE, [inner, 2 * inner + 2 * G * N], axis=-1)
        xbc_BTC, new_conv = self._conv(xbc_BTC, segment, state)
        x_BTI, b_BTM, c_BTM = jnp.split(xbc_BTC, [inner, inner + G * N], axis=-1)
        valid_BT1 = segment.valid_BT[..., None]
        # dt = 0 and B = 0 at padding: no decay and no input, the state passes through.
        dt_BTH = jax.nn.softplus(dt_BTH.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        dt_BTH = jnp.where(valid_BT1, jnp.clip(dt_BTH, *self.time_step_limit), 0.0)
        b_BTGN = jnp.where(valid_BT1, b_BTM, 0.0).reshape(Bsz, T, G, N)
        c_BTGN = c_BTM.reshape(Bsz, T, G, N)
        x_BTHP = x_BTI.reshape(Bsz, T, H, P)
        a_BTH = dt_BTH * -jnp.exp(self.A_log[...].astype(jnp.float32))
        v_BTHP = x_BTHP * dt_BTH[..., None]
        initial = None if state is None or segment.fresh else state.ssm_BHNP
        if state is not None and T == 1:
            rep = H // G
            k_BHN = jnp.repeat(b_BTGN[:, 0], rep, axis=1)
            S_BHNP = recurrent_step(state.ssm_BHNP, k_BHN, v_BTHP[:, 0], a_BTH[:, 0])
            q_BHN = jnp.repeat(c_BTGN[:, 0], rep, axis=1)
            o_BTHP = jnp.einsum("BHN,BHNP->BHP", q_BHN, S_BHNP)[:, None]
        else:
            o_BTHP, S_BHNP = self._scan(c_BTGN, b_BTGN, v_BTHP, a_BTH, initial)
        y_BTHP = o_BTHP.astype(jnp.float32) + self.D[...].astype(jnp.float32)[:, None] * x_BTHP
        y_BTI = self._gated_norm(y_BTHP.reshape(Bsz, T, inner), z_BTI)
        out_BTD = self.out_proj(y_BTI.astype(self.dtype))
        if state is None:
            return out_BTD, None
        return out_BTD, SSMState(new_conv.astype(state.conv_BWC.dtype), S_BHNP)

    def _gated_norm(self, y_BTI, z_BTI):
        """``RMSNorm(y * silu(z))`` over each of the ``G`` groups of ``I / G`` channels."""
        inner, G = self.sizes[0], self.sizes[3]
        h_BTI = y_BTI.astype(jnp.float32) * jax.nn.silu(z_BTI.astype(jnp.float32))
        h_BTGI = h_BTI.reshape(*h_BTI.shape[:-1], G, inner // G)
        ms_BTG1 = jnp.mean(h_BTGI * h_BTGI, axis=-1, keepdims=True)
        h_BTI = (h_BTGI * jax.lax.rsqrt(ms_BTG1 + self.eps)).reshape(h_BTI.shape)
        return h_BTI * self.norm_scale[...].astype(jnp.float32)
