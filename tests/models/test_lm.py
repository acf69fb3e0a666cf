"""The layer stack and its decode state: cached decoding equals the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.layers import Einsum

CONFIGS = {
    "gqa": dict(),
    "sliding": dict(sliding_window=4, sliding_window_layers=(1,)),
    "palm_style": dict(num_kv_heads=1, parallel_block=True, norm="layer", tie_embeddings=True),
    "gelu_bias": dict(mlp="gelu", mlp_bias=True, qkv_bias=True, num_kv_heads=4),
}


def _tiny(name, **extra):
    return models.get_config("dense-tiny", **CONFIGS[name], **extra)


def _rand_tokens(shape, vocab, seed=0):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab), np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    """Ragged prefill, then one-token steps: logits at every position match the full forward."""
    cfg = _tiny(name)
    model = models.build(cfg, seed=3)
    prompt_lens = np.array([3, 7, 5], np.int32)
    total = 11
    seqs = _rand_tokens((3, total), cfg.vocab_size)
    full = np.asarray(model(jnp.asarray(seqs)))  # [B, total, V]

    prompts = np.zeros((3, 8), np.int32)
    for b, n in enumerate(prompt_lens):
        prompts[b, :n] = seqs[b, :n]
    state = model.init_state(3, 16)
    step = jax.jit(lambda m, t, s, n: m.step(t, s, num_new_B=n, fresh=True))
    logits, state = step(model, jnp.asarray(prompts), state, jnp.asarray(prompt_lens))
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), full[b, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.lengths_B), prompt_lens)

    decode = jax.jit(lambda m, t, s: m.step(t, s))
    pos = prompt_lens.copy()
    while pos.max() < total:
        nxt = seqs[np.arange(3), np.minimum(pos, total - 1)]
        logits, state = decode(model, jnp.asarray(nxt[:, None]), state)
        for b in range(3):
            if pos[b] < total:
                np.testing.assert_allclose(
                    np.asarray(logits[b, 0]), full[b, pos[b]], atol=1e-5, rtol=1e-5
                )
        pos += 1


def test_chunk_append_equals_full_forward():
    """Multi-token chunks appended to a non-empty cache (the cached_attention path)."""
    cfg = _tiny("sliding")
    model = models.build(cfg, seed=4)
    seqs = _rand_tokens((2, 12), cfg.vocab_size, seed=1)
    full = np.asarray(model(jnp.asarray(seqs)))
    state = model.init_state(2, 16)
    lens = np.array([4, 2], np.int32)
    # Jitted: one compile per call shape instead of op-by-op dispatch (eager is checked by
    # test_jit_equals_eager_and_causality).
    step = nnx.jit(
        lambda m, t, s, n, fresh: m.step(t, s, num_new_B=n, fresh=fresh), static_argnums=4
    )
    _, state = step(model, jnp.asarray(seqs[:, :4]), state, jnp.asarray(lens), True)
    chunk = np.zeros((2, 5), np.int32)
    new = np.array([5, 3], np.int32)
    for b in range(2):
        chunk[b, : new[b]] = seqs[b, lens[b] : lens[b] + new[b]]
    logits, state = step(model, jnp.asarray(chunk), state, jnp.asarray(new), False)
    for b in range(2):
        np.testing.assert_allclose(
            np.asarray(logits[b, : new[b]]),
            full[b, lens[b] : lens[b] + new[b]],
            atol=1e-5,
            rtol=1e-5,
        )
    np.testing.assert_array_equal(np.asarray(state.lengths_B), lens + new)


def _greedy_by_full_forward(model, prompt, n):
    """Greedy decoding by re-running the stateless forward over the whole sequence each step.

    The sequence lives in a fixed zero-padded buffer so one compilation serves every step;
    causality makes the padding invisible to the logits read at the last real position.
    """
    forward = nnx.jit(lambda m, t: m(t))
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        seq[0, i] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, i - 1]))
    return seq[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["gqa", "sliding"])
def test_generate_greedy_equals_full_forward(name):
    cfg = _tiny(name)
    model = models.build(cfg, seed=5)
    prompts = [[1, 2, 3], list(range(40, 51)), [9, 8, 7, 6, 5, 4]]
    out = models.generate(model, prompts, max_new_tokens=10)
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == _greedy_by_full_forward(model, p, 10)
    for key in ("prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s"):
        assert out.stats[key] > 0


def test_generate_stop_tokens_end_each_row():
    cfg = _tiny("gqa")
    model = models.build(cfg, seed=5)
    prompts = [[1, 2, 3], [4, 5]]
    free = models.generate(model, prompts, max_new_tokens=8).tokens
    stop = free[0][2]  # the third token of row 0 becomes a stop token
    out = models.generate(model, prompts, max_new_tokens=8, stop_tokens=[stop]).tokens
    assert out[0] == free[0][:3]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out[1] == free[1][:cut]


class EMAMixer(nnx.Module):
    """A toy recurrent mixer: h_t = a * h_{t-1} + (1 - a) * x_t per channel, y = W h."""

    def __init__(self, cfg, layer, *, rngs):
        del layer
        self.decay = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model,)))
        self.out = Einsum(
            "BTD,DE->BTE", (cfg.d_model, cfg.d_model), ("embed", "embed"), std=0.1, rngs=rngs
        )
        self.d_model = cfg.d_model

    def init_state(self, batch, max_len):
        del max_len  # constant-size state
        return jnp.zeros((batch, self.d_model), jnp.float32)

    def __call__(self, x_BTD, segment, state=None):
        a = jax.nn.sigmoid(self.decay[...])

        def scan_step(h, inputs):
            x_BD, valid_B = inputs
            # Padding leaves the state untouched, as the decode-state contract requires.
            h = jnp.where(valid_B[:, None], a * h + (1 - a) * x_BD, h)
            return h, h

        h0 = jnp.zeros(x_BTD.shape[::2]) if state is None else state
        hT, hs_TBD = jax.lax.scan(scan_step, h0, (x_BTD.swapaxes(0, 1), segment.valid_BT.T))
        return self.out(hs_TBD.swapaxes(0, 1)), hT


def test_toy_recurrent_mixer_plugs_into_stack_and_generation():
    models.register_mixer("ema-test", EMAMixer)
    cfg = models.get_config("dense-tiny", mixer_pattern=("ema-test", "attention"))
    model = models.build(cfg, seed=6)
    assert isinstance(model.blocks[0].mixer, EMAMixer)
    state = model.init_state(2, 32)
    assert state.layers[0].shape == (2, cfg.d_model)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = models.generate(model, prompts, max_new_tokens=8)
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == _greedy_by_full_forward(model, p, 8)


def test_jit_equals_eager_and_causality():
    cfg = _tiny("gqa")
    model = models.build(cfg, seed=7)
    tokens = jnp.asarray(_rand_tokens((2, 9), cfg.vocab_size))
    eager = model(tokens)
    jitted = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    # Changing token 5 must not change logits before position 5.
    other = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab_size)
    changed = np.abs(np.asarray(model(other) - eager)).max(axis=(0, 2))
    assert np.all(changed[:5] == 0) and np.all(changed[5:] > 0)


def test_logical_axes_on_every_weight():
    model = models.build(_tiny("gelu_bias"))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == var[...].ndim, path


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama-9b'; valid: .*llama-2-7b"):
        models.get_config("llama-9b")
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
        models.get_config("dense-tiny", num_heads=6, num_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        models.get_config("dense-tiny", hidden=3)
    model = models.build(models.get_config("dense-tiny", max_seq_len=32))
    with pytest.raises(ValueError, match="exceeds the model's maximum length 32"):
        models.generate(model, [[1] * 30], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        models.generate(model, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        models.generate(model, [[1], []], max_new_tokens=2)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


@functools.cache
def _reference_attention_run(window):
    """The reference-attention model's config, tokens, logits and greedy tokens, computed once
    per ``window`` and shared by every implementation compared against it."""
    # head_dim 64: the Mosaic GPU kernels tile heads in multiples of 64.
    cfg = models.get_config(
        "dense-tiny", head_dim=64, sliding_window=window, attention_impl="reference"
    )
    ref = models.build(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
    want_tokens = models.generate(ref, PROMPTS, max_new_tokens=8).tokens
    return cfg, tokens, np.asarray(ref(tokens)), want_tokens


@pytest.mark.parametrize(
    "impl, interpret",
    [("xla", False), ("pallas_tpu", True), ("pallas_gpu", True)],
    ids=["xla", "pallas_tpu_interpret", "pallas_gpu_interpret"],
)
@pytest.mark.parametrize("window", [None, 6])
def test_attention_impls_equal_reference_model(impl, interpret, window):
    """The model through each attention implementation that runs on CPU (the Pallas TPU and
    Mosaic GPU kernels in interpret mode) gives the reference implementation's logits and
    greedy tokens: full forward (flash attention) and ragged prefill + decode (decode kernel)."""
    cfg, tokens, want_logits, want_tokens = _reference_attention_run(window)
    other = models.build(cfg.replace(attention_impl=impl, attention_interpret=interpret), seed=0)
    np.testing.assert_allclose(np.asarray(other(tokens)), want_logits, atol=1e-5)
    assert models.generate(other, PROMPTS, max_new_tokens=8).tokens == want_tokens
