"""What this worker offers: cores, memory, platform, Python, NVIDIA GPUs (through NVML) and user tags.

`detect` never raises: a machine without NVML (no driver, no GPU, no `pynvml`) simply reports no GPU
and says so in one info line. `parse_tags` turns the CLI's repeated `--tag key=value` into a dict.
Memory is reported in GiB (2**30 bytes), rounded to 0.1.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from types import ModuleType
from typing import Any

import psutil

from dtf.events import Capabilities, Gpu

log = logging.getLogger("dtf.worker.capabilities")

GIB = 2**30


def detect(tags: dict[str, str] | None = None, *, nvml: ModuleType | Any | None = None) -> Capabilities:
    """This machine's capabilities. `nvml` replaces the `pynvml` module (tests pass a fake one)."""
    gpus = detect_gpus(nvml)
    return Capabilities(
        hardware=["cpu", "cuda"] if gpus else ["cpu"],
        cores=psutil.cpu_count(logical=True) or 1,
        memory_gb=round(psutil.virtual_memory().total / GIB, 1),
        platform=f"{platform.system().lower()}-{platform.machine()}",
        python=platform.python_version(),
        gpus=gpus,
        tags=dict(tags or {}),
    )


def detect_gpus(nvml: ModuleType | Any | None = None) -> list[Gpu]:
    """NVIDIA GPUs seen by NVML; [] (and one info line) when NVML is missing or reports none."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            log.info("no GPU: the NVML bindings (nvidia-ml-py) are not importable (%s)", exc)
            return []
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError subclasses, OSError from a broken driver
        log.info("no GPU: NVML is not available on this machine (%s)", exc)
        return []
    try:
        gpus = [_gpu(nvml, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        if not gpus:
            log.info("no GPU: NVML reports no devices")
    except Exception as exc:  # noqa: BLE001 - any NVML failure means: no usable GPU
        log.info("no GPU: NVML failed while listing devices (%s)", exc)
        gpus = []
    finally:
        with contextlib.suppress(Exception):  # a half-working NVML must not break registration
            nvml.nvmlShutdown()
    return gpus


def _gpu(nvml: Any, handle: Any) -> Gpu:
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # older bindings return bytes
        name = name.decode(errors="replace")
    memory_gb = round(nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        compute: float | None = float(f"{major}.{minor}")
    except Exception:  # noqa: BLE001 - not every device/driver answers; the GPU is still usable
        compute = None
    return Gpu(name=str(name), memory_gb=memory_gb, cuda_compute=compute)


def parse_tags(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["gpu=a100", "zone=eu"]` -> `{"gpu": "a100", "zone": "eu"}`; ValueError names the bad item."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"tag {item!r} must look like key=value")
        if any(ch.isspace() for ch in key):
            raise ValueError(f"tag key {key!r} must not contain whitespace")
        if key in tags:
            raise ValueError(f"tag {key!r} is given twice")
        tags[key] = value.strip()
    return tags
