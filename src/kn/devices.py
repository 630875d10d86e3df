"""Which device a stage runs its model on, and one GPU per running job on a multi-GPU machine.

Snakemake limits how many GPU jobs run at once (``--resources gpu=N``) but never tells a
local job which GPU to use, so every job would pick ``cuda:0``. Each stage that runs the
model on CUDA therefore claims a GPU slot here: an exclusive, non-blocking ``flock`` on one
lock file per GPU id, held until the process exits (the kernel drops it even when the job is
killed, so a crashed job never leaves a slot taken). The ids come from, in order:

* ``KN_GPU_IDS`` (comma-separated; also how tests fake a device list on a CPU machine),
* ``CUDA_VISIBLE_DEVICES`` when set (the slots are then the visible devices, in order),
* every device torch sees.

Under SLURM (``SLURM_JOB_ID`` set) the scheduler already gave the job its own GPUs and set
``CUDA_VISIBLE_DEVICES``; nothing is claimed and the job uses ``cuda:0`` of what it sees.
Lock files live in ``KN_GPU_LOCK_DIR`` (default: a per-user folder under the temp dir).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GPU_IDS_ENV = "KN_GPU_IDS"
LOCK_DIR_ENV = "KN_GPU_LOCK_DIR"
_HELD: list[IO[str]] = []  # lock files of this process: kept open (and locked) until it exits


class DeviceError(ValueError):
    """The configured device cannot be used; the message says why."""


@dataclass(frozen=True)
class GpuSlot:
    """A claimed GPU: its id (as the machine names it) and its index among the devices torch sees."""

    gpu_id: str
    index: int

    def describe(self) -> str:
        return f"cuda:{self.index} (GPU {self.gpu_id})"


def gpu_ids(visible_count: int | None = None) -> list[str]:
    """The GPU ids jobs share, from KN_GPU_IDS, CUDA_VISIBLE_DEVICES or the device count."""
    for variable in (GPU_IDS_ENV, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(variable)
        if value is not None and value.strip():
            return [part.strip() for part in value.split(",") if part.strip()]
    return [str(k) for k in range(visible_count or 0)]


def lock_dir() -> Path:
    path = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"kn-gpu-locks-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_gpu_slot(ids: list[str], timeout: float = 3600.0, poll: float = 1.0) -> GpuSlot:
    """Lock the first free slot among ``ids`` for the rest of this process; wait while all are taken.

    Snakemake's ``--resources gpu=N`` keeps at most N GPU jobs running, so with N no larger
    than the number of ids a slot is free at once; waiting covers jobs started by hand.
    """
    if not ids:
        raise DeviceError("device=cuda but no GPU id is known (KN_GPU_IDS, CUDA_VISIBLE_DEVICES and torch see none)")
    folder = lock_dir()
    deadline = time.monotonic() + timeout
    while True:
        for index, gpu_id in enumerate(ids):
            handle = open(folder / f"gpu-{gpu_id}.lock", "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _HELD.append(handle)
            return GpuSlot(gpu_id, index)
        if time.monotonic() > deadline:
            raise DeviceError(f"no free GPU among {ids} after {timeout:.0f} s (lock files in {folder})")
        time.sleep(poll)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821 (torch is imported here only when needed)
    """The ``device`` config value as a torch device; a CUDA device gets this job its own GPU slot."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device={name!r}; expected auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if os.environ.get("SLURM_JOB_ID"):
        return torch.device("cuda:0")
    slot = claim_gpu_slot(gpu_ids(torch.cuda.device_count()))
    if slot.index >= torch.cuda.device_count():
        raise DeviceError(f"claimed GPU {slot.gpu_id} is device {slot.index}, but torch sees {torch.cuda.device_count()}")
    return torch.device(f"cuda:{slot.index}")
