"""Device, GPU and network profiles: lookup, aliases, overrides and clear errors."""

from __future__ import annotations

import pytest

from partitioning.device_profile import resolve_device
from partitioning.devices import (
    DEVICES,
    GPUS,
    NETWORKS,
    DeviceProfile,
    NetworkProfile,
    device_names,
    network_from_args,
    resolve_gpu,
)


def test_every_required_device_gpu_and_network_is_there() -> None:
    assert {"jetson-nano", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "rpi4", "rpi5"} <= set(DEVICES)
    assert {"t4", "a10", "l4", "a100", "h100", "h200"} <= set(GPUS)
    assert {"3g", "4g", "wifi", "5g", "ethernet"} <= set(NETWORKS)


@pytest.mark.parametrize("profile", [*DEVICES.values(), *GPUS.values()], ids=lambda p: p.name)
def test_profiles_are_sane_and_sourced(profile) -> None:
    assert profile.source.strip()
    assert 0 < profile.compute_efficiency <= 1 and 0 < profile.memory_efficiency <= 1
    assert profile.launch_overhead_ms > 0 and profile.memory_gbps > 0
    for precision in ("fp32", "fp16", "int8"):
        assert profile.peak_gflops(precision) > 0
    assert profile.peak_gflops("int8") >= profile.peak_gflops("fp32")
    if isinstance(profile, DeviceProfile):
        assert profile.active_w > profile.idle_w > 0 and profile.unit in ("cpu", "gpu")


def test_datasheet_figures_from_the_brief() -> None:
    assert DEVICES["jetson-nano"].peak_gflops("fp16") == 472.0
    assert DEVICES["jetson-nano"].memory_gbps == 25.6
    assert DEVICES["jetson-orin-nano"].memory_gbps == 68.0
    assert NETWORKS["3g"].uplink_mbps == 1.1
    assert NETWORKS["4g"].uplink_mbps == 5.85
    assert NETWORKS["wifi"].uplink_mbps == 18.88


def test_aliases_and_case() -> None:
    assert resolve_device("jetson") is DEVICES["jetson-orin-nano"]
    assert resolve_device("rpi") is DEVICES["rpi5"]
    assert resolve_device(" RPi4 ") is DEVICES["rpi4"]
    assert resolve_gpu("H100") is GPUS["h100"]
    assert "jetson" in device_names() and "rpi" in device_names()


def test_unknown_device_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown edge device 'pi9'.*jetson-orin-nano.*rpi5"):
        resolve_device("pi9")


def test_unknown_gpu_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown cloud GPU 'v100'.*t4.*h200"):
        resolve_gpu("v100")


def test_missing_profile_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        resolve_device(str(tmp_path / "nope.json"))


def test_named_network_is_returned_unchanged() -> None:
    assert network_from_args("wifi") is NETWORKS["wifi"]


def test_explicit_numbers_override_a_named_network() -> None:
    net = network_from_args("4g", uplink_mbps=10.0, rtt_ms=5.0)
    assert (net.uplink_mbps, net.downlink_mbps, net.rtt_ms) == (10.0, NETWORKS["4g"].downlink_mbps, 5.0)
    assert net.tx_nj_per_byte == NETWORKS["4g"].tx_nj_per_byte
    assert "uplink_mbps=10.0" in net.source


def test_custom_network_without_a_name() -> None:
    net = network_from_args(uplink_mbps=2.0, downlink_mbps=8.0, rtt_ms=30.0)
    assert isinstance(net, NetworkProfile)
    assert (net.name, net.uplink_mbps, net.downlink_mbps, net.rtt_ms) == ("custom", 2.0, 8.0, 30.0)
    only_up = network_from_args(uplink_mbps=3.0)
    assert only_up.downlink_mbps == 3.0 and only_up.rtt_ms == 0.0


def test_network_errors() -> None:
    with pytest.raises(ValueError, match="give a name"):
        network_from_args()
    with pytest.raises(ValueError, match="unknown network 'lora'.*wifi"):
        network_from_args("lora")
    with pytest.raises(ValueError, match="uplink and downlink > 0"):
        network_from_args(uplink_mbps=0.0)
