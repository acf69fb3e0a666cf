"""Mamba-2 mixer: chunked scan == naive recurrence == one-step decode, and its decode state.

Oracles: ``models.ssm.naive_scan`` (the per-step recurrence, ``ssm_impl="naive"``), the full
forward of the same model, and a plain jnp conv + recurrence written here for the mixer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.ssm import Mamba2, SSMState
from models.state import Segment, state_bytes

TOL = dict(atol=1e-5, rtol=1e-5)


def _cfg(**extra):
    # 8 heads in 2 groups, chunk 5 not dividing T = 13, large enough weights that every part
    # of the recurrence (decay, conv, gating) moves the output.
    return models.get_config(
        "mamba2-tiny",
        vocab_size=64,
        d_model=32,
        ssm_state_size=8,
        ssm_head_dim=8,
        ssm_chunk_size=5,
        init_std=0.2,
        **extra,
    )


def _mixer(impl="xla", seed=0):
    mixer = Mamba2(_cfg(ssm_impl=impl), 0, rngs=nnx.Rngs(seed))
    mixer.conv_bias[...] = 0.1 * jax.random.normal(jax.random.key(7), mixer.conv_bias.shape)
    mixer.D[...] = jax.random.normal(jax.random.key(8), mixer.D.shape)
    mixer.dt_bias[...] = jax.random.uniform(jax.random.key(9), mixer.dt_bias.shape, minval=-1)
    return mixer


def _x(B=2, T=13, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, 32), jnp.float32)


def _decode_loop(mixer, x_BTD):
    """The mixer run one token at a time through its decode state (``lax.scan`` over T)."""
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
    """The mixer's output by the ``"chunked"`` scan, the ``"naive"`` recurrence or ``"decode"``."""
    if form == "decode":
        return _decode_loop(mixer, x_BTD)[0]
    mixer.impl = {"chunked": "xla", "naive": "naive"}[form]
    return mixer(x_BTD, Segment.full(*x_BTD.shape[:2]))[0]


FORMS = ("chunked", "naive", "decode")


def test_chunked_equals_naive_equals_decode():
    mixer, x = _mixer(), _x()
    graphdef, params = nnx.split(mixer)
    run = jax.jit(lambda p, x, form: _form(nnx.merge(graphdef, p), form, x), static_argnums=2)
    chunked, naive, decoded = (run(params, x, form) for form in FORMS)
    assert float(jnp.std(chunked)) > 1e-2
    np.testing.assert_allclose(chunked, naive, **TOL)
    np.testing.assert_allclose(decoded, naive, **TOL)


def test_gradients_agree_across_forms():
    """d(loss)/d(input) and d(loss)/d(every parameter) of the three forms."""
    mixer, x = _mixer(), _x(T=8)
    w = jax.random.normal(jax.random.key(3), (2, 8, 32))
    graphdef, params = nnx.split(mixer)

    def loss(params, x, form):
        return jnp.sum(w * _form(nnx.merge(graphdef, params), form, x))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    leaves = [jax.tree.leaves(grad(params, x, form)) for form in FORMS]
    assert max(float(jnp.abs(g).max()) for g in leaves[0]) > 1e-3
    for other in leaves[1:]:
        for a, b in zip(leaves[0], other, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_mixer_matches_plain_recurrence():
    """An independent jnp transcription of transformers' Mamba2Mixer (conv, SSD, gated norm)."""
    mixer, x = _mixer(), _x(B=1, T=9)
    got = mixer(x, Segment.full(1, 9))[0][0]
    inner, H, P, G, N, W = mixer.sizes
    zxbcdt = np.asarray(x[0] @ mixer.in_proj.kernel[...])
    z, xbc, dt = np.split(zxbcdt, [inner, 2 * inner + 2 * G * N], axis=-1)
    pad = np.concatenate([np.zeros((W - 1, xbc.shape[1])), xbc])
    w_WC = np.asarray(mixer.conv_weight[...])
    conv = np.stack([(pad[t : t + W] * w_WC).sum(0) for t in range(9)])
    conv = conv + np.asarray(mixer.conv_bias[...])
    xbc = conv / (1 + np.exp(-conv))
    xs, Bs, Cs = np.split(xbc, [inner, inner + G * N], axis=-1)
    dt = np.log1p(np.exp(dt + np.asarray(mixer.dt_bias[...])))
    A = -np.exp(np.asarray(mixer.A_log[...]))
    S, ys = np.zeros((H, P, N)), []
    for t in range(9):
        for h in range(H):
            g = h // (H // G)
            xh, Bt = xs[t, h * P : (h + 1) * P], Bs[t, g * N : (g + 1) * N]
            S[h] = np.exp(dt[t, h] * A[h]) * S[h] + dt[t, h] * np.outer(xh, Bt)
        groups = [h // (H // G) for h in range(H)]
        y = np.stack([S[h] @ Cs[t, g * N : (g + 1) * N] for h, g in enumerate(groups)])
        y = y + np.asarray(mixer.D[...])[:, None] * xs[t].reshape(H, P)
        hz = y.reshape(-1) * z[t] / (1 + np.exp(-z[t]))
        hz = hz.reshape(G, -1)
        hz = hz / np.sqrt((hz**2).mean(-1, keepdims=True) + 1e-5)
        ys.append(hz.reshape(-1) * np.asarray(mixer.norm_scale[...]))
    want = np.stack(ys) @ np.asarray(mixer.out_proj.kernel[...])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_ragged_prefill_and_padded_rows_leave_state_untouched():
    mixer, x = _mixer(), _x(B=2, T=10)
    lens = jnp.array([10, 6], jnp.int32)
    seg = Segment(jnp.zeros(2, jnp.int32), lens, 10, fresh=True)
    call = nnx.jit(lambda m, x, seg, s: m(x, seg, s)[1])
    ragged = call(mixer, x, seg, mixer.init_state(2, 64))
    exact = call(mixer, x[1:, :6], Segment.full(1, 6), mixer.init_state(1, 64))
    for a, b in zip(jax.tree.leaves(ragged), jax.tree.leaves(exact), strict=True):
        np.testing.assert_allclose(a[1:], b, **TOL)
    # A decode call in which row 1 is padding (no new token) leaves row 1's state alone.
    step = Segment(lens, lens + jnp.array([1, 0], jnp.int32), 1)
    after = call(mixer, _x(B=2, T=1, seed=5), step, ragged)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(ragged), strict=True):
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.allclose(a[0], b[0])


def test_state_bytes_independent_of_context():
    model = models.build(models.get_config("mamba2-tiny"))
    short, long = model.init_state(2, 1024), model.init_state(2, 32768)
    assert state_bytes(short) == state_bytes(long)
    cfg = model.config
    conv = (cfg.ssm_conv_kernel - 1) * (cfg.ssm_intermediate + 2 * cfg.ssm_groups * 16) * 4
    ssm = cfg.ssm_heads * 16 * 16 * 4
    assert state_bytes(short.layers) == 2 * cfg.num_layers * (conv + ssm)
    assert all(isinstance(s, SSMState) for s in short.layers)


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


@pytest.mark.parametrize("name", ["mamba2-tiny", "mamba2-hybrid-tiny"])
def test_cached_decode_equals_full_forward(name):
    cfg = models.get_config(name, ssm_chunk_size=4, init_std=0.1)
    model = models.build(cfg, seed=2)
    seqs = np.asarray(jax.random.randint(jax.random.key(4), (3, 10), 0, cfg.vocab_size))
    _check_cached_decode(model, seqs.astype(np.int32), np.array([3, 7, 5], np.int32))


def test_generate_equals_greedy_full_forward():
    """``models.generate`` (ragged prefill, decode loop) against argmax of full forwards."""
    model = models.build(models.get_config("mamba2-tiny", init_std=0.1), seed=5)
    prompts = [[5, 17, 99, 3], [42], [7, 7, 8, 200, 1, 64]]
    got = models.generate(model, prompts, max_new_tokens=6).tokens
    forward = nnx.jit(lambda m, t: m(t))  # causal: right padding does not change the argmax
    for prompt, tokens in zip(prompts, got, strict=True):
        seq = list(prompt)
        for _ in range(6):
            padded = jnp.asarray([seq + [0] * (12 - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
        assert tokens == seq[len(prompt) :]


def test_config_validation():
    with pytest.raises(ValueError, match="ssm_heads \\* ssm_head_dim"):
        _cfg(ssm_heads=3)
    with pytest.raises(ValueError, match="ssm_groups"):
        _cfg(ssm_groups=3)
    with pytest.raises(ValueError, match="ssm_impl"):
        _cfg(ssm_impl="cuda")
    assert _cfg().replace(d_model=48).ssm_heads == 12  # re-derived from the new width
