"""Capability detection: the real no-NVML path on this GPU-less machine, the GPU path through a small
fake NVML module, and tag parsing."""

from __future__ import annotations

import logging
import platform
from types import SimpleNamespace

import pytest

from dtf.workers.capabilities import detect, parse_tags


def test_a_machine_without_nvml_reports_cpu_only_and_says_so_once(caplog):
    with caplog.at_level(logging.INFO, logger="dtf.worker.capabilities"):
        caps = detect({"zone": "eu"})
    assert caps.hardware == ["cpu"] and caps.gpus == []
    assert caps.cores >= 1 and caps.memory_gb > 0
    assert caps.python == platform.python_version() and caps.platform.startswith(platform.system().lower())
    assert caps.tags == {"zone": "eu"}
    gpu_lines = [r for r in caplog.records if r.name == "dtf.worker.capabilities"]
    assert len(gpu_lines) == 1 and gpu_lines[0].levelno == logging.INFO and "no GPU" in gpu_lines[0].message


class FakeNvml:
    """A FAKE stand-in for the pynvml module: this machine has no NVIDIA GPU, so the GPU path can only
    be exercised against an object with the same function names and return shapes as pynvml's."""

    def __init__(self, devices):
        self.devices = devices
        self.shut_down = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetName(self, handle):
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle["memory"], free=0, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return handle["cc"]


def test_a_machine_with_gpus_reports_cuda_with_names_memory_and_compute_capability():
    """Uses FakeNvml (a fake NVML: there is no GPU on the test machine)."""
    fake = FakeNvml([
        {"name": "NVIDIA GeForce RTX 3090", "memory": 24 * 2**30, "cc": (8, 6)},
        {"name": b"Tesla T4", "memory": 16 * 2**30, "cc": (7, 5)},
    ])
    caps = detect({}, nvml=fake)
    assert caps.hardware == ["cpu", "cuda"]
    assert [(g.name, g.memory_gb, g.cuda_compute) for g in caps.gpus] == [
        ("NVIDIA GeForce RTX 3090", 24.0, 8.6), ("Tesla T4", 16.0, 7.5),
    ]
    assert fake.shut_down


def test_nvml_that_fails_to_start_means_no_gpu_and_no_exception():
    """Uses a fake NVML whose init fails, as a machine with a broken driver would."""
    broken = FakeNvml([])

    def fail():
        raise OSError("driver/library version mismatch")

    broken.nvmlInit = fail
    assert detect({}, nvml=broken).gpus == []


def test_tags_parse_from_key_value_pairs():
    assert parse_tags(["gpu=a100", "zone = eu", "expr=a=b"]) == {"gpu": "a100", "zone": "eu", "expr": "a=b"}
    assert parse_tags([]) == {}


@pytest.mark.parametrize("bad, why", [
    (["novalue"], "key=value"), (["=x"], "key=value"), (["a=1", "a=2"], "twice"), (["my key=1"], "whitespace"),
])
def test_malformed_tags_are_refused_with_a_clear_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_tags(bad)
