"""Linear-attention mixers (Based, GLA, RetNet): chunked == naive recurrence == decode.

Oracles: ``models.linear_attention.naive_recurrence`` (the per-step recurrence,
``linear_attn_impl="naive"``), plain numpy loops for the recurrence and the Taylor feature map,
and the full forward of the same model for cached decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels.scan
import models
from models import linear_attention as la
from models.state import Segment, state_bytes

TOL = dict(atol=1e-5, rtol=1e-5)
MIXERS = {"based": la.Based, "gla": la.GLA, "retnet": la.RetNet}
PRESETS = {"based": "based-tiny", "gla": "gla-tiny", "retnet": "retnet-tiny"}
FORMS = ("chunked", "naive", "decode")


def _mixer(name, impl="xla", chunk=5, seed=0, **extra):
    # 2 heads over d_model 32, chunk 5 not dividing T; weights large enough that decay,
    # gates and the feature map all move the output.
    cfg = models.get_config(
        PRESETS[name],
        d_model=32,
        linear_attn_heads=2,
        linear_attn_chunk_size=chunk,
        linear_attn_impl=impl,
        init_std=0.3,
        **extra,
    )
    mixer = MIXERS[name](cfg, 0, rngs=nnx.Rngs(seed))
    if name == "gla":  # decays well away from 1, so that per-key gating matters
        mixer.gate_up.bias[...] = jax.random.normal(jax.random.key(9), mixer.gate_up.bias.shape)
    return mixer


def _x(B=2, T=13, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, 32), jnp.float32)


def _decode_loop(mixer, x_BTD):
    """The mixer one token at a time through its decode state (``lax.scan`` over T)."""
    B, T, _ = x_BTD.shape

    def step(state, t_x):
        t, x_B1D = t_x
        seg = Segment(jnp.full((B,), t, jnp.int32), jnp.full((B,), t + 1, jnp.int32), 1)
        y_B1D, state = mixer(x_B1D, seg, state)
        return state, y_B1D

    xs = (jnp.arange(T), jnp.swapaxes(x_BTD, 0, 1)[:, :, None])
    state, y_TB1D = jax.lax.scan(step, mixer.init_state(B, T), xs)
    return jnp.swapaxes(y_TB1D[:, :, 0], 0, 1), state


def _form(mixer, form, x_BTD):
    if form == "decode":
        return _decode_loop(mixer, x_BTD)[0]
    mixer.impl = {"chunked": "xla", "naive": "naive"}[form]
    return mixer(x_BTD, Segment.full(*x_BTD.shape[:2]))[0]


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_forms_agree_forward_and_gradients(name):
    """Outputs, d(loss)/d(input) and d(loss)/d(every parameter) of the chunked form (chunk 3,
    T = 8: a tail chunk), the naive recurrence and the decode loop."""
    mixer, x = _mixer(name, chunk=3), _x(T=8)
    w = jax.random.normal(jax.random.key(3), (2, 8, 32))
    graphdef, params = nnx.split(mixer)

    @jax.jit
    def run(params, x):
        def one(form):
            f = lambda p, x: _form(nnx.merge(graphdef, p), form, x)
            y, vjp = jax.vjp(f, params, x)
            return y, jax.tree.leaves(vjp(w))

        return [one(form) for form in FORMS]

    (y0, g0), *others = run(params, x)
    assert float(jnp.std(y0)) > 1e-2
    assert min(float(jnp.abs(g).max()) for g in g0) > 1e-4  # every parameter matters
    for y, g in others:
        np.testing.assert_allclose(y, y0, **TOL)
        for a, b in zip(g0, g, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _scan_inputs(B=2, T=11, N=2, K=3, V=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k = (jax.random.normal(keys[i], (B, T, N, K)) for i in (0, 1))
    v = jax.random.normal(keys[2], (B, T, N, V))
    a = -3.0 * jax.random.uniform(keys[3], (B, T, N, K))  # decays down to exp(-3) per step
    S0 = jax.random.normal(keys[4], (B, N, K, V))
    return q, k, v, a, S0


def test_naive_recurrence_matches_numpy():
    q, k, v, a, S0 = (np.asarray(x, np.float64) for x in _scan_inputs(B=1))
    S, outs = S0[0].copy(), []
    for t in range(q.shape[1]):
        S = np.exp(a[0, t])[..., None] * S + k[0, t][..., None] * v[0, t][:, None]
        outs.append(np.einsum("nk,nkv->nv", q[0, t], S))
    o, final = la.naive_recurrence(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, a, S0)))
    np.testing.assert_allclose(o[0], np.stack(outs), **TOL)
    np.testing.assert_allclose(final[0], S, **TOL)


def test_per_key_chunked_equals_naive_and_kernel():
    """GLA's chunked jnp form == the oracle == ``kernels.scan``'s per-key decay path: outputs,
    final state and gradients, with a tail chunk (chunk 4, T = 11) and a partial chunk (16)."""
    args = _scan_inputs()
    w = jax.random.normal(jax.random.key(5), (2, 11, 2, 4))

    def kernel(q, k, v, a, S0, *, chunk_size):
        return kernels.scan.chunked_scan(
            q, k, v, a, chunk_size=chunk_size, initial_state_BHKV=S0, impl="xla"
        )

    def with_grads(fn):
        loss = lambda *xs: jnp.sum(w * fn(*xs)[0]) + jnp.sum(fn(*xs)[1] ** 2)
        return fn(*args), jax.grad(loss, tuple(range(5)))(*args)

    @jax.jit
    def run():
        chunked = lambda c: lambda *xs: la.chunked_per_key(*xs, chunk_size=c)
        return (
            with_grads(la.naive_recurrence),
            with_grads(chunked(4)),
            chunked(16)(*args),
            with_grads(lambda *xs: kernel(*xs, chunk_size=4)),
        )

    (naive, g_naive), (ours, g_ours), ours_16, (kern, g_kern) = run()
    for got in (ours, ours_16, kern):
        for x, y in zip(got, naive, strict=True):
            np.testing.assert_allclose(x, y, **TOL)
    for g in (g_ours, g_kern):
        for x, y in zip(g, g_naive, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_taylor_feature_map_is_exp_taylor_expansion():
    x = jax.random.normal(jax.random.key(0), (2, 3, 1, 8))
    y = jax.random.normal(jax.random.key(1), (2, 3, 1, 8))
    phi = la.taylor_feature_map
    assert phi(x).shape[-1] == 1 + 8 + 64
    z = np.sum(np.asarray(x) * np.asarray(y), -1) / np.sqrt(8)
    np.testing.assert_allclose(jnp.sum(phi(x) * phi(y), -1), 1 + z + z * z / 2, **TOL)


def test_retnet_decays_and_based_normaliser():
    np.testing.assert_allclose(
        np.exp(la.retnet_log_decay(4)), 1 - 2.0 ** -np.arange(5, 9), rtol=1e-6
    )
    # Based with v = 1 everywhere is a weighted mean of ones: exactly 1 before the output map.
    mixer = _mixer("based")
    x = _x(B=1, T=6)
    q, k, v, a, _ = mixer._features(x, Segment.full(1, 6))
    o, _ = la.naive_recurrence(q, k, jnp.ones_like(v), a)
    np.testing.assert_allclose(o[..., :-1] / o[..., -1:], 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_ragged_prefill_and_padding_leave_state_untouched(name):
    mixer, x = _mixer(name), _x(B=2, T=10)
    lens = jnp.array([10, 6], jnp.int32)
    seg = Segment(jnp.zeros(2, jnp.int32), lens, 10, fresh=True)
    call = nnx.jit(lambda m, x, seg, s: m(x, seg, s)[1])
    ragged = call(mixer, x, seg, mixer.init_state(2, 64))
    exact = call(mixer, x[1:, :6], Segment.full(1, 6), mixer.init_state(1, 64))
    np.testing.assert_allclose(ragged.S_BNKV[1:], exact.S_BNKV, **TOL)
    # A chunk continuing from the state in which row 1 is all padding leaves row 1 alone.
    cont = Segment(lens, lens + jnp.array([3, 0], jnp.int32), 3)
    after = call(mixer, _x(B=2, T=3, seed=5), cont, ragged)
    np.testing.assert_array_equal(after.S_BNKV[1], ragged.S_BNKV[1])
    assert not np.allclose(after.S_BNKV[0], ragged.S_BNKV[0])


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_pallas_tpu_interpret_equals_xla(name):
    mixer, x = _mixer(name, chunk=4), _x(B=1, T=6)
    seg = Segment.full(1, 6)
    want = mixer(x, seg)[0]
    mixer.impl, mixer.interpret = "pallas_tpu", True
    np.testing.assert_allclose(mixer(x, seg)[0], want, **TOL)


def _check_cached_decode(model, seqs, prompt_lens):
    """Ragged prefill then one-token steps give the full forward's logits at every position."""
    B, total = seqs.shape
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seqs)))
    prompts = np.zeros((B, int(prompt_lens.max())), np.int32)
    for b, n in enumerate(prompt_lens):
        prompts[b, :n] = seqs[b, :n]
    prefill = nnx.jit(lambda m, t, s, n: m.step(t, s, num_new_B=n, fresh=True))
    state = model.init_state(B, 32)
    logits, state = prefill(model, jnp.asarray(prompts), state, jnp.asarray(prompt_lens))
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), full[b, :n], **TOL)
    decode = nnx.jit(lambda m, t, s: m.step(t, s))
    pos = prompt_lens.copy()
    while pos.min() < total:
        nxt = seqs[np.arange(B), np.minimum(pos, total - 1)]
        logits, state = decode(model, jnp.asarray(nxt[:, None]), state)
        for b in range(B):
            if pos[b] < total:
                np.testing.assert_allclose(np.asarray(logits[b, 0]), full[b, pos[b]], **TOL)
        pos += 1


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("based-tiny", None),
        ("gla-tiny", None),
        ("retnet-tiny", None),
        ("gla-tiny", ("gla", "attention")),
    ],
)
def test_cached_decode_equals_full_forward(name, pattern):
    # 2 layers (based-tiny: one Based, one local attention of window 8); decoding runs past
    # the window and over chunk boundaries (chunk 4).
    extra = {} if pattern is None else dict(mixer_pattern=pattern)
    cfg = models.get_config(name, linear_attn_chunk_size=4, init_std=0.1, num_layers=2, **extra)
    model = models.build(cfg, seed=2)
    seqs = np.asarray(jax.random.randint(jax.random.key(4), (2, 11), 0, cfg.vocab_size))
    _check_cached_decode(model, seqs.astype(np.int32), np.array([3, 6], np.int32))


@pytest.mark.parametrize("name", sorted(PRESETS.values()))
def test_state_bytes_independent_of_context(name):
    model = models.build(models.get_config(name))
    short, long = model.init_state(2, 1024), model.init_state(2, 32768)
    assert state_bytes(short) == state_bytes(long)
    cfg = model.config
    N, K, V = cfg.lin_heads, cfg.lin_key_dim, cfg.lin_value_dim
    if name == "based-tiny":  # Taylor features x (values + normaliser); ring of 8 k/v slots
        F = cfg.linear_attn_feature_dim
        ring = 2 * cfg.sliding_window * cfg.num_kv_heads * cfg.head_dim * 4
        per_layer = [N * (1 + F + F * F) * (V + 1) * 4, ring]
    else:
        per_layer = [N * K * V * 4]
    expected = sum(per_layer[i % len(per_layer)] for i in range(cfg.num_layers))
    assert state_bytes(short.layers) == 2 * expected


def test_config_validation():
    with pytest.raises(ValueError, match="linear_attn_impl"):
        models.get_config("gla-tiny", linear_attn_impl="cuda")
    with pytest.raises(ValueError, match="lin_key_dim"):
        models.get_config("retnet-tiny", linear_attn_key_dim=15)
    with pytest.raises(ValueError, match="gla_gate_rank"):
        models.get_config("gla-tiny", gla_gate_rank=0)
    cfg = models.get_config("dense-tiny")
    assert (cfg.lin_heads, cfg.lin_key_dim, cfg.lin_value_dim) == (4, 16, 16)
