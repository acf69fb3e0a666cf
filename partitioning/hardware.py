"""Hardware catalog: the figures a roofline and a sharding cost model need, each with its source.

Every accelerator number is a published figure and ``Chip.sources`` names where it comes from:
a vendor datasheet, a Google Cloud TPU documentation page, or Austin et al., "How To Scale
Your Model" (2025, https://jax-ml.github.io/scaling-book/, "the scaling book").
``roofline_time`` is the bound of Pope et al., "Efficiently Scaling Transformer Inference"
(2022, arXiv:2211.05102). Conventions:

- FLOP/s are **dense** (NVIDIA datasheets print 2:4-sparse figures, twice these).
- Bandwidths are bytes/s **per direction** (datasheets often print the bidirectional sum,
  twice these). ``ici_bandwidth_per_link`` is one link one way; ``ici_bandwidth`` sums a chip's
  links one way, which for a GPU is its NVLink bandwidth per direction.
- GB means 1e9 bytes and GiB 2**30 bytes, as each source writes them.

The ``"cpu"`` entry is a nominal placeholder, not a datasheet: benchmarks on a CPU measure this
host's own roofline with ``measure_cpu()``.

    chip = hardware.get("h100")                 # or hardware.detect() for the running device
    chip.peak("bfloat16"), chip.hbm_bandwidth
    hardware.roofline_time(chip, flops=2 * 7e9, bytes=14e9)   # a 7B bf16 decode step's bound
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp

DTYPES = ("bfloat16", "float32", "int8", "fp8")

_BOOK = "How To Scale Your Model (Austin et al. 2025), 'How to Think About TPUs', TPU specs"
_NVSWITCH_DOMAIN = 8  # GPUs on one HGX/DGX baseboard, all-to-all through NVSwitch.


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator (or the host CPU) and the figures a roofline needs.

    Attributes:
      name: catalog name (``get(name)``).
      peak_flops: dense peak FLOP/s (OP/s for int8) per dtype in ``DTYPES``; only the dtypes
        the source publishes. GPU ``float32`` is the TF32 Tensor Core rate (JAX's default
        matmul precision for float32 there); TPUs publish no float32 figure.
      hbm_bytes: HBM capacity in bytes.
      hbm_bandwidth: HBM bandwidth in bytes/s.
      topology: ``"3d torus"`` (TPU v4, v5p), ``"2d torus"`` (v5e, v6e), ``"nvswitch"``
        (GPU: all-to-all NVLink through NVSwitch) or ``"none"``.
      ici_links: ICI ports per TPU chip, or NVLinks per GPU.
      ici_bandwidth_per_link: bytes/s on one link, one direction.
      pod_shape: the largest ICI-connected block of chips (a TPU pod, e.g. ``(16, 16, 16)``),
        or ``(n,)`` for a GPU's NVSwitch domain of ``n`` GPUs.
      torus_wrap: a TPU mesh axis whose size is a multiple of this has wraparound links (a
        ring, so both directions of every link carry data); shorter axes are lines. 0: no torus.
      chips_per_host: accelerators behind one host and its NICs.
      dcn_bandwidth: data-center network bytes/s per chip, one direction (host NIC bandwidth
        divided by ``chips_per_host``).
      sources: field name -> citation, one for every field that holds a number.
    """

    name: str
    peak_flops: dict[str, float]
    hbm_bytes: float
    hbm_bandwidth: float
    topology: str
    ici_links: int
    ici_bandwidth_per_link: float
    pod_shape: tuple[int, ...]
    torus_wrap: int
    chips_per_host: int
    dcn_bandwidth: float
    sources: dict[str, str]

    def __hash__(self):  # Usable as a jit static argument despite the dict fields.
        return hash((self.name, self.hbm_bytes, self.hbm_bandwidth))

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; a dtype the chip has no figure for is an error."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"{self.name} has no {dtype!r} peak; it has {', '.join(self.peak_flops)}"
            )
        return self.peak_flops[dtype]

    @property
    def ici_bandwidth(self) -> float:
        """All of a chip's ICI/NVLink links, one direction, in bytes/s."""
        return self.ici_links * self.ici_bandwidth_per_link

    @property
    def pod_size(self) -> int:
        """Chips in ``pod_shape``: the TPU pod, or the GPUs of one NVSwitch domain."""
        return math.prod(self.pod_shape)


def _tpu_sources(page: str, **extra: str) -> dict[str, str]:
    docs = f"Google Cloud TPU documentation, '{page}' page"
    return {
        "ici_bandwidth_per_link": f"{_BOOK} interconnect table: one-way per link",
        "pod_shape": f"{_BOOK} table (pod size)",
        "torus_wrap": f"{_BOOK}, TPU networking: wraparound on axes that are multiples of 4 "
        "(v4/v5p, whole cubes) or the full 16 (v5e/v6e)",
        "chips_per_host": f"{_BOOK} table (host size)",
        "topology": docs,
        "ici_links": f"{docs}: 'ICI ports per chip' 4 (2D torus, v5e/v6e pages); a 3D torus "
        f"chip has 6 neighbours ({_BOOK}, TPU networking)",
        **extra,
    }


def _gpu(name, *, flops, hbm_bytes, hbm_bw, links, link_bw, dcn, src):
    return Chip(
        name=name,
        peak_flops=flops,
        hbm_bytes=hbm_bytes,
        hbm_bandwidth=hbm_bw,
        topology="nvswitch",
        ici_links=links,
        ici_bandwidth_per_link=link_bw,
        pod_shape=(_NVSWITCH_DOMAIN,),
        torus_wrap=0,
        chips_per_host=_NVSWITCH_DOMAIN,
        dcn_bandwidth=dcn,
        sources=src,
    )


def _gpu_sources(sheet: str, nvlink: str, nic: str, **extra: str) -> dict[str, str]:
    return {
        "hbm_bytes": sheet,
        "hbm_bandwidth": sheet,
        "topology": f"{sheet}: 8-GPU HGX/DGX board, NVLink through NVSwitch, all-to-all",
        "ici_links": f"{sheet}: {nvlink}",
        "ici_bandwidth_per_link": f"{sheet}: {nvlink}; per link one way = total / 2 / links",
        "pod_shape": f"{sheet}: NVSwitch domain of {_NVSWITCH_DOMAIN} GPUs (HGX/DGX board)",
        "torus_wrap": "no torus: NVSwitch is all-to-all",
        "chips_per_host": f"{sheet}: {_NVSWITCH_DOMAIN} GPUs per DGX/HGX system",
        "dcn_bandwidth": f"{sheet}: one {nic} compute NIC per GPU, line rate one way",
        **extra,
    }


_A100 = "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column"
_B200 = "NVIDIA DGX B200 / HGX B200 datasheets, per GPU (8-GPU system totals / 8)"
_DENSE = "dense Tensor Core figures: half the datasheet's 'with sparsity' numbers"

_CATALOG: dict[str, Chip] = {
    "tpu-v4": Chip(
        name="tpu-v4",
        peak_flops={"bfloat16": 275e12, "int8": 275e12},
        hbm_bytes=32 * 2**30,
        hbm_bandwidth=1200e9,
        topology="3d torus",
        ici_links=6,
        ici_bandwidth_per_link=4.5e10,
        pod_shape=(16, 16, 16),
        torus_wrap=4,
        chips_per_host=4,
        dcn_bandwidth=6.25e9,
        sources=_tpu_sources(
            "TPU v4",
            peak_flops="Google Cloud TPU 'TPU v4' page: 275 TFLOP/s per chip, bf16 or int8, "
            "dense; scaling book 2.75e14",
            hbm_bytes="Google Cloud TPU 'TPU v4' page: 32 GiB HBM2",
            hbm_bandwidth="Google Cloud TPU 'TPU v4' page: 1200 GBps; scaling book 1.2e12",
            dcn_bandwidth=f"{_BOOK}: DCN ~6.25e9 bytes/s per TPU, one way",
        ),
    ),
    "tpu-v5e": Chip(
        name="tpu-v5e",
        peak_flops={"bfloat16": 197e12, "int8": 394e12},
        hbm_bytes=16e9,
        hbm_bandwidth=819e9,
        topology="2d torus",
        ici_links=4,
        ici_bandwidth_per_link=4.5e10,
        pod_shape=(16, 16),
        torus_wrap=16,
        chips_per_host=8,
        dcn_bandwidth=3.125e9,
        sources=_tpu_sources(
            "TPU v5e",
            peak_flops="Google Cloud TPU 'TPU v5e' page: 197 TFLOP/s bf16, 393-394 TOP/s "
            "int8 (dense); scaling book 1.97e14 / 3.94e14",
            hbm_bytes="Google Cloud TPU 'TPU v5e' page: 16 GB HBM2",
            hbm_bandwidth="Google Cloud TPU 'TPU v5e' page: 819 GBps (scaling book 8.1e11)",
            dcn_bandwidth=f"{_BOOK}: DCN 3.125e9 bytes/s per TPU one way (Cloud TPU 'TPU v5e' "
            "page: 2 x 100 Gbps NIC per 8-chip host)",
        ),
    ),
    "tpu-v5p": Chip(
        name="tpu-v5p",
        peak_flops={"bfloat16": 459e12, "int8": 918e12, "fp8": 459e12},
        hbm_bytes=95e9,
        hbm_bandwidth=2765e9,
        topology="3d torus",
        ici_links=6,
        ici_bandwidth_per_link=9e10,
        pod_shape=(16, 20, 28),
        torus_wrap=4,
        chips_per_host=4,
        dcn_bandwidth=6.25e9,
        sources=_tpu_sources(
            "TPU v5p",
            peak_flops="Google Cloud TPU 'TPU v5p' page: 459 TFLOP/s bf16 and 459 fp8 "
            "(dense); int8 9.18e14 from the scaling book",
            hbm_bytes="Google Cloud TPU 'TPU v5p' page: 95 GB HBM2e (the scaling book rounds "
            "to 96GB; 95e9 is the conservative reading)",
            hbm_bandwidth="Google Cloud TPU 'TPU v5p' page: 2765 GBps; scaling book 2.8e12",
            dcn_bandwidth="Google Cloud TPU 'TPU v5p' page: DCN 50 Gbps per chip; scaling "
            "book 6.25e9 bytes/s per TPU, one way",
            pod_shape=f"{_BOOK} table: pod 16x20x28 (8960 chips); the Cloud TPU 'TPU v5p' "
            "page caps one slice at 16x16x24",
        ),
    ),
    "tpu-v6e": Chip(
        name="tpu-v6e",
        peak_flops={"bfloat16": 918e12, "int8": 1836e12},
        hbm_bytes=32e9,
        hbm_bandwidth=1638e9,
        topology="2d torus",
        ici_links=4,
        ici_bandwidth_per_link=9e10,
        pod_shape=(16, 16),
        torus_wrap=16,
        chips_per_host=8,
        dcn_bandwidth=1.25e10,
        sources=_tpu_sources(
            "TPU v6e",
            peak_flops="Google Cloud TPU 'TPU v6e' page: 918 TFLOP/s bf16, 1836 TOP/s int8 "
            "(dense); scaling book 9.20e14 / 1.84e15",
            hbm_bytes="Google Cloud TPU 'TPU v6e' page: 32 GB",
            hbm_bandwidth="Google Cloud TPU 'TPU v6e' page: 1638 GBps (~1.64 TB/s)",
            dcn_bandwidth=f"{_BOOK}: DCN 1.25e10 bytes/s per TPU one way (Cloud TPU 'TPU v6e' "
            "page: 4 x 200 Gbps NIC per 8-chip host)",
        ),
    ),
    "a100": _gpu(
        "a100",
        flops={"bfloat16": 312e12, "float32": 156e12, "int8": 624e12},
        hbm_bytes=80e9,
        hbm_bw=2.039e12,
        links=12,
        link_bw=25e9,
        dcn=25e9,
        src=_gpu_sources(
            _A100,
            "NVLink 600 GB/s bidirectional = 12 NVLink3 links x 25 GB/s per direction",
            "HDR InfiniBand 200 Gb/s (DGX A100)",
            peak_flops=f"{_A100}: {_DENSE}; BF16 312 T, TF32 156 T (float32), INT8 624 T; no FP8",
        ),
    ),
    "h100": _gpu(
        "h100",
        flops={"bfloat16": 989e12, "float32": 494.5e12, "int8": 1979e12, "fp8": 1979e12},
        hbm_bytes=80e9,
        hbm_bw=3.35e12,
        links=18,
        link_bw=25e9,
        dcn=50e9,
        src=_gpu_sources(
            _H100,
            "NVLink 900 GB/s bidirectional = 18 NVLink4 links x 25 GB/s per direction",
            "ConnectX-7 NDR 400 Gb/s (DGX H100)",
            peak_flops=f"{_H100}: {_DENSE}; BF16 989 T, TF32 494.5 T (float32), FP8 and "
            "INT8 1979 T",
        ),
    ),
    "h200": _gpu(
        "h200",
        flops={"bfloat16": 989e12, "float32": 494.5e12, "int8": 1979e12, "fp8": 1979e12},
        hbm_bytes=141e9,
        hbm_bw=4.8e12,
        links=18,
        link_bw=25e9,
        dcn=50e9,
        src=_gpu_sources(
            _H200,
            "NVLink 900 GB/s bidirectional = 18 NVLink4 links x 25 GB/s per direction",
            "ConnectX-7 NDR 400 Gb/s (DGX H200)",
            peak_flops=f"{_H200}: {_DENSE}; same GH100 compute as H100 SXM: BF16 989 T, "
            "TF32 494.5 T (float32), FP8 and INT8 1979 T",
        ),
    ),
    "b200": _gpu(
        "b200",
        flops={"bfloat16": 2.25e15, "float32": 1.1e15, "int8": 4.5e15, "fp8": 4.5e15},
        hbm_bytes=180e9,
        hbm_bw=8e12,
        links=18,
        link_bw=50e9,
        dcn=50e9,
        src=_gpu_sources(
            _B200,
            "NVLink 1.8 TB/s bidirectional = 18 NVLink5 links x 50 GB/s per direction",
            "ConnectX-7 400 Gb/s (DGX B200)",
            peak_flops=f"{_B200}: {_DENSE}; BF16 2.25 P, TF32 1.1 P (float32), FP8 and INT8 "
            "4.5 P (the 1000 W HGX part)",
            hbm_bytes=f"{_B200}: 1440 GB per 8 GPUs = 180 GB usable (192 GB HBM3e physical)",
            hbm_bandwidth=f"{_B200}: 64 TB/s per 8 GPUs = 8 TB/s",
        ),
    ),
    "cpu": Chip(
        name="cpu",
        peak_flops={"float32": 1e11, "bfloat16": 1e11},
        hbm_bytes=16e9,
        hbm_bandwidth=2e10,
        topology="none",
        ici_links=0,
        ici_bandwidth_per_link=0.0,
        pod_shape=(1,),
        torus_wrap=0,
        chips_per_host=1,
        dcn_bandwidth=1.25e9,
        sources={
            k: "nominal placeholder (a laptop-class host, 10 Gb/s NIC), not a measurement; "
            "CPU benchmarks measure this host's roofline with measure_cpu()"
            for k in (
                "peak_flops",
                "hbm_bytes",
                "hbm_bandwidth",
                "ici_links",
                "ici_bandwidth_per_link",
                "pod_shape",
                "torus_wrap",
                "chips_per_host",
                "dcn_bandwidth",
            )
        },
    ),
}


def list_chips() -> list[str]:
    """Catalog names, sorted."""
    return sorted(_CATALOG)


def get(name: str) -> Chip:
    """The catalog entry ``name``; an unknown name is an error listing the valid ones."""
    if name not in _CATALOG:
        raise ValueError(f"unknown hardware {name!r}; valid names: {', '.join(list_chips())}")
    return _CATALOG[name]


# JAX device_kind -> catalog name. TPU strings as jax/_src/pallas/mosaic/tpu_info.py spells them.
_TPU_KINDS = {
    "TPU v4": "tpu-v4",
    "TPU v5 lite": "tpu-v5e",
    "TPU v5e": "tpu-v5e",
    "TPU v5": "tpu-v5p",
    "TPU v5p": "tpu-v5p",
    "TPU v6 lite": "tpu-v6e",
    "TPU v6e": "tpu-v6e",
}
# GPUs report the CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"): the
# model token names the entry; tokens of variants whose figures differ (PCIe, NVL, 40GB) veto.
_GPU_MODELS = ("a100", "h100", "h200", "b200")
_GPU_OTHER_VARIANTS = ("pcie", "nvl", "40gb")


def chip_for_device_kind(device_kind: str, platform: str = "gpu") -> Chip:
    """The catalog entry for a JAX ``device_kind`` string on ``platform``.

    Args:
      device_kind: ``jax.Device.device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``, ``"TPU v5 lite"``.
      platform: ``jax.Device.platform`` (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"tpu"``).

    Returns:
      The ``Chip``; ``get("cpu")`` on the CPU platform. An accelerator the catalog lacks, or a
      variant whose figures differ from the catalog's SXM part, is a ``ValueError``.
    """
    if platform == "cpu":
        return _CATALOG["cpu"]
    if device_kind in _TPU_KINDS:
        return _CATALOG[_TPU_KINDS[device_kind]]
    tokens = set(re.split(r"[\s_-]+", device_kind.lower()))
    models = [name for name in _GPU_MODELS if name in tokens]
    if len(models) == 1:
        if variant := [t for t in _GPU_OTHER_VARIANTS if t in tokens]:
            raise ValueError(
                f"device kind {device_kind!r} is a {variant[0]} variant; the catalog's "
                f"{models[0]!r} is the SXM part, pass hardware.get({models[0]!r}) to use it"
            )
        return _CATALOG[models[0]]
    raise ValueError(
        f"no catalog entry for device kind {device_kind!r} (platform {platform!r}); known: "
        f"{', '.join(_TPU_KINDS)}, NVIDIA {'/'.join(m.upper() for m in _GPU_MODELS)} SXM"
    )


def detect(device: jax.Device | None = None) -> Chip:
    """The catalog entry of ``device`` (default: ``jax.devices()[0]``)."""
    device = device if device is not None else jax.devices()[0]
    return chip_for_device_kind(device.device_kind, device.platform)


def _best_seconds(step, x, budget: float, *, chain: bool = False, max_runs: int = 20) -> float:
    """Fastest of at least 2 timed ``step(x)`` after a warm-up (compile) run, within ``budget``.

    ``chain`` feeds each output back as the next input (for a step that donates its argument).
    """
    y = jax.block_until_ready(step(x))
    best, start = math.inf, time.perf_counter()
    for i in range(max_runs):
        x = y if chain else x
        t0 = time.perf_counter()
        y = jax.block_until_ready(step(x))
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget:
            break
    return best


def _host_memory_bytes() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def measure_cpu(
    seconds_budget: float = 1.0, *, matmul_size: int = 1024, copy_bytes: int = 256 * 2**20
) -> Chip:
    """This host's empirical roofline: achieved float32 matmul FLOP/s and memory bandwidth.

    A CPU has no datasheet peak, so roofline fractions on a CPU are taken against what XLA
    reaches here: the best time of a jitted ``matmul_size``-square float32 matmul
    (``2 n^3`` FLOPs) and of a jitted in-place ``x + 1`` over ``copy_bytes`` of float32 (bytes
    read plus bytes written, so ``2 * copy_bytes``; the array is far larger than any cache).
    Each gets half of ``seconds_budget`` after its compile-and-warm-up run; about 1 s in all
    on 2 cores with the defaults.

    Returns:
      A ``Chip`` named ``"cpu (measured)"``: ``peak_flops={"float32": ...}``, the measured
      ``hbm_bandwidth``, the host's physical memory as ``hbm_bytes``; the rest from ``"cpu"``.
    """
    cpu = jax.devices("cpu")[0]
    n = matmul_size
    with jax.default_device(cpu):
        a = jnp.ones((n, n), jnp.float32)
        flops = 2 * n**3 / _best_seconds(jax.jit(lambda x: x @ x), a, seconds_budget / 2)
        del a
        # In place (donated), so the time is memory traffic, not page faults of a fresh output.
        add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
        x = jnp.zeros((copy_bytes // 4,), jnp.float32)
        bandwidth = 2 * x.nbytes / _best_seconds(add_one, x, seconds_budget / 2, chain=True)
    nominal = _CATALOG["cpu"]
    measured = "measured on this host by measure_cpu()"
    memory = _host_memory_bytes()
    sources = {**nominal.sources, "peak_flops": measured, "hbm_bandwidth": measured}
    if memory is not None:
        sources["hbm_bytes"] = "this host's physical memory (os.sysconf)"
    return dataclasses.replace(
        nominal,
        name="cpu (measured)",
        peak_flops={"float32": flops},
        hbm_bytes=memory if memory is not None else nominal.hbm_bytes,
        hbm_bandwidth=bandwidth,
        sources=sources,
    )


def roofline_time(chip: Chip, *, flops: float, bytes: float, dtype: str = "bfloat16") -> float:
    """Lower bound on a step's seconds: ``max(flops / peak(dtype), bytes / hbm_bandwidth)``.

    The roofline model (Williams et al. 2009) as Pope et al. 2022 (arXiv:2211.05102, §2) and
    "How To Scale Your Model" (part 1, Rooflines) apply it: it assumes compute and HBM traffic
    overlap perfectly and both run at peak, so no real step is faster. Communication is not
    included; the cost model adds it.

    Args:
      chip: a catalog entry (``get``, ``detect``) or ``measure_cpu()``.
      flops: FLOPs of the step on one chip.
      bytes: HBM bytes read plus written by the step on one chip.
      dtype: the matmul dtype whose peak applies.

    Returns:
      Seconds.
    """
    return max(flops / chip.peak(dtype), bytes / chip.hbm_bandwidth)
