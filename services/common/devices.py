"""Checks a stage's configured device against what the CTranslate2 runtime reports, before loading a model.

``device``, ``device_index`` and ``compute_type`` are configuration: nothing here infers them from a GPU's
name. The checks ask the runtime what it has (``ctranslate2.get_cuda_device_count()``) and what each device
supports (``ctranslate2.get_supported_compute_types("cuda", index)``), so a misconfigured server fails at
start-up with a message naming the fix instead of failing inside the first request.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import FailedPrecondition

# CTranslate2 resolves these itself on any device: "default" keeps the model's saved type (converted where
# the device lacks it) and "auto" picks the fastest type the device supports.
_RESOLVED_BY_RUNTIME = frozenset({"default", "auto"})


def _indexes(device_index: int | Sequence[int]) -> tuple[int, ...]:
    indexes = (device_index,) if isinstance(device_index, int) else tuple(device_index)
    if not indexes:
        raise ValueError("device_index is empty: give at least one CUDA device index, e.g. 0")
    negative = [i for i in indexes if i < 0]
    if negative:
        raise ValueError(f"device_index {negative[0]} is negative: CUDA device indexes start at 0")
    return indexes


def check_device(device: str, device_index: int | Sequence[int], compute_type: str) -> None:
    """Fails fast when the configured device or compute type is not available here.

    ``cpu`` is always accepted (CTranslate2 falls back to a CPU-supported type by itself). For ``cuda``
    every index in ``device_index`` must exist and support ``compute_type``. ``auto`` is checked like
    ``cuda`` when a CUDA device exists and accepted otherwise (the runtime then runs on the CPU).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``, as faster-whisper and CTranslate2 take it.
        device_index: One CUDA device index or several (one model replica per index). Indexes count the
            devices visible to this process: inside a container that reserves one GPU it is 0, whatever
            the host numbers it.
        compute_type: A CTranslate2 compute type (``"float16"``, ``"int8_float16"``, ``"int8"``, ...),
            or ``"default"``/``"auto"``.

    Raises:
        ValueError: ``device`` is not cpu, cuda or auto, or ``device_index`` is empty or negative.
        FailedPrecondition: A configured CUDA device is missing (the message gives the index and how many
            devices were found), or it does not support ``compute_type`` (the message lists what it does
            support).
    """
    device = device.strip().lower()
    if device == "cpu":
        return
    if device not in ("cuda", "auto"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or auto")
    indexes = _indexes(device_index)

    import ctranslate2

    count = ctranslate2.get_cuda_device_count()
    if device == "auto" and count == 0:
        return
    missing = [i for i in indexes if i >= count]
    if missing:
        found = "no CUDA device" if count == 0 else f"{count} CUDA device(s), indexes 0 to {count - 1}"
        raise FailedPrecondition(
            f"CUDA device index {missing[0]} is not available: CTranslate2 found {found}. Check the NVIDIA "
            "driver (nvidia-smi), the container's GPU reservation and CUDA_VISIBLE_DEVICES, or set the "
            "device index to one that exists (or device to cpu)."
        )
    if compute_type in _RESOLVED_BY_RUNTIME:
        return
    for index in indexes:
        supported = sorted(ctranslate2.get_supported_compute_types("cuda", index))
        if compute_type not in supported:
            raise FailedPrecondition(
                f"compute type {compute_type!r} is not supported on CUDA device {index}; it supports "
                f"{', '.join(supported)}. Set the compute type to one of these, or to auto."
            )
