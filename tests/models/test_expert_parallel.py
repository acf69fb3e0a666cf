"""``models.expert_parallel`` on the 8-device CPU mesh against a single-device dense oracle
(every expert on every token, combined by one-hot router weights), and its drop count against
a closed-form count on constructed routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from models.expert_parallel import expert_parallel_ffn, shard_capacity

T, D, F, E, K = 32, 16, 24, 8, 2
TOL = 1e-5


def _dense(x_TD, ids_TK, weights_TK, g_EDF, u_EDF, d_EFD):
    h_TEF = jax.nn.silu(jnp.einsum("td,edf->tef", x_TD, g_EDF))
    h_TEF = h_TEF * jnp.einsum("td,edf->tef", x_TD, u_EDF)
    y_TED = jnp.einsum("tef,efd->ted", h_TEF, d_EFD)
    combine_TE = jnp.sum(jax.nn.one_hot(ids_TK, E) * weights_TK[..., None], axis=1)
    return jnp.einsum("ted,te->td", y_TED, combine_TE)


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(ks[1], (T, E))), K)
    g, u = (0.2 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
    d = 0.2 * jax.random.normal(ks[4], (E, F, D))
    return x, ids, weights, g, u, d


def _mesh(shape):
    names = ("experts",) if len(shape) == 1 else ("data", "experts")
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=["experts=8", "data=2,experts=4"])
def test_dropless_matches_dense_forward_and_gradients(shape):
    mesh = _mesh(shape)
    x, ids, weights, g, u, d = _inputs()
    data = "data" if len(shape) == 2 else None

    def ep(x, weights, g, u, d):
        return expert_parallel_ffn(x, ids, weights, g, u, d, mesh=mesh, data_axis=data)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    @jax.jit  # forward and gradients in one compile
    def ep_and_grad(*args):
        return ep(*args), jax.grad(loss(lambda *a: ep(*a)[0]), argnums=range(5))(*args)

    args = (x, weights, g, u, d)
    (y, dropped), got = ep_and_grad(*args)
    np.testing.assert_allclose(y, _dense(x, ids, weights, g, u, d), atol=TOL, rtol=TOL)
    assert int(dropped) == 0

    want = jax.grad(loss(lambda x, w, g, u, d: _dense(x, ids, w, g, u, d)), argnums=range(5))(*args)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=name)


def test_capacity_drops_exactly_the_closed_form_count():
    """Experts=4 shards of 2 experts, 4 tokens per device. Token ``i`` of a device picks expert
    ``i % 3`` first (shards 0, 0, 1) and expert 7 second (shard 3). With ``C`` slots per shard,
    first choices put tokens 0, 1, 3 on shard 0 and token 2 on shard 1; second
    choices put 4 on shard 3. Dropped per device: max(0, 3 - C) + max(0, 1 - C) + max(0, 4 - C).
    The kept ones are the earliest tokens of each shard (first choices before second)."""
    mesh = _mesh((2, 4))
    x, _, weights, g, u, d = _inputs(1)
    t = T // 8
    local = np.arange(T) % t
    ids = np.stack([local % 3, np.full(T, 7)], axis=1)
    for C in (1, 2, 3):
        # Jitted: one compile per capacity instead of op-by-op eager shard_map dispatch.
        ep = jax.jit(
            lambda *a, C=C: expert_parallel_ffn(*a, mesh=mesh, data_axis="data", capacity=C)
        )
        y, dropped = ep(x, jnp.asarray(ids), weights, g, u, d)
        per_device = max(0, 3 - C) + max(0, 1 - C) + max(0, 4 - C)
        assert int(dropped) == 8 * per_device
        # Slot of each assignment in its destination shard: tokens 0, 1, 3 fill shard 0 and
        # token 2 shard 1 (first choices); every second choice queues on shard 3 after them.
        slot = np.stack([np.array([0, 1, 0, 2])[local], local], axis=1)
        keep = slot < C
        want = _dense(x, jnp.asarray(ids), weights * keep, g, u, d)
        np.testing.assert_allclose(y, want, atol=TOL, rtol=TOL)


def test_shard_capacity():
    assert shard_capacity(4, 2, 8, 4) == 4 * 2  # dropless: every assignment to one shard
    assert shard_capacity(4, 2, 8, 8) == 4 * 1  # ... but at most one expert of each token
    assert shard_capacity(4, 2, 8, 4, capacity_factor=1.0) == 2
    assert shard_capacity(5, 2, 8, 4, capacity_factor=1.25) == 4  # ceil(1.25 * 10 / 4)
    assert shard_capacity(4, 2, 8, 4, capacity=3, capacity_factor=1.0) == 3
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        shard_capacity(4, 2, 8, 4, capacity_factor=0.0)


def test_errors_name_the_shapes():
    mesh = _mesh((8,))
    x, ids, weights, g, u, d = _inputs()
    with pytest.raises(ValueError, match="num_experts=6 does not divide over 8"):
        expert_parallel_ffn(x, ids, weights, g[:6], u[:6], d[:6], mesh=mesh)
    with pytest.raises(ValueError, match="T=30 tokens do not divide"):
        expert_parallel_ffn(x[:30], ids[:30], weights[:30], g, u, d, mesh=mesh)
    with pytest.raises(ValueError, match="mesh axis 'model' not in"):
        expert_parallel_ffn(x, ids, weights, g, u, d, mesh=mesh, axis="model")
