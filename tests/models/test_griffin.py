"""Griffin mixers: RG-LRU scan == naive recurrence == step-by-step decode; local attention's
ring buffer == full forward past the window, constant size, ragged prompts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.griffin import LocalAttention, RGLRUBlock, RGLRUState, linear_recurrence
from models.layers.linear import shapes_only
from models.state import Segment, state_bytes

ATOL = 1e-5
WINDOW = 8  # griffin-tiny's


def _randomize(module, seed=0, std=0.3):
    """Every parameter ~ N(0, std) (init's zero biases and small weights hide bugs); the module
    may be built with ``shapes_only`` (no initialisation to compile)."""
    leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def _cfg(**overrides):
    return models.get_config("griffin-tiny", **{"lru_width": 48, **overrides})


# --- RG-LRU ----------------------------------------------------------------------------------


def test_linear_recurrence_scan_equals_sequential_and_naive_loop():
    ka, kb, kh = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(ka, (2, 37, 5), minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, (2, 37, 5))
    h0 = jax.random.normal(kh, (2, 5))
    h = np.asarray(h0, np.float64)
    naive = []
    for t in range(a.shape[1]):
        h = np.asarray(a[:, t], np.float64) * h + np.asarray(b[:, t], np.float64)
        naive.append(h)
    naive = np.stack(naive, 1)
    w = jax.random.normal(jax.random.key(1), b.shape)

    def loss(a, b, h0, impl):
        out, last = linear_recurrence(a, b, h0, impl=impl)
        return jnp.sum(out * w), (out, last)

    grad = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    grads = {}
    for impl in ("scan", "sequential"):
        grads[impl], (out, last) = grad(a, b, h0, impl)
        np.testing.assert_allclose(out, naive, atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(last, naive[:, -1], atol=ATOL, rtol=ATOL)
    for g_scan, g_seq in zip(grads["scan"], grads["sequential"], strict=True):
        np.testing.assert_allclose(g_scan, g_seq, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="unknown impl"):
        linear_recurrence(a, b, impl="pallas")


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _block_oracle(block, x_BTD):
    """Griffin's recurrent block, one token at a time in float64 (HF's semantics)."""
    p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(block))}
    x = np.asarray(x_BTD, np.float64)
    B, T, _ = x.shape
    y = _gelu(x @ p[("linear_y", "kernel")] + p[("linear_y", "bias")])
    xb = x @ p[("linear_x", "kernel")] + p[("linear_x", "bias")]
    W, R = p[("conv_w",)].shape
    N = p[("input_gate_b",)].shape[0]
    h = np.zeros((B, R))
    out = np.zeros((B, T, R))
    for t in range(T):
        xc = p[("conv_b",)] + sum(
            p[("conv_w",)][k] * xb[:, t - (W - 1) + k] for k in range(W) if t - (W - 1) + k >= 0
        )
        xh = xc.reshape(B, N, R // N)
        i, r = (
            _sigmoid(np.einsum("bni,nij->bnj", xh, p[(w,)]) + p[(b,)]).reshape(B, R)
            for w, b in (("input_gate_w", "input_gate_b"), ("a_gate_w", "a_gate_b"))
        )
        a = np.exp(-8.0 * r * np.log1p(np.exp(p[("a_param",)])))
        # Position 0 resets: no a * h term and no sqrt(1 - a^2) normalisation.
        h = xc * i if t == 0 else a * h + np.sqrt(1 - a**2) * xc * i
        out[:, t] = h
    return (out * y) @ p[("linear_out", "kernel")] + p[("linear_out", "bias")]


def _steps(block, x_BTD, state):
    """The block one decode step at a time from ``state``; (outputs, final state)."""
    B, T, _ = x_BTD.shape
    outs = []
    for t in range(T):
        starts = jnp.full((B,), t, jnp.int32)
        out, state = block(x_BTD[:, t : t + 1], Segment(starts, starts + 1, 1), state)
        outs.append(out)
    return jnp.concatenate(outs, 1), state


class _Jitted:
    """``module(x, segment, state)`` (and ``init_state``) through ``jax.jit``: eager is slow."""

    def __init__(self, module):
        self.module = module
        graphdef, self.params = nnx.split(module)

        @functools.partial(jax.jit, static_argnums=(4, 5))
        def call(params, x, starts, lengths, num_tokens, fresh, state):
            segment = Segment(starts, lengths, num_tokens, fresh)
            return nnx.merge(graphdef, params)(x, segment, state)

        self.call = call

    def init_state(self, batch, max_len):
        return self.module.init_state(batch, max_len)

    def __call__(self, x, segment, state=None):
        s = segment
        return self.call(self.params, x, s.starts_B, s.lengths_B, s.num_tokens, s.fresh, state)


@pytest.fixture(scope="module")
def rglru():
    with shapes_only():
        block = RGLRUBlock(_cfg(), 0, rngs=nnx.Rngs(0))
    return _Jitted(_randomize(block))


def test_rglru_block_scan_equals_oracle_and_decode(rglru):
    x = jax.random.normal(jax.random.key(2), (2, 13, 64))
    full, none = rglru(x, Segment.full(2, 13))
    assert none is None
    np.testing.assert_allclose(full, _block_oracle(rglru.module, x), atol=ATOL, rtol=ATOL)
    stepped, state = _steps(rglru, x, rglru.init_state(2, 1024))
    np.testing.assert_allclose(stepped, full, atol=ATOL, rtol=ATOL)
    # Prefill then chunks (one shorter than the conv, one longer) continue the same sequence.
    state = rglru.init_state(2, 1024)
    outs, start = [], 0
    for n in (6, 1, 6):
        s = jnp.full((2,), start, jnp.int32)
        out, state = rglru(x[:, start : start + n], Segment(s, s + n, n, start == 0), state)
        outs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=ATOL, rtol=ATOL)
    assert state.conv_BWR.shape == (2, 3, 48) and state.h_BR.dtype == jnp.float32


def test_rglru_block_gradients_scan_equal_decode(rglru):
    x = jax.random.normal(jax.random.key(3), (1, 5, 64))
    w = jax.random.normal(jax.random.key(4), (1, 5, 64))
    graphdef, params = nnx.split(rglru.module)

    def loss(params, x, stepwise):
        block = nnx.merge(graphdef, params)
        if stepwise:  # decode steps under lax.scan: one step body to compile, not five

            def step(state, inputs):
                x_1D, t = inputs
                starts = jnp.full((1,), t, jnp.int32)
                out, state = block(x_1D[:, None], Segment(starts, starts + 1, 1), state)
                return state, out[:, 0]

            _, out = jax.lax.scan(step, block.init_state(1, 16), (x.swapaxes(0, 1), jnp.arange(5)))
            out = out.swapaxes(0, 1)
        else:
            out = block(x, Segment.full(1, 5))[0]
        return jnp.sum(out * w)

    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    g_scan, g_step = grad(params, x, False), grad(params, x, True)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_step), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_scan))


def test_rglru_padding_leaves_state_unchanged(rglru):
    # Shapes shared with the test above (each new one compiles).
    x = jax.random.normal(jax.random.key(5), (2, 6, 64))
    seg = Segment(jnp.zeros((2,), jnp.int32), jnp.array([2, 6], jnp.int32), 6, True)
    out, state = rglru(x, seg, rglru.init_state(2, 64))
    # The oracle: unpadded decode steps; row 0 stops after 2 tokens, row 1 after 6.
    stepped2, state2 = _steps(rglru, x[:, :2], rglru.init_state(2, 64))
    stepped, state6 = _steps(rglru, x, rglru.init_state(2, 64))
    np.testing.assert_allclose(out[0, :2], stepped2[0], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(out[1], stepped[1], atol=ATOL, rtol=ATOL)
    for b, s in ((0, state2), (1, state6)):
        np.testing.assert_allclose(state.h_BR[b], s.h_BR[b], atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(state.conv_BWR[b], s.conv_BWR[b], atol=ATOL, rtol=ATOL)
    # A decode step on a row with no new token changes nothing.
    starts = jnp.array([2, 6], jnp.int32)
    _, after = rglru(x[:, :1], Segment(starts, starts + jnp.array([0, 1]), 1), state)
    np.testing.assert_array_equal(after.h_BR[0], state.h_BR[0])
    np.testing.assert_array_equal(after.conv_BWR[0], state.conv_BWR[0])
    assert isinstance(after, RGLRUState)


# --- local attention and the whole model ------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return _randomize(models.abstract(_cfg()), seed=1, std=0.2)


@functools.cache
def _step_fn(graphdef):
    @functools.partial(jax.jit, static_argnames="fresh")
    def step(params, tokens, state, num_new, fresh=False):
        return nnx.merge(graphdef, params).step(tokens, state, num_new_B=num_new, fresh=fresh)

    return step


def _run(model, tokens_BT, chunks, num_new_B=None):
    """Logits of ``tokens`` fed as ``chunks`` (sizes; 1 = decode) after an empty state."""
    graphdef, params = nnx.split(model)
    step = _step_fn(graphdef)
    B = tokens_BT.shape[0]
    state, outs, start = model.init_state(B, 64), [], 0
    for i, n in enumerate(chunks):
        num_new = jnp.full((B,), n, jnp.int32) if num_new_B is None or i else num_new_B
        logits, state = step(params, tokens_BT[:, start : start + n], state, num_new, i == 0)
        outs.append(logits)
        start += n
    return jnp.concatenate(outs, 1), state


def _tokens(batch, length, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 264, jnp.int32)


@functools.cache
def _forward_fn(graphdef):
    return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))


def _full(model, tokens_BT):
    graphdef, params = nnx.split(model)
    return _forward_fn(graphdef)(params, tokens_BT)


def test_cached_decode_equals_full_forward_past_the_window(model):
    tokens = _tokens(2, 30)
    full = _full(model, tokens)
    # Prefill past the window, decode, chunks after a non-empty cache (one shorter than the
    # window, one longer), decode again. Shapes shared with test_ragged_prompts (compiles).
    decoded, state = _run(model, tokens, [13, 1, 1, 3, 10, 1, 1])
    np.testing.assert_allclose(decoded, full, atol=ATOL, rtol=ATOL)
    assert int(state.lengths_B[0]) == 30
    ring = state.layers[2]
    assert isinstance(model.blocks[2].mixer, LocalAttention) and ring.k_BSKH.shape[1] == WINDOW


def test_state_bytes_constant_in_context_length(model):
    small, large = model.init_state(2, 1024), model.init_state(2, 32768)
    assert state_bytes(small) == state_bytes(large)
    cfg = model.config
    rnn = 2 * ((cfg.lru_conv_width - 1) * cfg.rnn_width + cfg.rnn_width) * 4
    ring = 2 * 2 * WINDOW * cfg.num_kv_heads * cfg.head_dim * 4
    assert state_bytes(small.layers) == 2 * rnn + ring


def test_ragged_prompts(model):
    lengths = [3, 13]  # one within the window, one past it
    tokens = _tokens(2, 13, seed=5)
    # Ragged prefill padded to 13, then 6 decode steps of new tokens.
    more = _tokens(2, 6, seed=6)
    graphdef, params = nnx.split(model)
    step = _step_fn(graphdef)
    logits, state = step(params, tokens, model.init_state(2, 64), jnp.array(lengths), True)
    decoded = []
    for t in range(6):
        out, state = step(params, more[:, t : t + 1], state, jnp.ones((2,), jnp.int32))
        decoded.append(out[:, 0])
    # Each row's sequence alone, zero-padded to 30 (causal: the padding changes no logit).
    seqs = np.zeros((2, 30), np.int32)
    for b, n in enumerate(lengths):
        seqs[b, : n + 6] = np.concatenate([tokens[b, :n], more[b]])
    fulls = _full(model, jnp.asarray(seqs))
    for b, n in enumerate(lengths):
        full = fulls[b]
        np.testing.assert_allclose(logits[b, :n], full[:n], atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(jnp.stack(decoded, 1)[b], full[n : n + 6], atol=ATOL, rtol=ATOL)


def test_config_validation():
    with pytest.raises(ValueError, match="sliding_window"):
        _cfg(sliding_window=None)
    with pytest.raises(ValueError, match="lru_width"):
        _cfg(lru_width=50)
    with pytest.raises(ValueError, match="rope_fraction"):
        _cfg(rope_fraction=0.3)
    with pytest.raises(ValueError, match="final_logit_softcap"):
        _cfg(final_logit_softcap=0.0)
    dense = models.get_config("dense-tiny")
    assert (dense.rope_fraction, dense.embed_scale, dense.final_logit_softcap) == (1.0, 1.0, None)
