"""partitioning.hardware: catalog figures against their published sources, device mapping,
the measured CPU roofline and roofline_time."""

import dataclasses
import math

import jax
import pytest

from partitioning import hardware

# API.md's contract: partitioning.hardware.get(name) for exactly these names.
API_NAMES = ["tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "a100", "h100", "h200", "b200", "cpu"]

# (entry, dtype or field, published value, citation). FLOP/s dense; bandwidths one direction.
PUBLISHED = [
    ("h100", "bfloat16", 989e12, "H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity"),
    ("h100", "fp8", 1979e12, "H100 SXM datasheet: FP8 3,958 TFLOPS with sparsity"),
    ("h100", "hbm_bytes", 80e9, "H100 SXM datasheet: 80 GB"),
    ("h100", "hbm_bandwidth", 3.35e12, "H100 SXM datasheet: 3.35 TB/s"),
    ("h100", "ici_bandwidth", 450e9, "H100 SXM datasheet: NVLink 900 GB/s bidirectional"),
    ("h200", "bfloat16", 989e12, "H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity"),
    ("h200", "hbm_bytes", 141e9, "H200 SXM datasheet: 141 GB"),
    ("h200", "hbm_bandwidth", 4.8e12, "H200 SXM datasheet: 4.8 TB/s"),
    ("a100", "bfloat16", 312e12, "A100 datasheet: BF16 312 TFLOPS (624 with sparsity)"),
    ("a100", "hbm_bandwidth", 2.039e12, "A100 80GB SXM datasheet: 2,039 GB/s"),
    ("a100", "ici_bandwidth", 300e9, "A100 SXM datasheet: NVLink 600 GB/s bidirectional"),
    ("b200", "bfloat16", 2.25e15, "HGX B200: BF16 4.5 PFLOPS with sparsity per GPU"),
    ("b200", "fp8", 4.5e15, "HGX B200: FP8 9 PFLOPS with sparsity per GPU"),
    ("b200", "hbm_bandwidth", 8e12, "DGX B200 datasheet: 64 TB/s over 8 GPUs"),
    ("b200", "ici_bandwidth", 900e9, "B200: NVLink 5 1.8 TB/s bidirectional per GPU"),
    ("tpu-v4", "bfloat16", 275e12, "Cloud TPU v4 page: 275 teraflops per chip"),
    ("tpu-v4", "hbm_bytes", 32 * 2**30, "Cloud TPU v4 page: 32 GiB HBM2"),
    ("tpu-v4", "hbm_bandwidth", 1.2e12, "Cloud TPU v4 page: 1200 GBps"),
    ("tpu-v4", "ici_bandwidth_per_link", 4.5e10, "scaling book: v4p 4.5e10 one-way/link"),
    ("tpu-v5e", "bfloat16", 197e12, "Cloud TPU v5e page: 197 TFLOPs"),
    ("tpu-v5e", "int8", 394e12, "Cloud TPU v5e page: 393-394 TOPs"),
    ("tpu-v5e", "hbm_bytes", 16e9, "Cloud TPU v5e page: 16 GB"),
    ("tpu-v5e", "hbm_bandwidth", 819e9, "Cloud TPU v5e page: 819 GBps"),
    ("tpu-v5p", "bfloat16", 459e12, "Cloud TPU v5p page: 459 TFLOPs"),
    ("tpu-v5p", "hbm_bytes", 95e9, "Cloud TPU v5p page: 95 GB"),
    ("tpu-v5p", "hbm_bandwidth", 2.765e12, "Cloud TPU v5p page: 2765 GBps"),
    ("tpu-v5p", "dcn_bandwidth", 50e9 / 8, "Cloud TPU v5p page: DCN 50 Gbps per chip"),
    ("tpu-v6e", "bfloat16", 918e12, "Cloud TPU v6e page: 918 TFLOPs"),
    ("tpu-v6e", "hbm_bytes", 32e9, "Cloud TPU v6e page: 32 GB"),
    ("tpu-v6e", "hbm_bandwidth", 1.64e12, "Cloud TPU v6e page: 1638 GBps"),
    # The v6e page gives 800 GBps bidirectional over 4 ports; the scaling book's 9e10 one-way
    # per link is the usable figure, within 10% of the nominal 100 GB/s.
    ("tpu-v6e", "ici_bandwidth_per_link", 9e10, "scaling book: v6e 9e10 one-way per link"),
]


def _value(chip, what):
    return chip.peak(what) if what in hardware.DTYPES else getattr(chip, what)


def test_every_api_name_resolves():
    assert hardware.list_chips() == sorted(API_NAMES)
    for name in API_NAMES:
        chip = hardware.get(name)
        assert chip.name == name
        assert set(chip.peak_flops) <= set(hardware.DTYPES)
        assert all(v > 0 for v in chip.peak_flops.values())
        assert chip.hbm_bytes > 0 and chip.hbm_bandwidth > 0 and chip.dcn_bandwidth > 0


def test_every_numeric_field_cites_a_source():
    for name in API_NAMES:
        chip = hardware.get(name)
        for field in dataclasses.fields(chip):
            value = getattr(chip, field.name)
            if field.name != "sources" and isinstance(value, int | float | dict | tuple):
                assert chip.sources.get(field.name, "").strip(), (name, field.name)


@pytest.mark.parametrize("name,what,published,citation", PUBLISHED)
def test_published_figures(name, what, published, citation):
    got = _value(hardware.get(name), what)
    assert math.isclose(got, published, rel_tol=0.01), (citation, got)


def test_topologies():
    assert [hardware.get(n).topology for n in ("tpu-v4", "tpu-v5p")] == ["3d torus"] * 2
    assert [hardware.get(n).topology for n in ("tpu-v5e", "tpu-v6e")] == ["2d torus"] * 2
    assert hardware.get("tpu-v4").pod_size == 4096  # Cloud TPU v4 page: pod of 4096 chips
    assert hardware.get("tpu-v5p").pod_size == 8960  # Cloud TPU v5p page: 8960 chips
    assert hardware.get("tpu-v5e").pod_size == hardware.get("tpu-v6e").pod_size == 256
    for name in ("a100", "h100", "h200", "b200"):
        chip = hardware.get(name)
        assert (chip.topology, chip.pod_size, chip.torus_wrap) == ("nvswitch", 8, 0)
    # One direction: half of the bidirectional figures sources print.
    assert "one way" in hardware.get("h100").sources["ici_bandwidth_per_link"]
    assert "one-way" in hardware.get("tpu-v5e").sources["ici_bandwidth_per_link"]
    assert "dense" in hardware.get("h100").sources["peak_flops"]


def test_unknown_names_and_dtypes_list_the_valid_ones():
    valid = ", ".join(sorted(API_NAMES))
    with pytest.raises(ValueError, match=f"unknown hardware 'tpu-v9'; valid names: {valid}$"):
        hardware.get("tpu-v9")
    with pytest.raises(ValueError, match="tpu-v5e has no 'fp8' peak; it has bfloat16, int8$"):
        hardware.get("tpu-v5e").peak("fp8")
    assert hardware.get("h100").peak("fp8") == 1979e12


@pytest.mark.parametrize(
    "kind,platform,name",
    [
        ("NVIDIA H100 80GB HBM3", "gpu", "h100"),
        ("NVIDIA H200", "gpu", "h200"),
        ("NVIDIA A100-SXM4-80GB", "gpu", "a100"),
        ("NVIDIA B200", "cuda", "b200"),
        ("TPU v4", "tpu", "tpu-v4"),
        ("TPU v5 lite", "tpu", "tpu-v5e"),
        ("TPU v5e", "tpu", "tpu-v5e"),
        ("TPU v5", "tpu", "tpu-v5p"),
        ("TPU v5p", "tpu", "tpu-v5p"),
        ("TPU v6 lite", "tpu", "tpu-v6e"),
        ("TPU v6e", "tpu", "tpu-v6e"),
        ("cpu", "cpu", "cpu"),
    ],
)
def test_device_kind_mapping(kind, platform, name):
    assert hardware.chip_for_device_kind(kind, platform).name == name


@pytest.mark.parametrize(
    "kind,message",
    [
        ("AMD Instinct MI300X", "no catalog entry for device kind 'AMD Instinct MI300X'"),
        ("TPU v4 lite", "no catalog entry for device kind 'TPU v4 lite'"),
        ("NVIDIA GH200 480GB", "no catalog entry for device kind 'NVIDIA GH200 480GB'"),
        ("NVIDIA H100 PCIe", "'NVIDIA H100 PCIe' is a pcie variant"),
        ("NVIDIA A100-SXM4-40GB", "'NVIDIA A100-SXM4-40GB' is a 40gb variant"),
    ],
)
def test_unknown_or_other_variant_device_kinds_are_errors(kind, message):
    with pytest.raises(ValueError, match=message):
        hardware.chip_for_device_kind(kind, "gpu")


def test_detect_returns_cpu_here():
    assert jax.devices()[0].platform == "cpu"
    assert hardware.detect() is hardware.get("cpu")
    assert hardware.detect(jax.devices()[3]) is hardware.get("cpu")


def test_measure_cpu_is_a_plausible_roofline():
    chip = hardware.measure_cpu()
    flops, bandwidth = chip.peak("float32"), chip.hbm_bandwidth
    assert chip.name == "cpu (measured)" and list(chip.peak_flops) == ["float32"]
    assert math.isfinite(flops) and 1e8 < flops < 1e13
    assert math.isfinite(bandwidth) and 1e8 < bandwidth < 1e12
    assert chip.hbm_bytes > 0
    for field in ("peak_flops", "hbm_bandwidth"):
        assert chip.sources[field] == "measured on this host by measure_cpu()"
    assert hardware.get("cpu").name == "cpu"  # The catalog entry is untouched.


def test_roofline_time_takes_the_larger_bound():
    h100 = hardware.get("h100")
    # 7B bf16 parameters at batch 1: 14 GB of weights read, 14 GFLOP -> memory bound.
    assert hardware.roofline_time(h100, flops=14e9, bytes=14e9) == pytest.approx(14e9 / 3.35e12)
    # Two seconds of bf16 compute and one byte -> compute bound.
    assert hardware.roofline_time(h100, flops=2 * 989e12, bytes=1.0) == pytest.approx(2.0)
    # fp8 doubles the compute rate; the memory bound does not move.
    t = hardware.roofline_time(h100, flops=1979e12, bytes=1.0, dtype="fp8")
    assert t == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no 'fp8' peak"):
        hardware.roofline_time(hardware.get("a100"), flops=1.0, bytes=1.0, dtype="fp8")
