"""Device, cloud-GPU and network profiles: the numbers the cost estimator and the planner use.

Every number has a stated source; "approximate" marks figures derived or remembered rather than read off a
datasheet. Efficiency factors are the achieved fraction of peak for small-batch CNNs in onnxruntime or
TensorRT (typically 10-40% of compute peak, 50-70% of memory bandwidth). Only the standard library is
imported here (and `partitioning.costtypes`, which imports nothing of ours): a Raspberry Pi with just the
[edge] extra can load these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from partitioning.costtypes import PRECISIONS, check_precision

__all__ = ["PRECISIONS", "JETSON_PROVIDERS", "DeviceProfile", "GpuProfile", "NetworkProfile", "DEVICES", "GPUS",
           "NETWORKS",
           "device_names", "device_table", "device_from_table", "resolve_gpu", "resolve_network", "network_from_args"]


@dataclass(frozen=True)
class DeviceProfile:
    """An edge device: peak throughput of the unit the model runs on, memory, power, efficiency."""

    name: str
    unit: str  # "cpu" or "gpu": where onnxruntime / TensorRT runs the model on this device
    peak_fp32_gflops: float
    peak_fp16_gflops: float
    peak_int8_gops: float  # dense (no structured sparsity)
    memory_mb: int
    memory_gbps: float
    active_w: float
    idle_w: float
    compute_efficiency: float  # achieved fraction of peak on Conv/Gemm/MatMul
    memory_efficiency: float  # achieved fraction of bandwidth on memory-bound ops
    launch_overhead_ms: float  # per executed op: kernel launch / dispatch
    source: str
    aliases: tuple[str, ...] = ()
    # What the estimate assumes runs the model there: the runtime ("onnxruntime" | "litert") and, for
    # onnxruntime, its execution providers (the efficiency factors above are for these).
    runtime: str = "onnxruntime"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @property
    def runtime_label(self) -> str:
        """"onnxruntime (TensorrtExecutionProvider, CUDAExecutionProvider)" or "litert"."""
        return f"{self.runtime} ({', '.join(self.providers)})" if self.runtime == "onnxruntime" else self.runtime

    def peak_gflops(self, precision: str = "fp32") -> float:
        """Peak GFLOP/s (GOP/s for int8) at `precision`."""
        check_precision(precision)
        return {"fp32": self.peak_fp32_gflops, "fp16": self.peak_fp16_gflops, "int8": self.peak_int8_gops}[
            precision
        ]


@dataclass(frozen=True)
class GpuProfile:
    """A cloud GPU class: peak throughput, memory bandwidth, per-op launch overhead."""

    name: str
    peak_fp32_tflops: float
    peak_fp16_tflops: float  # dense tensor-core throughput
    peak_int8_tops: float  # dense tensor-core throughput
    memory_gb: int
    memory_gbps: float
    compute_efficiency: float
    memory_efficiency: float
    launch_overhead_ms: float
    source: str

    def peak_gflops(self, precision: str = "fp32") -> float:
        """Peak GFLOP/s (GOP/s for int8) at `precision`."""
        check_precision(precision)
        tflops = {"fp32": self.peak_fp32_tflops, "fp16": self.peak_fp16_tflops, "int8": self.peak_int8_tops}
        return tflops[precision] * 1000.0


@dataclass(frozen=True)
class NetworkProfile:
    """A link between edge and cloud."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    tx_nj_per_byte: float  # radio energy per uplink byte; 0.0 when unknown
    source: str

    def __post_init__(self) -> None:
        if self.uplink_mbps <= 0 or self.downlink_mbps <= 0 or self.rtt_ms < 0 or self.tx_nj_per_byte < 0:
            raise ValueError(
                f"network {self.name!r}: expected uplink and downlink > 0 Mbps, rtt >= 0 ms and tx energy >= 0, "
                f"got up={self.uplink_mbps} down={self.downlink_mbps} rtt={self.rtt_ms} tx={self.tx_nj_per_byte}"
            )


# JetPack's onnxruntime-gpu wheel: TensorRT first (engines built on first run, cached), CUDA for what it lacks.
JETSON_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_JETSON_EFF = (
    "Efficiency approximate: TensorRT/onnxruntime-CUDA at batch 1 reach ~15-30% of GPU peak on small CNNs and "
    "~60% of DRAM bandwidth; per-op launch ~20-50 us."
)
_PI_EFF = (
    "Efficiency approximate: the compute peaks below are already LINPACK-class achieved figures (not the "
    "theoretical FMA rate), and onnxruntime (MLAS) Conv/Gemm reaches roughly 80% of them (~25% of the "
    "theoretical peak) and ~50% of effective bandwidth on elementwise ops; per-op dispatch ~10-20 us."
)

DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in (
        DeviceProfile(
            name="jetson-nano", unit="gpu", peak_fp32_gflops=236.0, peak_fp16_gflops=472.0, peak_int8_gops=472.0,
            memory_mb=4096, memory_gbps=25.6, active_w=10.0, idle_w=1.5,
            compute_efficiency=0.3, memory_efficiency=0.6, launch_overhead_ms=0.05,
            providers=JETSON_PROVIDERS,
            source=(
                "NVIDIA Jetson Nano datasheet: 128-core Maxwell GPU, 472 GFLOPS fp16 (fp32 half of that), "
                "4 GB 64-bit LPDDR4 25.6 GB/s, 5 W / 10 W power modes. Maxwell has no int8 dot-product "
                "units, so int8 runs at the fp16 rate. Idle ~1.5 W approximate. " + _JETSON_EFF
            ),
        ),
        DeviceProfile(
            name="jetson-orin-nano", unit="gpu", peak_fp32_gflops=1280.0, peak_fp16_gflops=10000.0,
            peak_int8_gops=20000.0, memory_mb=8192, memory_gbps=68.0, active_w=15.0, idle_w=3.0,
            compute_efficiency=0.2, memory_efficiency=0.6, launch_overhead_ms=0.03,
            providers=JETSON_PROVIDERS,
            aliases=("jetson",),
            source=(
                "NVIDIA Jetson Orin Nano 8GB datasheet: 1024-core Ampere GPU with 32 Tensor Cores at 625 MHz, "
                "40 TOPS int8 sparse (20 dense), 8 GB 128-bit LPDDR5 68 GB/s, 7-15 W. fp32 = 1024 x 2 x "
                "0.625 GHz = 1.28 TFLOPS; fp16 tensor ~10 TFLOPS dense (approximate: half the int8 rate). "
                "Idle ~3 W approximate. " + _JETSON_EFF
            ),
        ),
        DeviceProfile(
            name="jetson-orin-nx", unit="gpu", peak_fp32_gflops=1880.0, peak_fp16_gflops=15000.0,
            peak_int8_gops=30000.0, memory_mb=16384, memory_gbps=102.4, active_w=25.0, idle_w=4.0,
            compute_efficiency=0.2, memory_efficiency=0.6, launch_overhead_ms=0.03,
            providers=JETSON_PROVIDERS,
            source=(
                "NVIDIA Jetson Orin NX 16GB datasheet: 100 TOPS int8 sparse (GPU + 2 DLA), 1024-core Ampere "
                "GPU with 32 Tensor Cores at 918 MHz, 16 GB 128-bit LPDDR5 102.4 GB/s, 10-25 W. GPU-only "
                "figures approximate: fp32 = 1024 x 2 x 0.918 GHz = 1.88 TFLOPS, int8 ~30 TOPS dense, fp16 "
                "~15 TFLOPS dense. Idle ~4 W approximate. " + _JETSON_EFF
            ),
        ),
        DeviceProfile(
            name="jetson-agx-orin", unit="gpu", peak_fp32_gflops=5300.0, peak_fp16_gflops=42500.0,
            peak_int8_gops=85000.0, memory_mb=65536, memory_gbps=204.8, active_w=60.0, idle_w=8.0,
            compute_efficiency=0.2, memory_efficiency=0.6, launch_overhead_ms=0.02,
            providers=JETSON_PROVIDERS,
            source=(
                "NVIDIA Jetson AGX Orin 64GB datasheet: 275 TOPS int8 sparse (GPU + 2 DLA), 2048-core Ampere "
                "GPU with 64 Tensor Cores at 1.3 GHz (170 TOPS sparse int8, 5.3 TFLOPS fp32), 64 GB 256-bit "
                "LPDDR5 204.8 GB/s, 15-60 W. Dense GPU int8 85 TOPS and fp16 ~42.5 TFLOPS (approximate: "
                "half the sparse rate, half again for fp16). Idle ~8 W approximate. " + _JETSON_EFF
            ),
        ),
        DeviceProfile(
            name="rpi4", unit="cpu", peak_fp32_gflops=13.5, peak_fp16_gflops=13.5, peak_int8_gops=27.0,
            memory_mb=4096, memory_gbps=4.0, active_w=6.4, idle_w=2.7,
            compute_efficiency=0.8, memory_efficiency=0.5, launch_overhead_ms=0.02,
            source=(
                "Raspberry Pi 4 Model B: Broadcom BCM2711, 4x Cortex-A72 at 1.5 GHz, ~13.5 GFLOPS fp32 NEON "
                "(LINPACK-class measured peak; theoretical 48), LPDDR4-3200 ~4 GB/s effective. ARMv8.0 has "
                "no fp16 arithmetic (fp16 = fp32 rate) and no dot-product instructions (int8 ~2x fp32, "
                "approximate). Power ~2.7 W idle, ~6.4 W under load (approximate, published measurements). "
                + _PI_EFF
            ),
        ),
        DeviceProfile(
            name="rpi5", unit="cpu", peak_fp32_gflops=30.0, peak_fp16_gflops=60.0, peak_int8_gops=120.0,
            memory_mb=8192, memory_gbps=9.0, active_w=8.0, idle_w=2.7,
            compute_efficiency=0.8, memory_efficiency=0.5, launch_overhead_ms=0.01,
            aliases=("rpi",),
            source=(
                "Raspberry Pi 5: Broadcom BCM2712, 4x Cortex-A76 at 2.4 GHz (theoretical 153.6 GFLOPS fp32: "
                "2x128-bit FMA per core), ~30 GFLOPS fp32 LINPACK-class measured (approximate), LPDDR4X-4267 "
                "32-bit (17 GB/s theoretical, ~9 GB/s effective, approximate). ARMv8.2 fp16 arithmetic "
                "(2x fp32) and SDOT int8 dot product (~4x fp32) - approximate. Power ~2.7 W idle, ~8 W under "
                "load (approximate). " + _PI_EFF
            ),
        ),
    )
}

_GPU_EFF = (
    "Efficiency approximate: onnxruntime CUDA EP at batch 1 reaches ~20% of compute peak on small CNNs and "
    "~60% of HBM/GDDR bandwidth; per-op launch + dispatch ~15 us."
)

GPUS: dict[str, GpuProfile] = {
    g.name: g
    for g in (
        GpuProfile("t4", 8.1, 65.0, 130.0, 16, 320.0, 0.2, 0.6, 0.02,
                   "NVIDIA T4 datasheet: 8.1 TFLOPS fp32, 65 TFLOPS fp16 and 130 TOPS int8 (tensor), 16 GB "
                   "GDDR6 320 GB/s. " + _GPU_EFF),
        GpuProfile("a10", 31.2, 125.0, 250.0, 24, 600.0, 0.2, 0.6, 0.015,
                   "NVIDIA A10 datasheet: 31.2 TFLOPS fp32, 125 TFLOPS fp16 and 250 TOPS int8 dense (tensor), "
                   "24 GB GDDR6 600 GB/s. " + _GPU_EFF),
        GpuProfile("l4", 30.3, 121.0, 242.0, 24, 300.0, 0.2, 0.6, 0.015,
                   "NVIDIA L4 datasheet: 30.3 TFLOPS fp32, 242 TFLOPS fp16 / 485 TOPS int8 with sparsity "
                   "(121 / 242 dense), 24 GB GDDR6 300 GB/s. " + _GPU_EFF),
        GpuProfile("a100", 19.5, 312.0, 624.0, 80, 2039.0, 0.2, 0.6, 0.012,
                   "NVIDIA A100 80GB SXM datasheet: 19.5 TFLOPS fp32, 312 TFLOPS fp16 and 624 TOPS int8 dense "
                   "(tensor), 80 GB HBM2e 2039 GB/s. " + _GPU_EFF),
        GpuProfile("h100", 67.0, 989.0, 1979.0, 80, 3350.0, 0.2, 0.6, 0.01,
                   "NVIDIA H100 SXM datasheet: 67 TFLOPS fp32, 989 TFLOPS fp16 and 1979 TOPS int8 dense "
                   "(tensor; the sheet quotes 2x with sparsity), 80 GB HBM3 3.35 TB/s. " + _GPU_EFF),
        GpuProfile("h200", 67.0, 989.0, 1979.0, 141, 4800.0, 0.2, 0.6, 0.01,
                   "NVIDIA H200 SXM datasheet: same compute as H100 SXM (67 fp32, 989 fp16, 1979 int8 dense), "
                   "141 GB HBM3e 4.8 TB/s. " + _GPU_EFF),
    )
}

_DADS = "Uplink from DADS (Hu et al., INFOCOM 2019), Table I."
_HUANG = "Radio energy: marginal uplink power per Mbps from Huang et al., MobiSys 2012 (LTE/WiFi/3G power model)"

NETWORKS: dict[str, NetworkProfile] = {
    n.name: n
    for n in (
        NetworkProfile("3g", 1.1, 4.0, 100.0, 6952.0,
                       f"{_DADS} Downlink ~4 Mbps and RTT ~100 ms approximate (HSPA). {_HUANG}: 869 mW/Mbps "
                       "= 6952 nJ/byte."),
        NetworkProfile("4g", 5.85, 20.0, 50.0, 3507.0,
                       f"{_DADS} Downlink ~20 Mbps and RTT ~50 ms approximate (LTE field averages). {_HUANG}: "
                       "438 mW/Mbps = 3507 nJ/byte."),
        NetworkProfile("wifi", 18.88, 50.0, 10.0, 2265.0,
                       f"{_DADS} Downlink ~50 Mbps and RTT ~10 ms approximate (802.11n to a nearby "
                       f"server). {_HUANG}: 283 mW/Mbps = 2265 nJ/byte."),
        NetworkProfile("5g", 50.0, 200.0, 20.0, 1000.0,
                       "Approximate 5G sub-6 GHz medians from public drive-test reports (Ookla/Opensignal "
                       "2023: ~150-200 Mbps down, ~20-50 up, 20-30 ms latency); radio energy ~1000 nJ/byte "
                       "approximate (5G NR modems are 2-4x more energy-efficient per bit than LTE)."),
        NetworkProfile("ethernet", 1000.0, 1000.0, 0.5, 4.0,
                       "Gigabit Ethernet (1000BASE-T) line rate on a LAN, RTT ~0.5 ms; ~0.5 W PHY at 1 Gbit/s "
                       "= ~4 nJ/byte (approximate)."),
    )
}


def _aliases() -> dict[str, str]:
    return {alias: d.name for d in DEVICES.values() for alias in d.aliases}


def device_table() -> str:
    """The named devices as a text table: what each estimate assumes (unit, runtime and providers, peaks)."""
    rows = [("device", "aliases", "unit", "runtime (providers)", "fp32 GFLOP/s", "int8 GOP/s", "memory MB")]
    for d in DEVICES.values():
        rows.append((d.name, ",".join(d.aliases) or "-", d.unit, d.runtime_label, f"{d.peak_fp32_gflops:g}",
                     f"{d.peak_int8_gops:g}", str(d.memory_mb)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def device_names() -> list[str]:
    """Valid edge device names, aliases included."""
    return sorted([*DEVICES, *_aliases()])


def device_from_table(name: str) -> DeviceProfile:
    """The edge device named `name` (aliases and case allowed); `partitioning.device_profile.resolve_device`
    also takes the path of a measured profile."""
    key = str(name).strip().lower()
    key = _aliases().get(key, key)
    if key not in DEVICES:
        raise ValueError(
            f"unknown edge device {name!r}: expected one of {', '.join(device_names())} "
            "or the path of a measured device profile (.json)"
        )
    return DEVICES[key]


def resolve_gpu(name: str) -> GpuProfile:
    """The cloud GPU class named `name`."""
    key = str(name).strip().lower()
    if key not in GPUS:
        raise ValueError(
            f"unknown cloud GPU {name!r}: expected one of {', '.join(GPUS)} "
            "('local' means measured on this host and is handled by the caller)"
        )
    return GPUS[key]


def resolve_network(name: str) -> NetworkProfile:
    """The network profile named `name`."""
    key = str(name).strip().lower()
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: expected one of {', '.join(NETWORKS)}")
    return NETWORKS[key]


def network_from_args(
    name: str | None = None,
    uplink_mbps: float | None = None,
    downlink_mbps: float | None = None,
    rtt_ms: float | None = None,
) -> NetworkProfile:
    """A named network with explicit numbers overriding it, or a custom one when no name is given."""
    if name is None:
        if uplink_mbps is None:
            raise ValueError(
                f"network: give a name ({', '.join(NETWORKS)}) or at least uplink_mbps for a custom link"
            )
        down = uplink_mbps if downlink_mbps is None else downlink_mbps
        rtt = 0.0 if rtt_ms is None else rtt_ms
        return NetworkProfile(
            "custom", float(uplink_mbps), float(down), float(rtt), 0.0,
            f"custom link given on the command line: up {uplink_mbps} Mbps, down {down} Mbps"
            f"{'' if downlink_mbps is not None else ' (= uplink, not given)'}, RTT {rtt} ms"
            f"{'' if rtt_ms is not None else ' (not given)'}; radio energy unknown (0)",
        )
    base = resolve_network(name)
    overrides = {
        k: float(v)
        for k, v in (("uplink_mbps", uplink_mbps), ("downlink_mbps", downlink_mbps), ("rtt_ms", rtt_ms))
        if v is not None
    }
    if not overrides:
        return base
    said = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return replace(base, name=f"{base.name}-custom", source=f"{base.name} with {said} given; {base.source}",
                   **overrides)
