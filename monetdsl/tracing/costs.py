"""Cost models: an analytic roofline with device presets, or times measured on a device.

**Roofline.** An op that performs ``F`` floating-point operations and moves ``B`` bytes
takes ``overhead + max(F / peak_flops, B / bandwidth)``. ``F`` comes from torch's own
FLOP formulas (:mod:`torch.utils.flop_counter`) for matrix products and convolutions and
from a per-kind count per element otherwise; ``B`` is what the kernel reads and writes
(inputs, outputs, kept tensors, gradients). Presets:

* ``cpu``: this project's 2-core development machine, measured once with
  ``benchmarks/cpu_preset.py`` (1024^2 matmul, 64 MiB copy, a 1-element op);
* ``P100``, ``V100``, ``A100``, ``H100``: datasheet peak rates (fp32 CUDA cores, 16-bit
  tensor cores for f16/bf16 matrix products, HBM bandwidth) and a 5 us launch overhead.

The first line of every traced spec names the cost model that produced its times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DevicePreset", "PRESETS", "preset", "Roofline", "node_flops", "MATMUL_KINDS"]


@dataclass(frozen=True)
class DevicePreset:
    """Peak rates of one device. ``flops``/``matmul_flops`` are per second and per dtype."""

    name: str
    description: str
    flops: dict[str, float]
    matmul_flops: dict[str, float]
    bandwidth: float  # bytes per second
    overhead_us: float
    source: str = field(default="datasheet", compare=False)

    def peak(self, dtype: str, matmul: bool) -> float:
        table = self.matmul_flops if matmul else self.flops
        return table.get(dtype, table.get("f32"))


T = 1e12
G = 1e9
PRESETS: dict[str, DevicePreset] = {
    "cpu": DevicePreset(
        "cpu",
        "2-core AMD EPYC development machine (torch 2.13 CPU, 2 threads), measured 2026-11-25",
        flops={"f32": 58 * G, "f64": 36 * G, "bf16": 58 * G, "f16": 58 * G},
        matmul_flops={"f32": 58 * G, "f64": 36 * G, "bf16": 134 * G, "f16": 58 * G},
        bandwidth=16.5 * G,
        overhead_us=2.8,
        source="measured by benchmarks/cpu_preset.py",
    ),
    "P100": DevicePreset(
        "P100", "NVIDIA Tesla P100 PCIe 16 GB", flops={"f32": 9.3 * T, "f16": 18.7 * T, "bf16": 9.3 * T, "f64": 4.7 * T},
        matmul_flops={"f32": 9.3 * T, "f16": 18.7 * T, "bf16": 9.3 * T, "f64": 4.7 * T}, bandwidth=732 * G, overhead_us=5.0,
    ),
    "V100": DevicePreset(
        "V100", "NVIDIA Tesla V100 SXM2 16 GB", flops={"f32": 15.7 * T, "f16": 31.4 * T, "bf16": 15.7 * T, "f64": 7.8 * T},
        matmul_flops={"f32": 15.7 * T, "f16": 125 * T, "bf16": 15.7 * T, "f64": 7.8 * T}, bandwidth=900 * G, overhead_us=5.0,
    ),
    "A100": DevicePreset(
        "A100", "NVIDIA A100 SXM4 40 GB", flops={"f32": 19.5 * T, "f16": 78 * T, "bf16": 39 * T, "f64": 9.7 * T},
        matmul_flops={"f32": 19.5 * T, "f16": 312 * T, "bf16": 312 * T, "f64": 19.5 * T}, bandwidth=1555 * G, overhead_us=5.0,
    ),
    "H100": DevicePreset(
        "H100", "NVIDIA H100 SXM5 80 GB", flops={"f32": 67 * T, "f16": 134 * T, "bf16": 134 * T, "f64": 34 * T},
        matmul_flops={"f32": 67 * T, "f16": 989 * T, "bf16": 989 * T, "f64": 67 * T}, bandwidth=3350 * G, overhead_us=5.0,
    ),
}

#: catalogue kinds whose FLOPs run on matrix units
MATMUL_KINDS = frozenset({"conv", "matmul", "sdpa", "linear_cross_entropy"})


def preset(name: str) -> DevicePreset:
    """A preset by name, case-insensitively (``p100``, ``cpu``)."""
    for key, value in PRESETS.items():
        if key.lower() == name.lower():
            return value
    raise KeyError(name)


@dataclass(frozen=True)
class Roofline:
    """Times from FLOPs and bytes on one :class:`DevicePreset`."""

    device: DevicePreset

    def time_us(self, flops: float, nbytes: float, dtype: str = "f32", matmul: bool = False) -> float:
        compute = flops / self.device.peak(dtype, matmul)
        memory = nbytes / self.device.bandwidth
        return round(self.device.overhead_us + max(compute, memory) * 1e6, 3)

    def describe(self) -> str:
        d = self.device
        return (
            f"roofline on {d.name} ({d.description}): {d.flops['f32'] / 1e12:.4g} TFLOP/s f32,"
            f" {d.bandwidth / 1e9:.4g} GB/s, {d.overhead_us:g} us per kernel ({d.source})"
        )


def node_flops(target, args, kwargs, out_val) -> float:
    """FLOPs of one aten call by torch's formulas (0 when torch has none for it)."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(target, "overloadpacket", None)
    fn = flop_registry.get(packet)
    if fn is None:
        return 0.0
    try:
        return float(fn(*args, **kwargs, out_val=out_val))
    except Exception:  # noqa: BLE001 - a formula that does not fit this call counts as 0
        return 0.0
