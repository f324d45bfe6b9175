"""What a provider machine has: CPUs and memory through psutil, GPUs through NVML."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import psutil

from .sizes import format_bytes, parse_memory

logger = logging.getLogger(__name__)


@dataclass
class Capacity:
    """What an agent offers to the federation."""

    cpus: float
    memory: int
    gpus: list[dict] = field(default_factory=list)  # {"index", "model", "memory"}

    def describe(self) -> str:
        gpus = ", ".join(f"{g['index']}: {g['model']}" for g in self.gpus) or "none"
        return f"{self.cpus:g} CPUs, {format_bytes(self.memory)} memory, GPUs: {gpus}"


FAKE_GPUS_ENV = "PARALLEX_FAKE_GPUS"


def detect_gpus() -> list[dict]:
    """The machine's NVIDIA GPUs through NVML; empty when there is no driver or no GPU.

    Runs for real only on a GPU machine; CI machines have no NVIDIA driver, so NVML fails to
    initialise and the machine offers no GPUs. For tests on machines without GPUs,
    PARALLEX_FAKE_GPUS may hold a JSON list of {"index", "model", "memory"}: the agent then
    offers those and pins CUDA_VISIBLE_DEVICES as it would for real ones (nothing runs on them).
    """
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        logger.warning("%s is set: offering fake GPUs for testing, not real ones", FAKE_GPUS_ENV)
        return [{"index": int(g["index"]), "model": str(g["model"]), "memory": int(g["memory"])}
                for g in json.loads(fake)]
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("NVML unavailable (%s): offering no GPUs", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            gpus.append({"index": index, "model": name, "memory": memory})
        return gpus
    finally:
        pynvml.nvmlShutdown()


def detect() -> Capacity:
    """All of the machine."""
    return Capacity(
        cpus=float(psutil.cpu_count(logical=True) or 1),
        memory=int(psutil.virtual_memory().total),
        gpus=detect_gpus(),
    )


def parse_gpu_list(value: str | None, detected: list[dict]) -> list[dict]:
    """Which GPUs to offer: None/"all" = every detected GPU, "none" = none, "0,2" = those indices.

    Raises ValueError naming the indices the machine lacks.
    """
    if value is None or value.strip().lower() == "all":
        return list(detected)
    if value.strip().lower() in {"", "none"}:
        return []
    try:
        wanted = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--gpus {value!r} is not a list of GPU indices like '0,1'") from exc
    by_index = {g["index"]: g for g in detected}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        have = ", ".join(str(i) for i in sorted(by_index)) or "none"
        raise ValueError(f"--gpus names GPUs {missing} that this machine lacks (it has: {have})")
    return [by_index[i] for i in wanted]


def offer(cpus: float | None = None, memory: str | int | None = None,
          gpus: str | None = None, detected: Capacity | None = None) -> Capacity:
    """The capacity to offer: the machine's, capped by the flags. Raises ValueError on bad flags."""
    machine = detected or detect()
    if cpus is not None and (not math.isfinite(cpus) or cpus < 1 or cpus != int(cpus)):
        raise ValueError(f"--cpus must be a whole number of cores, at least 1; got {cpus:g}")
    if cpus is not None and cpus > machine.cpus:
        raise ValueError(f"--cpus {cpus:g} is more than this machine has ({machine.cpus:g})")
    mem = machine.memory
    if memory is not None:
        mem = parse_memory(memory)
        if mem > machine.memory:
            raise ValueError(f"--memory {format_bytes(mem)} is more than this machine has "
                             f"({format_bytes(machine.memory)})")
    return Capacity(cpus=int(cpus if cpus is not None else machine.cpus), memory=mem,
                    gpus=parse_gpu_list(gpus, machine.gpus))
