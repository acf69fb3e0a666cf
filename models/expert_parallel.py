"""Expert-parallel mixture-of-experts FFN: tokens travel to the experts by two all-to-alls.

GShard (Lepikhin et al., arXiv:2006.16668 §2.2-3.2) and DeepSpeed-MoE (Rajbhandari et al.,
arXiv:2201.05596 §5) split the experts of a layer over a mesh axis. Each device routes its own
tokens, sends every (token, choice) assignment to the device that owns the chosen expert with
one ``all_to_all``, computes the assignments it received with its local experts (a grouped
matmul, ``kernels.moe.grouped_matmul``), sends the results back with a second ``all_to_all``
and combines them with the router weights.

Buffers have a fixed size (XLA needs static shapes): ``C`` slots per destination shard, so each
all-to-all moves ``[n, C, D]`` per device for ``n`` shards of the expert axis. ``capacity=None``
and ``capacity_factor=None`` is dropless: ``C`` is the exact worst case, every local
assignment that can reach one shard (``t * min(k, E / n)`` for ``t`` local tokens). A
``capacity_factor`` gives ``C = ceil(capacity_factor * t * k / n)`` (Switch Transformer,
arXiv:2101.03961 §2.2); assignments past ``C`` are dropped (contribute zero) and counted,
first choices of every token before second choices (GShard's priority).

    y_TD, dropped = expert_parallel_ffn(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF,
                                        w_down_EFD, mesh=mesh, axis="experts",
                                        data_axis="data")

Letters: T tokens, D model, F expert hidden, E experts, K top-k choices; lower-case ``t`` the
tokens of one device, ``n`` the expert shards, ``C`` slots per destination shard.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels import moe

try:
    _shard_map = jax.shard_map
except AttributeError:  # JAX < 0.7
    from jax.experimental.shard_map import shard_map as _shard_map


def shard_capacity(
    tokens_per_device: int,
    experts_per_token: int,
    num_experts: int,
    shards: int,
    *,
    capacity: int | None = None,
    capacity_factor: float | None = None,
) -> int:
    """Slots ``C`` of each per-destination send buffer (see the module docstring).

    Args:
      tokens_per_device: ``t``, the tokens one device routes.
      experts_per_token: ``k``.
      num_experts: ``E``.
      shards: ``n``, devices along the expert axis.
      capacity: an explicit ``C`` (wins over ``capacity_factor``).
      capacity_factor: ``C = ceil(capacity_factor * t * k / n)``; with neither, dropless.
    """
    if capacity is not None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        return capacity
    t, k = tokens_per_device, experts_per_token
    if capacity_factor is None:
        return t * min(k, num_experts // shards)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * t * k / shards))


def expert_parallel_ffn(
    x_TD,
    expert_ids_TK,
    weights_TK,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    mesh: Mesh,
    axis: str = "experts",
    data_axis: str | None = None,
    capacity: int | None = None,
    capacity_factor: float | None = None,
    activation: Callable = jax.nn.silu,
    impl: str = "auto",
    interpret: bool = False,
):
    """A gated MoE FFN, ``sum_k w_k down_e(act(x gate_e) * (x up_e))``, experts split over
    ``axis``.

    Inside, tokens are split over ``(data_axis, axis)`` (a replicated input is sliced
    locally, no communication) and weights over ``axis`` along ``E``.

    Args:
      x_TD: ``[T, D]`` tokens; ``T`` divisible by the size of ``(data_axis, axis)``.
      expert_ids_TK: ``[T, K]`` integer expert of each of a token's ``K`` choices.
      weights_TK: ``[T, K]`` router weight of each choice.
      w_gate_EDF, w_up_EDF: ``[E, D, F]``; w_down_EFD: ``[E, F, D]``; ``E`` divisible by the
        size of ``axis``.
      mesh: the device mesh; ``axis`` (and ``data_axis``, if given) name its axes.
      capacity, capacity_factor: send-buffer slots per destination shard
        (``shard_capacity``); neither means dropless.
      activation: applied to the gate projection (``jax.nn.silu``: SwiGLU).
      impl, interpret: passed to ``kernels.moe.grouped_matmul``.

    Returns:
      ``(y_TD, dropped)``: ``[T, D]`` in ``x``'s dtype, sharded like the tokens inside, and the
      number of dropped (token, choice) assignments over all devices (int32 scalar).
    """
    T, D = x_TD.shape
    E, _, F = w_gate_EDF.shape
    K = expert_ids_TK.shape[1]
    if w_up_EDF.shape != (E, D, F) or w_down_EFD.shape != (E, F, D):
        raise ValueError(
            f"expert weights must be gate/up [E, D, F] and down [E, F, D] with D={D}; got "
            f"gate{tuple(w_gate_EDF.shape)}, up{tuple(w_up_EDF.shape)}, "
            f"down{tuple(w_down_EFD.shape)}"
        )
    if expert_ids_TK.shape != (T, K) or weights_TK.shape != (T, K):
        raise ValueError(
            f"expert_ids and weights must be [T, K] = [{T}, K]; got "
            f"{tuple(expert_ids_TK.shape)} and {tuple(weights_TK.shape)}"
        )
    for name in (axis, data_axis):
        if name is not None and name not in mesh.shape:
            raise ValueError(f"mesh axis {name!r} not in mesh axes {list(mesh.shape)}")
    n = mesh.shape[axis]
    token_axes = (axis,) if data_axis is None else (data_axis, axis)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if E % n:
        raise ValueError(f"num_experts={E} does not divide over {n} shards of axis {axis!r}")
    if T % shards:
        raise ValueError(f"T={T} tokens do not divide over {shards} shards of {token_axes}")
    C = shard_capacity(T // shards, K, E, n, capacity=capacity, capacity_factor=capacity_factor)
    tok = P(token_axes, None)
    expert = P(axis, None, None)
    body = functools.partial(
        _local,
        axis=axis,
        token_axes=token_axes,
        num_experts=E,
        shards=n,
        capacity=C,
        activation=activation,
        impl=impl,
        interpret=interpret,
    )
    return _shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, tok, tok, expert, expert, expert),
        out_specs=(tok, P()),
    )(x_TD, expert_ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _local(
    x_tD,
    ids_tK,
    weights_tK,
    w_gate_eDF,
    w_up_eDF,
    w_down_eFD,
    *,
    axis,
    token_axes,
    num_experts,
    shards,
    capacity,
    activation,
    impl,
    interpret,
):
    """One device: dispatch, local experts, return, combine."""
    t, D = x_tD.shape
    K = ids_tK.shape[1]
    n, C, e_local = shards, capacity, num_experts // shards

    # Assignments in priority order: every token's first choice, then every second choice.
    ids_A = ids_tK.T.reshape(-1).astype(jnp.int32)
    token_A = jnp.tile(jnp.arange(t), K)
    dest_A = ids_A // e_local
    onehot_AN = jax.nn.one_hot(dest_A, n, dtype=jnp.int32)
    slot_A = jnp.sum((jnp.cumsum(onehot_AN, axis=0) - 1) * onehot_AN, axis=1)
    keep_A = slot_A < C
    dropped = jax.lax.psum(jnp.sum(~keep_A).astype(jnp.int32), token_axes)

    # Dropped assignments write out of bounds (discarded by mode="drop").
    row_A = jnp.where(keep_A, dest_A * C + slot_A, n * C)
    send_x = jnp.zeros((n * C, D), x_tD.dtype).at[row_A].set(x_tD[token_A], mode="drop")
    send_e = jnp.full((n * C,), e_local, jnp.int32).at[row_A].set(ids_A % e_local, mode="drop")
    recv_x = _all_to_all(send_x.reshape(n, C, D), axis).reshape(n * C, D)
    recv_e = _all_to_all(send_e.reshape(n, C), axis).reshape(n * C)

    # Received rows sorted by local expert (empty slots, expert ``e_local``, sort last).
    order = jnp.argsort(recv_e, stable=True)
    sizes_e = jnp.bincount(recv_e, length=e_local).astype(jnp.int32)
    xs = recv_x[order]
    mm = functools.partial(moe.grouped_matmul, impl=impl, interpret=interpret)
    h = activation(mm(xs, w_gate_eDF, sizes_e)) * mm(xs, w_up_eDF, sizes_e)
    ys = mm(h, w_down_eFD, sizes_e)
    out_x = jnp.zeros_like(ys).at[order].set(ys)

    back_x = _all_to_all(out_x.reshape(n, C, D), axis).reshape(n * C, D)
    y_AD = back_x.at[row_A].get(mode="fill", fill_value=0)
    w_A = jnp.where(keep_A, weights_tK.T.reshape(-1), 0).astype(y_AD.dtype)
    y_tD = jnp.zeros((t, D), jnp.float32).at[token_A].add(y_AD * w_A[:, None])
    return y_tD.astype(x_tD.dtype), dropped


def _all_to_all(x, axis):
    """Block ``i`` of dim 0 goes to device ``i`` of ``axis``; received blocks stack on dim 0."""
    return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)
