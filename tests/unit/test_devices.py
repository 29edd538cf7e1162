"""check_device: the CPU path for real, the CUDA paths against a monkeypatched CTranslate2 runtime."""

from __future__ import annotations

import ctranslate2
import pytest

from services.common.devices import check_device
from services.common.errors import FailedPrecondition

# What CTranslate2 reports for a recent NVIDIA GPU (compute capability 8.x and above).
AMPERE_TYPES = {"float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16"}
# And for an older one without bfloat16 (compute capability 7.x).
VOLTA_TYPES = {"float32", "float16", "int8", "int8_float32", "int8_float16"}


@pytest.fixture
def fake_cuda(monkeypatch):
    """Installs fake CUDA devices; ``fake_cuda([types of device 0, types of device 1, ...])``."""
    calls: list[tuple[str, int]] = []

    def install(devices: list[set[str]]) -> list[tuple[str, int]]:
        def supported(device: str, device_index: int = 0) -> set[str]:
            calls.append((device, device_index))
            assert device == "cuda"
            return devices[device_index]

        monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: len(devices))
        monkeypatch.setattr(ctranslate2, "get_supported_compute_types", supported)
        return calls

    return install


@pytest.mark.parametrize("compute_type", ["int8", "float32", "float16", "int8_float16", "default"])
def test_cpu_is_always_accepted_without_asking_for_cuda(monkeypatch, compute_type):
    def no_cuda_query():
        raise AssertionError("the CPU path must not query CUDA")

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", no_cuda_query)
    check_device("cpu", 0, compute_type)
    check_device("CPU", (0, 1), compute_type)


def test_cpu_with_the_real_runtime():
    check_device("cpu", 0, "int8")


def test_cuda_device_and_type_present(fake_cuda):
    calls = fake_cuda([AMPERE_TYPES])
    check_device("cuda", 0, "float16")
    check_device("cuda", (0,), "int8_float16")
    assert calls == [("cuda", 0), ("cuda", 0)]


def test_cuda_without_any_device(fake_cuda):
    fake_cuda([])
    with pytest.raises(FailedPrecondition) as info:
        check_device("cuda", 0, "float16")
    message = str(info.value)
    assert "CUDA device index 0 is not available" in message
    assert "found no CUDA device" in message
    assert "device to cpu" in message


def test_cuda_index_past_the_devices_found(fake_cuda):
    fake_cuda([AMPERE_TYPES, AMPERE_TYPES])
    check_device("cuda", (0, 1), "float16")
    with pytest.raises(FailedPrecondition) as info:
        check_device("cuda", (0, 1, 3), "float16")
    assert "CUDA device index 3 is not available" in str(info.value)
    assert "2 CUDA device(s), indexes 0 to 1" in str(info.value)


def test_unsupported_compute_type_lists_the_supported_ones(fake_cuda):
    fake_cuda([AMPERE_TYPES, VOLTA_TYPES])
    check_device("cuda", 0, "bfloat16")
    with pytest.raises(FailedPrecondition) as info:
        check_device("cuda", (0, 1), "int8_bfloat16")
    message = str(info.value)
    assert "'int8_bfloat16' is not supported on CUDA device 1" in message
    assert "float16, float32, int8, int8_float16, int8_float32" in message


@pytest.mark.parametrize("compute_type", ["auto", "default"])
def test_runtime_resolved_compute_types_need_only_the_device(fake_cuda, compute_type):
    calls = fake_cuda([VOLTA_TYPES])
    check_device("cuda", 0, compute_type)
    assert calls == []
    with pytest.raises(FailedPrecondition, match="index 1 is not available"):
        check_device("cuda", 1, compute_type)


def test_auto_falls_back_to_cpu_without_cuda_and_checks_cuda_when_present(fake_cuda):
    fake_cuda([])
    check_device("auto", 0, "float16")
    fake_cuda([VOLTA_TYPES])
    with pytest.raises(FailedPrecondition, match="not supported on CUDA device 0"):
        check_device("auto", 0, "bfloat16")


@pytest.mark.parametrize(
    ("device", "index", "match"),
    [
        ("rocm", 0, "device 'rocm' is not supported"),
        ("cuda", (), "device_index is empty"),
        ("cuda", -1, "device_index -1 is negative"),
    ],
)
def test_malformed_configuration(fake_cuda, device, index, match):
    fake_cuda([AMPERE_TYPES])
    with pytest.raises(ValueError, match=match):
        check_device(device, index, "float16")
