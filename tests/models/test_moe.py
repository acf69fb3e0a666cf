"""The mixture-of-experts channel block on moe-tiny: decode equals forward, dropless equals
capacity when nothing drops, capacity drops as a naive loop over GShard's priority says, the
router losses against numpy, gradients reach router and experts, and clear errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from experiments import trainer
from experiments.data import DataConfig
from models.moe import MoE, capacity

ATOL = 1e-5


def _cfg(**overrides):
    return models.get_config("moe-tiny", **overrides)


def _randomize(model, seed=0):
    """Non-trivial norms (1 + noise) and larger weights, so routing differs per token."""
    rng = np.random.default_rng(seed)
    values = {
        path: (1.0 if path[-1] == "scale" else 0.0)
        + 0.15 * rng.standard_normal(v[...].shape).astype(np.float32)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    nnx.update(model, nnx.from_flat_state(values))
    return model


@pytest.fixture(scope="module")
def model():
    return _randomize(models.build(_cfg(shared_ffn_dim=48, shared_expert_gate=True), seed=0))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens_BT):
    return nnx.merge(graphdef, state)(tokens_BT)


def _forward(model, tokens_BT):
    """``model(tokens)`` compiled (eager dispatch of every op is slow on 2 cores)."""
    return _jit_forward(*nnx.split(model), tokens_BT)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_step(graphdef, params, tokens_BT, state, num_new_B, fresh):
    return nnx.merge(graphdef, params).step(tokens_BT, state, num_new_B=num_new_B, fresh=fresh)


def _tokens(batch=2, length=12, seed=0, vocab=264):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _with_config(model, **overrides):
    """The same weights under another config (dispatch, capacity factor)."""
    other = models.build(model.config.replace(**overrides))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


def test_forward_returns_lm_output(model):
    out = _forward(model, _tokens())
    assert isinstance(out, models.LMOutput)
    assert out.logits.shape == (2, 12, 264) and out.logits.dtype == jnp.float32
    stats = out.router_stats
    assert stats["layer_tokens_per_expert"].shape == (2, 4)
    np.testing.assert_array_equal(stats["layer_tokens_per_expert"].sum(-1), [2 * 12 * 2] * 2)
    assert float(stats["dropped_fraction"]) == 0.0
    want = 0.01 * stats["load_balance_loss"]  # router_aux_loss_coef; z-loss weight 0
    np.testing.assert_allclose(float(out.aux_loss), float(want), rtol=1e-6)
    dense = models.build(models.get_config("dense-tiny"))
    assert isinstance(dense(_tokens()), jax.Array)  # dense models keep returning logits


def test_cached_decode_equals_full_forward(model):
    tokens = _tokens(length=10, seed=1)
    want = _forward(model, tokens).logits
    graphdef, params = nnx.split(model)
    state = model.init_state(2, 16)
    logits, state = _jit_step(graphdef, params, tokens[:, :4], state, None, True)  # prefill 4
    got = [logits]
    for t in range(4, 10):  # then one token at a time
        logits, state = _jit_step(graphdef, params, tokens[:, t : t + 1], state, None, False)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=ATOL, rtol=0)


def test_padding_does_not_change_real_tokens(model):
    """Ragged prefill: row 0 has 5 real tokens; what fills its padding changes nothing."""
    tokens = _tokens(length=8, seed=2)
    lengths = jnp.array([5, 8], jnp.int32)
    graphdef, params = nnx.split(model)
    outs = []
    for fill in (0, 7):
        padded = tokens.at[0, 5:].set(fill)
        logits, _ = _jit_step(graphdef, params, padded, model.init_state(2, 8), lengths, True)
        outs.append(np.asarray(logits))
    np.testing.assert_array_equal(outs[0][0, :5], outs[1][0, :5])
    np.testing.assert_allclose(outs[0][0, :5], _forward(model, tokens[:1, :5]).logits[0], atol=ATOL)


def test_greedy_generation_matches_full_forward_argmax(model):
    """Each new token is the argmax of a full causal forward over the sequence so far (padded
    to a fixed length: causality makes the padding irrelevant)."""
    prompts = [[5, 9, 200], [17, 3, 3, 64, 1]]
    out = models.generate(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, out.tokens, strict=True):
        seq = list(prompt)
        for _ in range(6):
            padded = jnp.asarray([seq + [0] * (16 - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(_forward(model, padded).logits[0, len(seq) - 1])))
        assert got == seq[len(prompt) :]


def test_capacity_without_drops_equals_dropless(model):
    tokens = _tokens(seed=3)
    big = _with_config(model, moe_dispatch="capacity", capacity_factor=float(4 / 2))  # C = G
    out = _forward(big, tokens)
    assert float(out.router_stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(out.logits, _forward(model, tokens).logits, atol=ATOL, rtol=0)


def _naive_capacity(experts_GK, E, C):
    """GShard priority by loops: all first choices in token order, then second choices."""
    G, K = experts_GK.shape
    used, kept = [0] * E, np.zeros((G, K), bool)
    for k in range(K):
        for g in range(G):
            e = experts_GK[g, k]
            if used[e] < C:
                used[e], kept[g, k] = used[e] + 1, True
    return kept


def _moe_layer(model, **overrides):
    """Layer 0's MoE block under ``overrides``, with the model's weights."""
    return _with_config(model, **overrides).blocks[0].channel


def _route(layer, x_GD):
    """Top-k experts and weights by numpy from the router kernel (an independent oracle)."""
    logits = np.asarray(x_GD, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, : layer.cfg.experts_per_token]
    return logits, probs, experts


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_match_naive_priority(model, factor):
    x_BTD = jax.random.normal(jax.random.key(4), (2, 12, 64))
    capped = _moe_layer(model, moe_dispatch="capacity", capacity_factor=factor)
    dropless = _moe_layer(model)
    _, probs, experts = _route(capped, x_BTD.reshape(24, 64))
    C = math.ceil(factor * 24 * 2 / 4)
    assert capacity(24, capped.cfg) == C
    kept = _naive_capacity(experts, 4, C)
    y, aux = capped(x_BTD)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), 1 - kept.mean(), rtol=1e-6)
    # sum_k kept * w_k * expert_k(x) + shared(x), each expert evaluated on its own.
    weights = np.take_along_axis(probs, experts, -1)
    weights /= weights.sum(-1, keepdims=True)
    per_expert = [_expert_outputs(dropless, x_BTD, experts[:, k]) for k in range(2)]
    want = sum(per_expert[k] * (weights[:, k] * kept[:, k])[:, None] for k in range(2))
    want = want + np.asarray(_shared(dropless, x_BTD)).reshape(24, 64)
    np.testing.assert_allclose(np.asarray(y).reshape(24, 64), want, atol=ATOL)


def _expert_outputs(layer, x_BTD, experts_G):
    """``expert_{e_g}(x_g)`` by plain einsums over each token's own expert weights."""
    x_GD = x_BTD.reshape(-1, x_BTD.shape[-1])
    gate, up, down = (np.asarray(v[...])[experts_G] for v in (layer.gate, layer.up, layer.down))
    h = jax.nn.silu(jnp.einsum("gd,gdf->gf", x_GD, gate)) * jnp.einsum("gd,gdf->gf", x_GD, up)
    return np.asarray(jnp.einsum("gf,gfd->gd", h, down))


def _shared(layer, x_BTD):
    return jax.nn.sigmoid(layer.shared_gate(x_BTD)) * layer.shared(x_BTD)


def test_everything_routed_to_one_expert_drops_in_closed_form(model):
    """A router that ranks expert 0, then 1, for every (positive) input: of the 2G
    assignments each of the two experts keeps C, so the dropped fraction is 1 - C / G."""
    layer = _moe_layer(model, moe_dispatch="capacity", capacity_factor=0.5)
    layer.router.kernel[...] = jnp.tile(jnp.array([2.0, 1.0, -1.0, -1.0]), (64, 1))
    x_BTD = jnp.abs(jax.random.normal(jax.random.key(5), (2, 12, 64))) + 0.1
    y, aux = layer(x_BTD)
    G, C = 24, math.ceil(0.5 * 24 * 2 / 4)
    assert float(aux["dropped_fraction"]) == pytest.approx(1 - C / G)
    np.testing.assert_array_equal(aux["tokens_per_expert"], [G, G, 0, 0])
    # Tokens past the first C keep only the shared expert.
    routed = np.asarray(y - _shared(layer, x_BTD)).reshape(G, 64)
    assert np.abs(routed[C:]).max() < 1e-6 and np.abs(routed[:C]).min(axis=1).max() > 0


def test_router_losses_match_numpy(model):
    layer = _moe_layer(model)
    x_BTD = jax.random.normal(jax.random.key(6), (3, 5, 64))
    _, aux = layer(x_BTD)
    logits, probs, experts = _route(layer, x_BTD.reshape(15, 64))
    f = np.bincount(experts.reshape(-1), minlength=4) / 15  # sums to k = 2
    P = probs.mean(0)
    np.testing.assert_allclose(float(aux["load_balance_loss"]), 4 * np.sum(f * P), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["z_loss"]), np.mean(lse**2), rtol=1e-5)
    np.testing.assert_array_equal(aux["tokens_per_expert"], f * 15)
    # Perfectly uniform routing probabilities give the minimum k.
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
    assert float(layer(x_BTD)[1]["load_balance_loss"]) == pytest.approx(2.0)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_router_and_experts(model, dispatch):
    m = _with_config(model, moe_dispatch=dispatch, router_z_loss_coef=1e-3)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    tokens = _tokens(seed=7)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(tokens)
        return -jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + out.aux_loss

    aux = lambda params: nnx.merge(graphdef, params, rest)(tokens).aux_loss
    grads, aux_grads = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(aux)(p)))(params)
    grads = dict(nnx.to_flat_state(grads))
    for name in ("router", "gate", "up", "down", "shared", "shared_gate"):
        g = [v for path, v in grads.items() if path[:4] == ("blocks", 1, "channel", name)]
        assert g and all(float(jnp.abs(x[...]).max()) > 0 for x in g), name
    # The aux loss alone moves the router.
    router_grad = dict(nnx.to_flat_state(aux_grads))[("blocks", 0, "channel", "router", "kernel")]
    assert float(jnp.abs(router_grad[...]).max()) > 0


def test_train_step_adds_aux_loss(model):
    fresh = models.build(_cfg())
    tokens = _tokens(seed=8)
    out = _forward(fresh, tokens)
    graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
    data = DataConfig(kind="copying", seq_len=12, batch_size=2, vocab_size=16, copy_len=4)
    run = trainer.TrainConfig(model="moe-tiny", steps=2, warmup_steps=1, data=data)
    tx, _ = trainer.make_optimizer(run)
    train_step, _ = trainer.make_step_fns(graphdef, tx)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones_like(tokens)}
    ce = trainer.masked_cross_entropy(out.logits, tokens, batch["mask"])
    params = nnx.to_pure_dict(params)
    _, _, metrics = train_step(params, tx.init(params), rest, batch)
    np.testing.assert_allclose(float(metrics["aux_loss"]), float(out.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(ce), rtol=1e-5)


def test_count_active_params():
    cfg = _cfg()
    per_expert = 3 * 64 * 96
    assert models.count_params(cfg) - models.count_active_params(cfg) == 2 * 2 * per_expert


def test_clear_errors():
    with pytest.raises(ValueError, match="num_experts is 0"):
        models.get_config("dense-tiny", channel_pattern=("moe",))
    with pytest.raises(ValueError, match="experts_per_token=5 must be in 1..num_experts=4"):
        _cfg(experts_per_token=5)
    with pytest.raises(ValueError, match="unknown moe_dispatch 'sorted'"):
        _cfg(moe_dispatch="sorted")
    # The block checks too, for configs that name it only through a custom pattern.
    with pytest.raises(ValueError, match="num_experts >= 1"):
        MoE(models.get_config("dense-tiny"), 0, rngs=nnx.Rngs(0))
