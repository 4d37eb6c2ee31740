"""Where a number came from: machine, software and commit, attached to every result."""
from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML on this machine
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    dev = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available()
    # dirty = uncommitted changes to the code; results/ and plots/ are what a run writes
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results", ":!plots")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(dev if dev is not None and dev.type == "cuda" else 0) if cuda else None,
        "driver": gpu_driver() if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["REPO", "gpu_driver", "environment"]
