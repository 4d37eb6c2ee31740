"""``python -m harness bench``: every registered variant on the device's default preset, each cell isolated.

GPU: preset ``seed``; CPU: ``cpu-bench``.  Writes ``results/<run-id>/cells.jsonl``,
``summary.csv``, ``table.md`` and ``plots/<run-id>/*.png``.  Re-running the same
run-id resumes (finished cells are skipped) unless ``--force``.

``--peers`` adds ``higher:<v>`` and ``torchopt:<v>`` for every canonical variant
``v`` in the matrix (those a peer cannot express, or all of them when the
``peers`` extra is absent, are recorded ``unsupported`` with the reason).
``--amp off,bf16[,fp16]`` makes precision a dimension: each variant runs at each
precision (fp16 needs CUDA; checked up front, exit 2).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import distributed
from harness.bench.cells import (LAUNCH_SETTINGS, MODEL_SETTINGS, SPEC_SETTINGS, VARIANT_SETTINGS, Cell,
                                  MeasureOptions, parse_value)
from harness.bench.executors import add_executor_arguments, executor_spec, open_executor
from harness.bench.matrix import run_matrix
from harness.cli.run import add_spec_arguments, default_device
from harness.core.config import ConfigError
from harness.train import DEVICES
from harness.zoo.presets import get_preset

DEFAULT_RESULTS = Path("results")
DEFAULT_PRESET = {"cuda": "seed", "cpu": "cpu-bench"}


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p, variant_required=False)
    p.add_argument("--run-id", default=None, help="results/<run-id>/ (default <preset>-<device>[-settings]); reruns resume")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results root (default results/); plots go to <out>/../plots/")
    p.add_argument("--force", action="store_true", help="re-run cells that already have a result")
    p.add_argument("--timeout", type=float, default=300.0, help="per-cell time limit in seconds (default 300)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up meta-steps per cell (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-steps per cell (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: torch's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"cell setting: {', '.join(SPEC_SETTINGS + MODEL_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS)},"
                        " "
                        "model.<kw> or task.<kw>")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-nvml", action="store_true", help="no NVML sampler thread (CUDA)")
    p.add_argument("--cpu-mem-cap", action="append", default=[], metavar="VARIANT=MIB", help=argparse.SUPPRESS)
    add_executor_arguments(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run every registered variant on the device's default preset (isolated cells)")
    add_matrix_arguments(p)
    p.add_argument("--variants", default=None, help="comma-separated variants (default: all registered); "
                                                    "peer cells as peer:variant, e.g. higher:maml")
    p.add_argument("--peers", action="store_true",
                   help="add higher:<v> and torchopt:<v> for every canonical variant v in the matrix "
                        "(unsupported ones are listed with the reason)")
    p.set_defaults(handler=run)


def parse_settings(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip()
        ok = key in SPEC_SETTINGS + MODEL_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS or key.startswith(("model.", "task."))
        if not sep or not key or not ok:
            raise ConfigError(f"bad --set {item!r}; accepted KEY=VALUE with KEY one of "
                              f"{', '.join(SPEC_SETTINGS + MODEL_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS)}, model.<kw>, task.<kw>")
        out[key] = parse_value(val.strip())
    return out


def parse_caps(items: list[str]) -> dict[str, float]:
    caps = {}
    for item in items:
        v, sep, mib = item.partition("=")
        try:
            caps[v.strip()] = float(mib)
        except ValueError:
            raise ConfigError(f"bad --cpu-mem-cap {item!r}; expected VARIANT=MIB") from None
        if not sep:
            raise ConfigError(f"bad --cpu-mem-cap {item!r}; expected VARIANT=MIB")
    return caps


def resolve_variants(text: str | None) -> list[str]:
    from harness.variants import get_variant, registry

    if not text:
        return list(registry())
    names = [v.strip() for v in text.split(",") if v.strip()]
    for n in names:
        get_variant(n.split(":", 1)[-1])  # ConfigError listing the valid names
    return names


def parse_amps(text: str, device: str) -> list[str]:
    """``off,bf16[,fp16]`` -> precisions, validated for ``device`` (ConfigError naming the valid choices)."""
    import torch

    from harness.core.config import AMP_MODES

    if device == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        valid = ["off", *(["bf16"] if bf16 else []), "fp16"]
    else:
        valid = ["off", "bf16"]
    names = [a.strip() for a in str(text).split(",") if a.strip()]
    if not names:
        raise ConfigError(f"empty --amp; valid choices on {device}: {', '.join(valid)}")
    for a in names:
        if a not in AMP_MODES:
            raise ConfigError(f"unknown precision {a!r} in --amp; valid choices on {device}: {', '.join(valid)}")
        if a not in valid:
            why = "fp16 needs a CUDA device (GradScaler)" if a == "fp16" else f"{a} is not supported by this device"
            raise ConfigError(f"--amp {a} is not available on {device} ({why}); valid choices on {device}: "
                              f"{', '.join(valid)}")
    return list(dict.fromkeys(names))


def add_peer_cells(variants: list[str]) -> list[str]:
    """``variants`` plus ``<peer>:<v>`` for every canonical ``v`` among them, and for any other ``v`` a peer
    can express (not duplicated)."""
    from harness.studies.peers import PEERS, supports
    from harness.variants import CANONICAL, get_variant

    out = list(variants)
    for v in variants:
        if v in CANONICAL:
            out += [f"{p}:{v}" for p in PEERS if f"{p}:{v}" not in out]
        elif ":" not in v:  # beyond the canonical eight, only cells a peer can express (torch_maml:sckpt)
            out += [f"{p}:{v}" for p in PEERS if f"{p}:{v}" not in out and supports(p, get_variant(v))[0]]
    return out


def matrix_common(args: argparse.Namespace, multi_amp: bool = False) -> tuple[str, str, dict[str, Any], MeasureOptions]:
    device = args.device or default_device()
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu")
    preset = args.preset or DEFAULT_PRESET[device]
    get_preset(preset)
    settings = parse_settings(args.set)
    if args.inner_steps is not None:
        settings["inner_steps"] = args.inner_steps
    if args.meta_batch is not None:
        settings["meta_batch"] = args.meta_batch
    if "ranks" in settings:  # every rank needs a task: 1..meta-batch (exit 2 before any cell runs)
        settings["ranks"] = distributed.check_ranks(settings["ranks"],
                                                    int(settings.get("meta_batch", get_preset(preset).meta_batch)))
    amps = parse_amps(getattr(args, "amp", None) or "off", device)
    if len(amps) > 1 and not multi_amp:
        raise ConfigError(f"--amp takes one precision here, got {args.amp!r} (bench takes a list)")
    args.amps = amps
    if amps != ["off"]:
        settings["amp"] = ",".join(amps)
    if args.repeats is None:
        args.repeats = 5 if device == "cuda" else 3
    if args.timeout <= 0 or args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--timeout must be > 0, --repeats >= 1, --warmup >= 0")
    opts = MeasureOptions(warmup=args.warmup, repeats=args.repeats, timeout_s=args.timeout,
                          nvml=not args.no_nvml, threads=args.threads)
    return device, preset, settings, opts


def default_run_id(preset: str, device: str, settings: dict[str, Any]) -> str:
    suffix = "".join(f"-{k.replace('.', '_')}{str(v).replace(',', '+')}" for k, v in sorted(settings.items()))
    return f"{preset}-{device}{suffix}"


def run(args: argparse.Namespace) -> int:
    from harness.reporting import tables as report

    device, preset, settings, opts = matrix_common(args, multi_amp=True)
    variants = resolve_variants(args.variants)
    if args.peers:
        variants = add_peer_cells(variants)
    caps = parse_caps(args.cpu_mem_cap)
    run_id = args.run_id or default_run_id(preset, device, settings) + ("-peers" if args.peers else "")
    run_dir = args.out / run_id
    base = {k: v for k, v in settings.items() if k != "amp"}
    cells = [Cell(v, preset, device, args.dtype, {**base, **({"amp": a} if a != "off" else {})}, args.seed)
             for a in args.amps for v in variants]
    with open_executor(executor_spec(args)) as executor:
        t0 = time.perf_counter()
        rows = run_matrix(cells, run_dir, lambda c: replace(opts, cpu_mem_cap_mib=caps.get(c.variant)),
                          force=args.force, executor=executor)
    out = report.build(run_dir, plots=not args.no_plots)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"bench {run_id}: {len(rows)} cells ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"  wrote {run_dir / 'cells.jsonl'}, {out['summary']}, {out['table']}"
          + (f", {len(out['plots'])} plots in {out['plots'][0].parent}" if out["plots"] else ""))
    return 0
