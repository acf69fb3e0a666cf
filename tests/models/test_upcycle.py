"""Sparse upcycling (``models.upcycle``): the upcycled model equals the dense one at init."""

import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.upcycle import upcycle


@pytest.fixture(scope="module")
def dense():
    return models.build(models.get_config("dense-tiny"), seed=3)


def _tokens(B=2, T=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 264, (B, T)), jnp.int32)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=4, experts_per_token=2),
        dict(num_experts=8, experts_per_token=1, layers=[1]),
        dict(num_experts=4, experts_per_token=2, moe_dispatch="capacity", capacity_factor=4.0),
    ],
)
def test_upcycled_logits_equal_the_dense_model(dense, kw):
    moe = upcycle(dense, **kw)
    tokens = _tokens()
    out = moe(tokens)
    np.testing.assert_allclose(out.logits, dense(tokens), atol=1e-5, rtol=1e-5)
    layers = kw.get("layers", range(2))
    assert [moe.config.channel(i) == "moe" for i in range(2)] == [i in layers for i in range(2)]
    assert moe.config.num_experts == kw["num_experts"]


def test_every_expert_is_the_dense_mlp_and_the_router_is_new(dense):
    moe = upcycle(dense, num_experts=4)
    for name in ("gate", "up", "down"):
        experts = np.asarray(getattr(moe.blocks[0].channel, name)[...])
        want = np.asarray(getattr(dense.blocks[0].channel, name).kernel[...])
        assert experts.shape == (4, *want.shape)
        np.testing.assert_array_equal(experts, np.broadcast_to(want, experts.shape))
    np.testing.assert_array_equal(
        moe.blocks[1].mixer.q.kernel[...], dense.blocks[1].mixer.q.kernel[...]
    )
    router = np.asarray(moe.blocks[0].channel.router.kernel[...])
    assert router.shape == (64, 4) and np.abs(router).max() > 0


def test_bad_requests_name_the_problem(dense):
    with pytest.raises(ValueError, match=r"layers \[5\] are not MLP layers"):
        upcycle(dense, num_experts=4, layers=[5])
    with pytest.raises(ValueError, match="router_renormalize=False would make"):
        upcycle(dense, num_experts=4, router_renormalize=False)
    biased = models.build(models.get_config("dense-tiny", mlp_bias=True))
    with pytest.raises(ValueError, match="bias-free MLPs"):
        upcycle(biased, num_experts=4)
