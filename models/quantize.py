"""Post-training weight quantization of a model's linear layers, and quantized checkpoints.

``quantize(model, recipe)`` returns a new model in which every ``Einsum`` (attention and MLP
projections; the untied LM head only if a rule asks for it) is a ``QuantizedEinsum``: the
kernel viewed as a ``[K, N]`` matrix (``K`` the dimensions contracted with the input, ``N`` the
kernel's output dimensions) in ``kernels.quant`` storage, applied with
``kernels.quant.matmul``. Embeddings (and so a tied head) are not ``Einsum``s and stay float.
The outlier option keeps the ``k`` input channels with the largest weight absmax (times the
calibration activation absmax, when given) in float, as OWQ (arXiv:2306.02272) and QUIK
(arXiv:2310.09259) do::

    recipe = models.QuantRecipe("int4", group_size=32, outlier_channels=8,
                                rules={"blocks.0": "int8", "blocks.1.mixer.o": None})
    qmodel = models.quantize(model, recipe)
    models.param_bytes(qmodel)                      # bytes of every parameter as stored
    models.save_quantized(qmodel, "/tmp/q")         # orbax; float8 is stored as is
    qmodel = models.load_quantized("/tmp/q")

Layer paths are ``nnx.iter_modules`` paths joined by dots: ``blocks.0.mixer.q``,
``blocks.0.channel.up``, ``lm_head``. A rule maps a path prefix (whole components) to a scheme
or ``None`` (keep float); the longest matching prefix wins; then layers named in
``FLOAT_LAYERS`` (MoE routers) stay float, then ``DEFAULT_RULES``, then ``recipe.scheme``. The
routed experts of an MoE block (``[E, D, F]`` parameters, not ``Einsum`` layers) stay float.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

import kernels.quant as kq
from models.configs import ModelConfig
from models.layers.linear import Einsum, shard_weight
from models.lm import abstract

DEFAULT_RULES: dict[str, str | None] = {"lm_head": None}  # the untied output head stays float
# Layers kept float wherever they are unless a rule names them: MoE routers (top-k choices flip
# under rounding; a router is E / (3 F) of its layer's bytes, 0.1% for Mixtral).
FLOAT_LAYERS = ("router",)
QUANT_FILE = "quantization.json"
STATE_DIR = "state"


class QuantizedParam(nnx.Param):
    """Quantized storage (integer / float8 values, their scales, outlier row indices): placed
    and checkpointed like a parameter, but not trainable."""


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a model's linear layers.

    Attributes:
      scheme: ``"int8"``, ``"int4"`` or ``"fp8"`` (``kernels.quant.SCHEMES``).
      group_size: rows of ``K`` per scale; ``None`` for one scale per output channel.
      activations: ``None`` (weight-only) or ``"int8"`` / ``"fp8"`` (W8A8: per-channel weights
        of the same scheme, activations quantized per row with dynamic scales).
      impl: ``kernels.quant.matmul`` implementation.
      outlier_channels: input channels per layer kept in float (0 = none; at most the
        layer's ``K``, so a large value keeps every layer float: the exactness check).
      rules: path prefix -> scheme or ``None`` (float), over ``DEFAULT_RULES``.
    """

    scheme: str = "int8"
    group_size: int | None = None
    activations: str | None = None
    impl: str = "auto"
    outlier_channels: int = 0
    rules: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_choice("scheme", self.scheme, kq.SCHEMES)
        _check_choice("activations", self.activations, kq.ACTIVATIONS)
        _check_choice("impl", self.impl, kq.IMPLS)
        if not isinstance(self.outlier_channels, int) or self.outlier_channels < 0:
            raise ValueError(f"outlier_channels must be an int >= 0, got {self.outlier_channels}")
        for prefix, scheme in self.rules.items():
            _check_choice(f"scheme of rule {prefix!r}", scheme, (*kq.SCHEMES, None))

    def __hash__(self):  # rules is a dict; hash its items so the recipe can be a static arg
        fields = dataclasses.astuple(self)[:-1]
        return hash((*fields, tuple(sorted(self.rules.items()))))

    def scheme_for(self, path: str) -> str | None:
        """The scheme of the layer at ``path`` (``None``: keep it float)."""
        hits = [p for p in self.rules if _under(path, p)]
        if hits:
            return self.rules[max(hits, key=len)]
        if path.rsplit(".", 1)[-1] in FLOAT_LAYERS:
            return None
        hits = [p for p in DEFAULT_RULES if _under(path, p)]
        return DEFAULT_RULES[max(hits, key=len)] if hits else self.scheme


def _check_choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {list(valid)}")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """An einsum ``x, w -> y`` as ``y_MN = x_MK @ w_KN`` plus the transposes around it."""

    x_perm: tuple[int, ...]  # x -> [batch..., contracted...]
    w_perm: tuple[int, ...]  # kernel -> [contracted..., out...]
    y_perm: tuple[int, ...]  # [batch..., out...] -> y
    num_batch: int
    num_contract: int


def _layout(equation: str) -> _Layout:
    lhs, rest = equation.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    contract = [c for c in rhs if c in lhs and c not in out]
    wout = [c for c in rhs if c in out and c not in lhs]
    batch = [c for c in lhs if c not in rhs]
    if len(contract) + len(wout) != len(rhs) or set(out) != set(batch) | set(wout):
        raise ValueError(
            f"einsum {equation!r} is not a [K, N] matmul: every kernel dimension must be either "
            "contracted with the input or an output, and every other input dimension an output"
        )
    inter = batch + wout
    return _Layout(
        x_perm=tuple(lhs.index(c) for c in batch + contract),
        w_perm=tuple(rhs.index(c) for c in contract + wout),
        y_perm=tuple(inter.index(c) for c in out),
        num_batch=len(batch),
        num_contract=len(contract),
    )


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


class QuantizedEinsum(nnx.Module):
    """An ``Einsum`` with its kernel in ``kernels.quant`` storage.

    ``values`` / ``scales`` hold the ``QuantizedWeight`` leaves of the ``[K, N]`` kernel; with
    ``outliers = k > 0``, ``outlier_idx`` ``[k]`` names the input channels (rows of ``W_KN``)
    kept in float in ``outlier_rows`` ``[k, N]`` and zeroed in the quantized part, so
    ``y = matmul_q(x, W with those rows zeroed) + x[:, idx] @ W[idx]``. Logical axes: a merged
    ``K`` or ``N`` dimension is named after its leading kernel dimension (sharding the merged
    dimension in contiguous blocks is sharding that dimension). The bias stays float.
    """

    def __init__(
        self,
        einsum: Einsum,
        scheme: str,
        *,
        group_size: int | None = None,
        activations: str | None = None,
        impl: str = "auto",
        outliers: int = 0,
        act_absmax=None,
        name: str = "",
    ):
        kernel = einsum.kernel.get_value()  # an array, or a ShapeDtypeStruct (abstract model)
        axes = tuple(einsum.kernel.get_metadata()["out_sharding"])
        lay = _layout(einsum.equation)
        shape = tuple(kernel.shape[i] for i in lay.w_perm)
        K, N = math.prod(shape[: lay.num_contract]), math.prod(shape[lay.num_contract :])
        where = f"layer {name!r} ({einsum.equation}, K={K}, N={N})"
        outliers = min(outliers, K)  # k >= K keeps the whole layer float
        if activations is not None and (scheme != activations or group_size is not None):
            raise ValueError(
                f"{where}: activations={activations!r} needs per-channel {activations} weights, "
                f"got scheme={scheme!r} group_size={group_size}"
            )

        def prepare(kernel):
            w_KN = jnp.transpose(kernel, lay.w_perm).reshape(K, N)
            idx = rows = None
            if outliers:
                score_K = jnp.max(jnp.abs(w_KN.astype(jnp.float32)), axis=1)
                if act_absmax is not None:
                    score_K = score_K * jnp.asarray(act_absmax, jnp.float32).reshape(K)
                idx = jnp.sort(jax.lax.top_k(score_K, outliers)[1]).astype(jnp.int32)
                rows = w_KN[idx]
                w_KN = w_KN.at[idx].set(0)
            return kq.quantize(w_KN, scheme, group_size=group_size), idx, rows

        try:
            qw, idx, rows = (jax.eval_shape if _is_abstract(kernel) else lambda f, x: f(x))(
                prepare, kernel
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        k_axis, n_axis = axes[lay.w_perm[0]], axes[lay.w_perm[lay.num_contract]]
        meta = dict(eager_sharding=False)
        self.values = QuantizedParam(qw.values, out_sharding=(k_axis, n_axis), **meta)
        g_axis = None if group_size is None else k_axis
        self.scales = QuantizedParam(qw.scales, out_sharding=(g_axis, n_axis), **meta)
        self.outlier_idx = (
            None if idx is None else QuantizedParam(idx, out_sharding=(None,), **meta)
        )
        self.outlier_rows = (
            None if rows is None else nnx.Param(rows, out_sharding=(None, n_axis), **meta)
        )
        self.bias = einsum.bias
        self.equation, self.dtype, self.out_dtype = einsum.equation, einsum.dtype, einsum.out_dtype
        self.scheme, self.group_size, self.activations = scheme, group_size, activations
        self.impl, self.outliers = impl, outliers
        self.kernel_shape, self.shape = tuple(kernel.shape), (K, N)
        self.n_shape = shape[lay.num_contract :]

    def spec(self) -> dict:
        """What ``load_quantized`` needs to rebuild this layer from its ``Einsum``."""
        return dict(
            scheme=self.scheme,
            group_size=self.group_size,
            activations=self.activations,
            impl=self.impl,
            outliers=self.outliers,
        )

    def weight(self) -> kq.QuantizedWeight:
        """The quantized ``[K, N]`` kernel (outlier rows zeroed)."""
        values, scales = shard_weight(self.values), shard_weight(self.scales)
        return kq.QuantizedWeight(values, scales, self.scheme, self.group_size, self.shape)

    def __call__(self, x):
        lay = _layout(self.equation)
        x = jnp.transpose(x.astype(self.dtype), lay.x_perm)
        batch_shape = x.shape[: lay.num_batch]
        x_MK = x.reshape(-1, self.shape[0])
        y_MN = kq.matmul(x_MK, self.weight(), activations=self.activations, impl=self.impl)
        if self.outlier_idx is not None:
            x_Mk = jnp.take(x_MK, self.outlier_idx[...], axis=1)
            rows = self.outlier_rows[...].astype(self.dtype)
            y_MN = y_MN + jnp.dot(x_Mk, rows, preferred_element_type=jnp.float32).astype(y_MN.dtype)
        y = jnp.transpose(y_MN.reshape(batch_shape + self.n_shape), lay.y_perm)
        y = y.astype(self.out_dtype or self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def linear_layers(model) -> dict[str, nnx.Module]:
    """Every ``Einsum`` and ``QuantizedEinsum`` of ``model`` by dotted path."""
    return {
        _name(path): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, Einsum | QuantizedEinsum)
    }


def _replace(model, name: str, new) -> None:
    *parents, last = [int(k) if k.isdigit() else k for k in name.split(".")]
    parent = model
    for key in parents:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def quantize(model, recipe: QuantRecipe, *, act_absmax: dict | None = None):
    """A quantized copy of ``model`` (``model`` itself is left as it was; unquantized weights
    are shared with it, not copied).

    Args:
      model: a ``models.LM`` (or any module holding ``Einsum`` layers); may be abstract
        (``models.abstract``), which gives the quantized structure without computing it.
      recipe: what to quantize and how.
      act_absmax: optional calibration, layer path -> input absmax ``[K]`` (or the input's
        contracted shape), e.g. from ``calibrate``; weights the outlier choice by activation
        size (OWQ/QUIK). Ignored without ``outlier_channels``.

    Returns:
      The new model; layers whose scheme is ``None`` stay ``Einsum``.
    """
    model = nnx.clone(model)
    layers = {n: m for n, m in linear_layers(model).items() if isinstance(m, Einsum)}
    for prefix in recipe.rules:
        if not any(_under(n, prefix) for n in layers):
            raise ValueError(
                f"rule {prefix!r} matches no linear layer; layer paths: {sorted(layers)}"
            )
    unknown = sorted(set(act_absmax or {}) - set(layers))
    if unknown:
        raise ValueError(f"act_absmax names unknown layers {unknown}; valid: {sorted(layers)}")
    for name, einsum in layers.items():
        scheme = recipe.scheme_for(name)
        if scheme is None:
            continue
        new = QuantizedEinsum(
            einsum,
            scheme,
            group_size=recipe.group_size,
            activations=recipe.activations,
            impl=recipe.impl,
            outliers=recipe.outlier_channels,
            act_absmax=(act_absmax or {}).get(name),
            name=name,
        )
        _replace(model, name, new)
    return model


class _Recorder(nnx.Module):
    """An ``Einsum`` that also records its input's absmax per contracted channel."""

    def __init__(self, einsum: Einsum, stats: dict, name: str):
        self.einsum, self.stats, self.name = einsum, stats, name

    def __call__(self, x):
        lay = _layout(self.einsum.equation)
        x_K = jnp.max(jnp.abs(jnp.transpose(x, lay.x_perm)), axis=tuple(range(lay.num_batch)))
        x_K = x_K.reshape(-1).astype(jnp.float32)
        self.stats[self.name] = jnp.maximum(self.stats.get(self.name, 0.0), x_K)
        return self.einsum(x)


def calibrate(model, tokens_BT) -> dict[str, jax.Array]:
    """Per-``Einsum`` input absmax over the contracted channels (flattened ``[K]``) on one
    eager (not jitted) forward of ``tokens_BT``: the ``act_absmax`` of ``quantize``."""
    model = nnx.clone(model)
    stats: dict[str, jax.Array] = {}
    for name, m in linear_layers(model).items():
        if isinstance(m, Einsum):
            _replace(model, name, _Recorder(m, stats, name))
    model(tokens_BT)
    return stats


def param_bytes(model) -> int:
    """Bytes of every parameter of ``model`` as stored (quantized values at their storage
    size, int4 two per byte, float32 scales, float outlier rows, biases, norms, embeddings)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)


def layer_bytes(model) -> dict[str, int]:
    """``param_bytes`` of each linear layer (``Einsum`` or ``QuantizedEinsum``) by path."""
    return {name: param_bytes(m) for name, m in linear_layers(model).items()}


def save_quantized(model, path) -> None:
    """Write a quantized ``models.LM`` to the new directory ``path``: ``quantization.json``
    (model config and each quantized layer's spec) and an orbax checkpoint ``state/`` of the
    whole model state (float8 values are stored as float8)."""
    path = epath.Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; save_quantized writes a new directory")
    specs = {n: m.spec() for n, m in linear_layers(model).items() if isinstance(m, QuantizedEinsum)}
    path.mkdir(parents=True)
    (path / QUANT_FILE).write_text(
        json.dumps({"model_config": model.config.to_dict(), "layers": specs}, indent=1)
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / STATE_DIR, nnx.to_pure_dict(nnx.state(model)))
    checkpointer.wait_until_finished()


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def load_quantized(path):
    """The model ``save_quantized`` wrote to ``path``, on the default device.

    Raises:
      FileNotFoundError: no directory, ``quantization.json`` or ``state/`` at ``path``.
      ValueError: an unreadable or inconsistent checkpoint (the message names the path).
    """
    path = epath.Path(path).absolute()
    file = path / QUANT_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"no quantized checkpoint directory at {path}")
    if not file.exists() or not (path / STATE_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a quantized checkpoint (no {QUANT_FILE} or state/)")
    try:
        meta = json.loads(file.read_text())
        cfg = ModelConfig.from_dict(meta["model_config"])
        model = abstract(cfg)
        layers = linear_layers(model)
        for name, spec in meta["layers"].items():
            if not isinstance(layers.get(name), Einsum):
                raise ValueError(f"layer {name!r} is not a linear layer of {cfg.name}")
            _replace(model, name, QuantizedEinsum(layers[name], name=name, **spec))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"bad {file}: {_one_line(e)}") from e
    graphdef, state = nnx.split(model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(state),
    )
    try:
        restored = ocp.StandardCheckpointer().restore(path / STATE_DIR, target)
    except Exception as e:  # orbax and tensorstore raise many types; all mean unreadable here
        raise ValueError(f"cannot read quantized checkpoint {path}: {_one_line(e)}") from e
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
