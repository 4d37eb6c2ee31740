"""The device and precision rules: which devices exist here, which precisions a device trains in
(``run``, ``diagnose`` and each entry of ``bench --amp``).  Try ``python -m harness run --amp fp16`` on a CPU."""
from __future__ import annotations

import torch

from harness.core.config import AMP_MODES, ConfigError
from harness.settings.bounds import DEVICES, DTYPES
from harness.settings.keys import dedupe

__all__ = ["check_amp", "check_device", "check_memory_snapshot", "check_precision", "parse_amps", "valid_amps"]


def check_device(device: str) -> None:
    """An unknown device, or CUDA without CUDA: a ConfigError naming the valid choices."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu")


def valid_amps(device: str, *, fp16_on_cpu: bool = False) -> list[str]:
    """The precisions ``device`` can train in: fp16 needs CUDA (GradScaler) unless a CPU GradScaler is asked
    for; bf16 needs a CPU or a GPU that supports it."""
    if device == "cuda":
        return ["off", *(["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []), "fp16"]
    return ["off", "bf16", *(["fp16"] if fp16_on_cpu else [])]


def check_amp(amp: str, device: str, *, fp16_on_cpu: bool = False) -> None:
    """The one precision check (``run``, ``diagnose``, and each entry of ``bench --amp``)."""
    valid = valid_amps(device, fp16_on_cpu=fp16_on_cpu)
    choices = f"valid choices on {device}: {', '.join(valid)}"
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r} in --amp; {choices}")
    if amp not in valid:
        why = "fp16 needs a CUDA device (GradScaler)" if amp == "fp16" else f"{amp} is not supported by this GPU"
        raise ConfigError(f"--amp {amp} is not available on {device} ({why}); {choices}")


def parse_amps(text: str, device: str) -> list[str]:
    """``off,bf16[,fp16]`` -> precisions, each once, valid for ``device`` (ConfigError naming the valid ones)."""
    names = dedupe([a.strip() for a in str(text).split(",") if a.strip()])
    if not names:
        raise ConfigError(f"empty --amp; valid choices on {device}: {', '.join(valid_amps(device))}")
    for a in names:
        check_amp(a, device)
    return names


def check_precision(device: str, dtype: str, amp: str) -> None:
    """The device, the weights' dtype and the autocast precision of one run, together (``RunSpec``)."""
    check_device(device)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    check_amp(amp, device)
    if amp != "off" and dtype != "float32":
        raise ConfigError(f"--amp {amp} runs float32 weights under autocast; use --dtype float32")


def check_memory_snapshot(device: str) -> None:
    """``--memory-snapshot`` records the CUDA allocator's history: CUDA only."""
    if device != "cuda":
        raise ConfigError("--memory-snapshot needs CUDA (it records the CUDA allocator history); "
                          f"this run is on {device}")
