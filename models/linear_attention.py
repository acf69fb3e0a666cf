"""Linear-attention mixers: Based, GLA and RetNet, three gated linear recurrences.

Each mixer projects queries ``q``, keys ``k`` and values ``v`` per head and runs, with a
``[K, V]`` float32 state ``S`` per head (``S_{-1} = 0``),

    S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t        o_t = q_t S_t

where the log decay ``a_t <= 0`` is one number per head or one per key dimension:

* ``"based"`` (``Based``; Arora et al. 2024, arXiv:2402.18668 §4): ``q``/``k`` projected to
  ``d' = linear_attn_feature_dim`` and mapped by the 2nd-order Taylor feature map
  ``phi(x) = [1, x / d'^(1/4), (x ⊗ x) / sqrt(2 d')]`` (so ``phi(q).phi(k) = 1 + z + z^2 / 2``
  with ``z = q.k / sqrt(d')``, the Taylor expansion of ``exp(z)``), no decay (``a = 0``), and
  the output normalised: ``y_t = phi(q_t) sum_s phi(k_s) v_s^T / phi(q_t) . sum_s phi(k_s)``.
  The denominator rides in the same scan as an extra value column of ones. Based models
  alternate these layers with sliding-window softmax attention (``"local_attention"``).
* ``"gla"`` (``GLA``; Yang et al. 2024, arXiv:2312.06635 §4.4): a data-dependent decay per
  key dimension ``alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1 / tau)`` (low-rank ``W_a1 W_a2``
  of rank ``gla_gate_rank``, ``tau = 16``), then ``y = (swish(x W_r + b_r) * LN_head(o)) W_o``.
* ``"retnet"`` (``RetNet``; Sun et al. 2023, arXiv:2307.08621 §2): a fixed decay per head
  ``gamma_h = 1 - 2^(-5 - h)``, rotary embeddings on ``q``/``k`` (in place of xPos), keys scaled
  by ``d_k^-1/2``, then ``y = (swish(x W_G) * GroupNorm(o)) W_O``. The paper's retention-score
  normalisations are omitted: each rescales a head's output at one position, which the per-head
  GroupNorm cancels (up to its epsilon).

``LN_head`` / ``GroupNorm`` normalise each head's ``V`` outputs (mean and variance) and apply a
learned scale ``[N, V]`` (no bias). Shape letters here: N heads, K key (feature) size, V value
size per head.

Three agreeing forms of the recurrence, chosen by ``linear_attn_impl``:

* ``"naive"``: ``naive_recurrence``, the per-step ``lax.scan`` (the oracle);
* the chunked parallel form, ``kernels.scan.chunked_scan`` with ``impl=linear_attn_impl`` and
  ``interpret=linear_attn_interpret`` (a ``[B, T, N]`` decay for Based and RetNet, a
  ``[B, T, N, K]`` one for GLA; ``pallas_gpu`` has no per-key decay yet). ``chunked_per_key``
  is an independent jnp transcription of GLA's chunked form, tested against the kernel;
* ``recurrent_step``: one step, for one-token decode calls.

Decode state (``LinearAttentionState``): the ``[N, K, V]`` float32 state per sequence, whose
size does not depend on ``max_len``. Padded positions get ``k = 0`` and ``a = 0`` and leave it
unchanged.

    cfg = models.get_config("gla-tiny"); model = models.build(cfg)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

import kernels.scan
from models.configs import ModelConfig
from models.layers import Einsum, apply_rope, param, rope_frequencies
from models.state import Segment

GLA_TAU = 16.0  # arXiv:2312.06635 §4.4: alpha = sigmoid(.)^(1 / tau)
_BASED_EPS = 1e-6  # added to Based's denominator (which is >= 1/2 per key anyway)
_NORM_EPS = 1e-5


@struct.dataclass
class LinearAttentionState:
    """Decode state of one linear-attention layer: ``S_BNKV``, float32 ``[B, N, K, V]``."""

    S_BNKV: jax.Array


def _per_key(log_decay, K: int):
    """``[B, T, N]`` or ``[B, T, N, K]`` log decays as ``[B, T, N, K]`` float32."""
    a = log_decay.astype(jnp.float32)
    return jnp.broadcast_to(a[..., None], (*a.shape, K)) if a.ndim == 3 else a


def recurrent_step(S_BNKV, k_BNK, v_BNV, a_BNK):
    """One step ``diag(exp(a)) S + k^T v`` (float32)."""
    f32 = jnp.float32
    decay_BNK1 = jnp.exp(a_BNK.astype(f32))[..., None]
    return decay_BNK1 * S_BNKV + k_BNK.astype(f32)[..., None] * v_BNV.astype(f32)[..., None, :]


def naive_recurrence(q_BTNK, k_BTNK, v_BTNV, log_decay, initial_state_BNKV=None):
    """The per-step recurrence (the oracle), in float32.

    Args:
      q_BTNK, k_BTNK: ``[B, T, N, K]``.
      v_BTNV: ``[B, T, N, V]``.
      log_decay: ``a <= 0``, ``[B, T, N]`` (one per head) or ``[B, T, N, K]`` (per key).
      initial_state_BNKV: ``[B, N, K, V]`` or ``None`` (zeros).

    Returns:
      ``(o_BTNV, final_state_BNKV)``, float32.
    """
    B, _, N, K = q_BTNK.shape
    V = v_BTNV.shape[-1]
    f32 = jnp.float32
    if initial_state_BNKV is None:
        initial_state_BNKV = jnp.zeros((B, N, K, V), f32)

    def step(S_BNKV, xs):
        q_BNK, k_BNK, v_BNV, a_BNK = xs
        S_BNKV = recurrent_step(S_BNKV, k_BNK, v_BNV, a_BNK)
        return S_BNKV, jnp.einsum("BNK,BNKV->BNV", q_BNK, S_BNKV)

    xs = (q_BTNK.astype(f32), k_BTNK.astype(f32), v_BTNV.astype(f32), _per_key(log_decay, K))
    S_BNKV, o_TBNV = jax.lax.scan(
        step, initial_state_BNKV.astype(f32), jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs)
    )
    return jnp.swapaxes(o_TBNV, 0, 1), S_BNKV


def chunked_per_key(q_BTNK, k_BTNK, v_BTNV, a_BTNK, initial_state_BNKV=None, *, chunk_size):
    """The chunked form with a per-key decay (GLA, arXiv:2312.06635 §4.2), in float32.

    With ``c_t`` the within-chunk cumulative sum of ``a`` (per key, decreasing) and ``S_in`` the
    state entering the chunk::

        o_t   = sum_{s <= t} (sum_k q_tk k_sk exp(c_tk - c_sk)) v_s + (q_t * exp(c_t)) S_in
        S_out = diag(exp(c_last)) S_in + sum_s (k_s * exp(c_last - c_s))^T v_s

    Every exponent is masked to ``s <= t`` before ``exp``, so never positive: no overflow
    however strong the decay (the price is a ``[C, C, K]`` decay tensor per chunk and head;
    ``kernels.scan`` adds secondary chunking). A cross-check of ``kernels.scan.chunked_scan``'s
    per-key path: same arguments and results as ``naive_recurrence``; ``T`` need not divide
    ``chunk_size``.
    """
    B, T, N, K = q_BTNK.shape
    V = v_BTNV.shape[-1]
    C, f32 = chunk_size, jnp.float32
    pad = -T % C

    def chunks(x):  # [B, T, ...] -> [B, M, C, ...], zero-padded (a = 0, k = 0: no effect)
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, -1, C, *x.shape[2:])

    q, k, v, a = (chunks(x) for x in (q_BTNK, k_BTNK, v_BTNV, a_BTNK))
    c_BMCNK = jnp.cumsum(a, axis=2)
    c_last_BMNK = c_BMCNK[:, :, -1]
    causal_TS11 = jnp.tril(jnp.ones((C, C), bool))[:, :, None, None]
    diff_BMTSNK = c_BMCNK[:, :, :, None] - c_BMCNK[:, :, None, :]
    decay_BMTSNK = jnp.where(causal_TS11, jnp.exp(jnp.where(causal_TS11, diff_BMTSNK, 0.0)), 0.0)
    scores_BMNTS = jnp.einsum("bmtnk,bmsnk,bmtsnk->bmnts", q, k, decay_BMTSNK)
    o_BMCNV = jnp.einsum("bmnts,bmsnv->bmtnv", scores_BMNTS, v)
    kw_BMCNK = k * jnp.exp(c_last_BMNK[:, :, None] - c_BMCNK)
    dS_BMNKV = jnp.einsum("bmsnk,bmsnv->bmnkv", kw_BMCNK, v)

    if initial_state_BNKV is None:
        initial_state_BNKV = jnp.zeros((B, N, K, V), f32)

    def step(S_BNKV, xs):
        dS, c_last = xs
        return jnp.exp(c_last)[..., None] * S_BNKV + dS, S_BNKV

    S_BNKV, S_in_MBNKV = jax.lax.scan(
        step,
        initial_state_BNKV.astype(f32),
        (jnp.moveaxis(dS_BMNKV, 1, 0), jnp.moveaxis(c_last_BMNK, 1, 0)),
    )
    o_BMCNV += jnp.einsum("bmtnk,mbnkv->bmtnv", q * jnp.exp(c_BMCNK), S_in_MBNKV)
    return o_BMCNV.reshape(B, -1, N, V)[:, :T], S_BNKV


def linear_scan(
    q_BTNK,
    k_BTNK,
    v_BTNV,
    log_decay,
    initial_state_BNKV=None,
    *,
    chunk_size: int,
    impl: str = "auto",
    interpret: bool = False,
):
    """``(o_BTNV float32, final_state_BNKV)`` of the recurrence by ``impl`` (module docstring).

    ``log_decay`` is ``[B, T, N]`` or ``[B, T, N, K]``; ``impl="naive"`` is the oracle, the
    others are ``kernels.scan.chunked_scan`` impls.
    """
    if impl == "naive":
        return naive_recurrence(q_BTNK, k_BTNK, v_BTNV, log_decay, initial_state_BNKV)
    o_BTNV, S_BNKV = kernels.scan.chunked_scan(
        q_BTNK,
        k_BTNK,
        v_BTNV,
        log_decay,
        chunk_size=chunk_size,
        initial_state_BHKV=initial_state_BNKV,
        impl=impl,
        interpret=interpret,
    )
    return o_BTNV.astype(jnp.float32), S_BNKV


def taylor_feature_map(x_BTNF):
    """Based's ``phi(x) = [1, x / d'^(1/4), (x ⊗ x) / sqrt(2 d')]``: ``[..., 1 + d' + d'^2]``."""
    x = x_BTNF.astype(jnp.float32)
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    ones = jnp.ones_like(x[..., :1])
    return jnp.concatenate([ones, x * d**-0.25, outer * (2.0 * d) ** -0.5], axis=-1)


def _head_norm(o_BTNV, scale_NV):
    """Per-head LayerNorm / GroupNorm (one group per head) with a learned scale, float32."""
    o = o_BTNV.astype(jnp.float32)
    mean = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
    return (o - mean) * jax.lax.rsqrt(var + _NORM_EPS) * scale_NV[...].astype(jnp.float32)


class _LinearAttention(nnx.Module):
    """Shared skeleton: ``_features`` gives ``(q, k, v, log_decay, aux)``, ``_output`` maps the
    recurrence's ``o`` back to ``[B, T, D]``; this class runs the recurrence and the state."""

    key_dim: int
    value_dim: int

    def _setup(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> dict:
        """Common attributes; returns the keyword arguments of every ``Einsum``."""
        self.heads = cfg.lin_heads
        self.dtype = jnp.dtype(cfg.dtype)
        self.chunk_size = cfg.linear_attn_chunk_size
        self.impl, self.interpret = cfg.linear_attn_impl, cfg.linear_attn_interpret
        pdt = jnp.dtype(cfg.param_dtype)
        return dict(std=cfg.init_std, param_dtype=pdt, dtype=self.dtype, rngs=rngs)

    def _proj_in(self, common: dict, D: int, width: int, **kw) -> Einsum:
        axes = ("embed", "heads", "head_dim")
        return Einsum("BTD,DNK->BTNK", (D, self.heads, width), axes, **common, **kw)

    def _proj_out(self, common: dict, V: int, D: int) -> Einsum:
        axes = ("heads", "head_dim", "embed")
        return Einsum("BTNV,NVD->BTD", (self.heads, V, D), axes, **common)

    def _norm_scale(self, common: dict, V: int) -> nnx.Param:
        init = nnx.initializers.ones
        return param(
            common["rngs"], init, (self.heads, V), ("heads", "head_dim"), common["param_dtype"]
        )

    def init_state(self, batch: int, max_len: int) -> LinearAttentionState:
        """Zeros; ``max_len`` is ignored (the state does not grow with the context)."""
        del max_len
        shape = (batch, self.heads, self.key_dim, self.value_dim)
        return LinearAttentionState(jnp.zeros(shape, jnp.float32))

    def __call__(self, x_BTD, segment: Segment, state: LinearAttentionState | None = None):
        q_BTNK, k_BTNK, v_BTNV, a, aux = self._features(x_BTD, segment)
        valid_BT = segment.valid_BT
        # k = 0 and a = 0 at padding: no input and no decay, the state passes through.
        k_BTNK = jnp.where(valid_BT[..., None, None], k_BTNK, 0)
        a = jnp.where(valid_BT.reshape(*valid_BT.shape, *(1,) * (a.ndim - 2)), a, 0.0)
        if state is not None and segment.num_tokens == 1:
            K = q_BTNK.shape[-1]
            S_BNKV = recurrent_step(state.S_BNKV, k_BTNK[:, 0], v_BTNV[:, 0], _per_key(a, K)[:, 0])
            o_BNV = jnp.einsum("BNK,BNKV->BNV", q_BTNK[:, 0].astype(jnp.float32), S_BNKV)
            o_BTNV = o_BNV[:, None]
        else:
            initial = None if state is None or segment.fresh else state.S_BNKV
            o_BTNV, S_BNKV = linear_scan(
                q_BTNK,
                k_BTNK,
                v_BTNV,
                a,
                initial,
                chunk_size=self.chunk_size,
                impl=self.impl,
                interpret=self.interpret,
            )
        y_BTD = self._output(o_BTNV, aux)
        return y_BTD, None if state is None else LinearAttentionState(S_BNKV)


class Based(_LinearAttention):
    """Based linear attention (mixer ``"based"``): Taylor features, normalised, no decay.

    Parameters: ``q``, ``k`` ``[D, N, d']``, ``v`` ``[D, N, V]``, ``o`` ``[N, V, D]``. The state's
    key size is ``1 + d' + d'^2`` and its value size ``V + 1`` (the normaliser column).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer
        c = self._setup(cfg, rngs=rngs)
        D, F, V = cfg.d_model, cfg.linear_attn_feature_dim, cfg.lin_value_dim
        self.q, self.k, self.v = (
            self._proj_in(c, D, F),
            self._proj_in(c, D, F),
            self._proj_in(c, D, V),
        )
        self.o = self._proj_out(c, V, D)
        self.key_dim, self.value_dim = 1 + F + F * F, V + 1  # the state's sizes

    def _features(self, x_BTD, segment: Segment):
        del segment
        q_BTNK = taylor_feature_map(self.q(x_BTD)).astype(self.dtype)
        k_BTNK = taylor_feature_map(self.k(x_BTD)).astype(self.dtype)
        v_BTNV = self.v(x_BTD)
        v_BTNV = jnp.concatenate([v_BTNV, jnp.ones_like(v_BTNV[..., :1])], axis=-1)
        a_BTN = jnp.zeros(q_BTNK.shape[:3], jnp.float32)
        return q_BTNK, k_BTNK, v_BTNV, a_BTN, None

    def _output(self, o_BTNV, aux):
        del aux
        y_BTNV = o_BTNV[..., :-1] / (o_BTNV[..., -1:] + _BASED_EPS)
        return self.o(y_BTNV.astype(self.dtype))


class GLA(_LinearAttention):
    """Gated linear attention (mixer ``"gla"``), arXiv:2312.06635 §4.4.

    Parameters: ``q``, ``k`` ``[D, N, K]``, ``v`` and ``r`` (output gate, with bias)
    ``[D, N, V]``, the low-rank decay gate ``gate_down`` ``[D, R]`` and ``gate_up``
    ``[R, N, K]`` (with bias), the per-head norm ``norm_scale`` ``[N, V]``, ``o`` ``[N, V, D]``.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer
        c = self._setup(cfg, rngs=rngs)
        D, K, V, R = cfg.d_model, cfg.lin_key_dim, cfg.lin_value_dim, cfg.gla_gate_rank
        self.key_dim, self.value_dim = K, V
        self.q, self.k, self.v = (
            self._proj_in(c, D, K),
            self._proj_in(c, D, K),
            self._proj_in(c, D, V),
        )
        self.r = self._proj_in(c, D, V, bias_dims=2)
        self.gate_down = Einsum("BTD,DR->BTR", (D, R), ("embed", None), **c)
        up_axes = (None, "heads", "head_dim")
        self.gate_up = Einsum("BTR,RNK->BTNK", (R, self.heads, K), up_axes, bias_dims=2, **c)
        self.norm_scale = self._norm_scale(c, V)
        self.o = self._proj_out(c, V, D)

    def _features(self, x_BTD, segment: Segment):
        del segment
        q_BTNK = self.q(x_BTD) * jnp.asarray(self.key_dim**-0.5, self.dtype)
        g_BTNK = self.gate_up(self.gate_down(x_BTD)).astype(jnp.float32)
        a_BTNK = jax.nn.log_sigmoid(g_BTNK) / GLA_TAU  # log of sigmoid(.)^(1 / tau)
        r_BTNV = jax.nn.silu(self.r(x_BTD).astype(jnp.float32))
        return q_BTNK, self.k(x_BTD), self.v(x_BTD), a_BTNK, r_BTNV

    def _output(self, o_BTNV, r_BTNV):
        y_BTNV = _head_norm(o_BTNV, self.norm_scale) * r_BTNV
        return self.o(y_BTNV.astype(self.dtype))


def retnet_log_decay(heads: int):
    """``log(gamma_h)``, ``gamma_h = 1 - 2^(-5 - h)`` (arXiv:2307.08621 §2.2), float32 ``[N]``."""
    h = jnp.arange(heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))


class RetNet(_LinearAttention):
    """Multi-scale retention (mixer ``"retnet"``), arXiv:2307.08621 §2.

    Parameters: ``q``, ``k`` ``[D, N, K]``, ``v`` and ``g`` (swish gate) ``[D, N, V]``,
    ``norm_scale`` ``[N, V]``, ``o`` ``[N, V, D]``; no biases. Rotary embeddings (``rope_theta``)
    rotate all ``K`` key dimensions at absolute positions.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer
        c = self._setup(cfg, rngs=rngs)
        D, K, V = cfg.d_model, cfg.lin_key_dim, cfg.lin_value_dim
        self.key_dim, self.value_dim = K, V
        self.q, self.k, self.v = (
            self._proj_in(c, D, K),
            self._proj_in(c, D, K),
            self._proj_in(c, D, V),
        )
        self.g = self._proj_in(c, D, V)
        self.norm_scale = self._norm_scale(c, V)
        self.o = self._proj_out(c, V, D)
        self.rope_theta = cfg.rope_theta

    def _features(self, x_BTD, segment: Segment):
        inv_freq = rope_frequencies(self.key_dim, self.rope_theta)
        pos_BT = segment.positions_BT
        q_BTNK = apply_rope(self.q(x_BTD), pos_BT, inv_freq)
        k_BTNK = apply_rope(self.k(x_BTD), pos_BT, inv_freq)
        k_BTNK = k_BTNK * jnp.asarray(self.key_dim**-0.5, k_BTNK.dtype)
        a_BTN = jnp.broadcast_to(retnet_log_decay(self.heads), q_BTNK.shape[:3])
        g_BTNV = jax.nn.silu(self.g(x_BTD).astype(jnp.float32))
        return q_BTNK, k_BTNK, self.v(x_BTD), a_BTN, g_BTNV

    def _output(self, o_BTNV, g_BTNV):
        y_BTNV = _head_norm(o_BTNV, self.norm_scale) * g_BTNV
        return self.o(y_BTNV.astype(self.dtype))
