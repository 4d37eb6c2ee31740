"""Claims: ``bench --peers`` adds higher:<v>/torchopt:<v> for the canonical variants, listing the cells a peer
cannot express (or cannot import) as ``unsupported`` with the reason; the report puts ours and the peers side
by side with ratios against the best peer (lowest-memory ok peer cell of the same order and LR setting) and
our best second-order variant against the best second-order peer; ``bench --amp off,bf16`` makes precision a
dimension, the report gains a precision table with ratios against fp32 and the fp32-reference agreement;
an --amp the device cannot run is one line, exit 2."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from harness.bench import cells as C
from harness.reporting import tables as report
from harness.bench.cells import Cell, base_row
from harness.bench.child import measure_cell_inline
from harness.bench.matrix import measure_cell
from harness.bench.request import add_peer_cells
from harness.reporting.files import read_cells, write_jsonl
from harness.variants import CANONICAL, get_variant
from tests.conftest import FAST, TINY, cli


def row(variant: str, mem: float | None, ms: float | None = 10.0, status: str = "ok", amp: str = "off",
        agreement: dict | None = None, message: str | None = None) -> dict:
    settings = {"width": 16, **({"amp": amp} if amp != "off" else {})}
    r = base_row(Cell(variant, "cpu-bench", settings=settings)).to_dict()  # as the file holds it
    r.update(status=status, flags=get_variant(variant.split(":")[-1]).flags, env={}, message=message)
    if status == "ok":
        r.update(memory={"cpu_peak_alloc_mib": mem}, time={"median_ms": ms, "iqr_ms": 0.1, "min_ms": ms, "count": 3},
                 agreement=agreement or {"w_rel_err": 0.0, "w_cosine": 1.0, "lr_rel_err": None, "lr_cosine": None})
    return r


def test_peer_cells_for_every_canonical_variant() -> None:
    names = add_peer_cells(list(CANONICAL) + ["sckpt_lr"])
    for v in CANONICAL:
        assert f"higher:{v}" in names and f"torchopt:{v}" in names
    assert "higher:sckpt_lr" not in names and len(names) == len(set(names)) == 9 + 24
    assert add_peer_cells(["sckpt", "vmaml"]) == ["sckpt", "vmaml", "torch_maml:sckpt"]


def test_bench_peers_lists_unsupported_cells_with_reasons(tmp_path: Path, capsys) -> None:
    """The driver in this process (the cells in their own): bench's fresh-process runs are test_user_code's and
    test_cells_runtime's."""
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    r = cli(capsys, "bench", "--device", "cpu", "--peers", "--variants", "ckpt_fo", *sets, "--warmup", "0",
            "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "results"), "--run-id", "p",
            "--no-plots")
    assert r.returncode == 0, r.stderr
    rows = {x.variant: x for x in read_cells(tmp_path / "results" / "p")}
    assert list(rows) == ["ckpt_fo", "higher:ckpt_fo", "torchopt:ckpt_fo", "torch_maml:ckpt_fo"]
    assert rows["ckpt_fo"].status == "ok"
    for peer in ("higher", "torchopt"):
        x = rows[f"{peer}:ckpt_fo"]
        assert x.status == "unsupported" and x.flags["first_order"]
        assert "no gradient checkpointing" in x.message or "pip install '.[peers]'" in x.message
    md = (tmp_path / "results" / "p" / "table.md").read_text()
    assert "| higher:ckpt_fo |" in md and "## Ours and the peers side by side" in md and "none supported" in md


def test_peer_cells_without_the_extra_are_unsupported_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.peers as P

    monkeypatch.delenv(C.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(P, "available", lambda peer: (False, f"{peer} is not importable (ModuleNotFoundError); "
                                                            "pip install '.[peers]'"))
    for v in ("maml", "ckpt_lr"):  # expressible or not: not installed is the reason
        r = measure_cell(Cell(f"torchopt:{v}", "cpu-bench", settings=TINY), FAST)
        assert r.status == "unsupported" and "pip install '.[peers]'" in r.message, r.message


def test_ratio_against_the_best_peer(tmp_path: Path) -> None:
    rs = [row("maml", 4.0, 20.0), row("ckpt", 2.0, 30.0), row("fo", 1.5, 8.0), row("lr", 4.4, 22.0),
          row("ckpt_lr", 2.2, 33.0),
          row("higher:maml", 3.0, 10.0), row("torchopt:maml", 2.5, 16.0),
          row("higher:fo", 1.0, 9.0), row("torchopt:fo", 1.0, 6.0),
          row("higher:lr", 5.5, 11.0), row("torchopt:lr", None, status="unsupported", message="no learnable inner LR"),
          row("higher:ckpt", None, status="unsupported", message="no gradient checkpointing")]
    write_jsonl(tmp_path / "results" / "r" / "cells.jsonl", rs)
    out = report.build(tmp_path / "results" / "r")
    by = {f["variant"]: f for f in csv.DictReader(out["summary"].open())}
    # second order, fixed LR: torchopt:maml has the lowest memory (2.5 < 3.0), though higher:maml is faster
    assert by["maml"]["best_peer"] == by["ckpt"]["best_peer"] == "torchopt:maml"
    assert float(by["ckpt"]["mem_vs_best_peer"]) == pytest.approx(2.0 / 2.5)
    assert float(by["ckpt"]["time_vs_best_peer"]) == pytest.approx(30.0 / 16.0)
    assert float(by["maml"]["mem_vs_best_peer"]) == pytest.approx(4.0 / 2.5)
    # first order: a memory tie is broken by time -> torchopt:fo
    assert by["fo"]["best_peer"] == "torchopt:fo" and float(by["fo"]["time_vs_best_peer"]) == pytest.approx(8 / 6)
    # learned LR: only higher:lr is supported (unsupported cells never win)
    assert by["ckpt_lr"]["best_peer"] == "higher:lr"
    assert float(by["ckpt_lr"]["mem_vs_best_peer"]) == pytest.approx(2.2 / 5.5)
    assert by["higher:maml"]["mem_vs_best_peer"] == ""  # ratios are for our cells
    md = out["table"].read_text()
    assert "**Best peer**" in md and "lowest peak memory" in md and "no learnable inner LR" in md
    # our best second-order (ckpt, 2.0) vs the best second-order peer of any LR setting (torchopt:maml, 2.5)
    assert "`ckpt` 2 MiB vs `torchopt:maml` 2.5 MiB = **0.800x** memory" in md
    assert "peers.png" in [p.name for p in out["plots"]]
    assert "precision.png" not in [p.name for p in out["plots"]] and "## Precision" not in md


def test_precision_table_ratios(tmp_path: Path) -> None:
    bf = {"w_rel_err": 0.0, "w_cosine": 1.0, "lr_rel_err": 0.0, "lr_cosine": 1.0, "fp32_w_rel_err": 5e-3,
          "fp32_w_cosine": 0.99998, "fp32_lr_rel_err": 6e-4, "fp32_lr_cosine": 0.9999}
    rs = [row("maml", 4.0, 20.0), row("lr", 5.0, 25.0, agreement={"w_rel_err": 0.0, "w_cosine": 1.0,
                                                                    "lr_rel_err": 0.0, "lr_cosine": 1.0}),
          row("maml", 3.0, 30.0, amp="bf16", agreement=dict(bf)), row("lr", 4.0, 20.0, amp="bf16", agreement=dict(bf)),
          row("fo", None, amp="bf16", status="error", message="boom")]
    write_jsonl(tmp_path / "results" / "a" / "cells.jsonl", rs)
    out = report.build(tmp_path / "results" / "a")
    flat = {(f["variant"], f["amp"]): f for f in out["flat"]}
    assert flat[("maml", "bf16")]["mem_vs_fp32"] == pytest.approx(0.75)
    assert flat[("maml", "bf16")]["time_vs_fp32"] == pytest.approx(1.5)
    assert flat[("lr", "bf16")]["mem_vs_fp32"] == pytest.approx(0.8)
    assert flat[("maml", "off")]["mem_vs_fp32"] == pytest.approx(1.0)
    assert flat[("fo", "bf16")]["mem_vs_fp32"] is None
    assert flat[("lr", "bf16")]["fp32_lr_rel_err"] == 6e-4
    md = out["table"].read_text()
    sec = md.split("## Precision", 1)[1]
    assert "| `maml` | bf16 | ok | 3 | 0.750x | 30 | 1.500x | 0.005 | 0.99998 |" in sec
    assert "| `lr` | off | ok | 5 | 1.000x | 25 | 1.000x | 0 | 1 | 0 | 1 |" in sec
    assert sec.index("| `maml` | off") < sec.index("| `maml` | bf16") < sec.index("| `lr` | off")
    assert "precision.png" in [p.name for p in out["plots"]]


def test_bf16_cell_records_the_fp32_reference_agreement() -> None:
    r = measure_cell_inline(Cell("lr_fo", "cpu-bench", settings={**TINY, "amp": "bf16", "inner_steps": 1}), FAST)
    assert r.status == "ok", r.message
    a = r.agreement
    assert r.amp == "bf16" and a["w_rel_err"] == 0.0
    assert 0 < a["fp32_w_rel_err"] < 0.1 and a["fp32_w_cosine"] > 0.99 and a["fp32_lr_rel_err"] is not None


def test_bf16_peer_cell_records_the_fp32_reference_agreement() -> None:
    pytest.importorskip("torchopt", reason="torchopt not installed: pip install '.[peers]'")
    r = measure_cell_inline(Cell("torchopt:fo", "cpu-bench", settings={**TINY, "amp": "bf16", "inner_steps": 1}), FAST)
    assert r.status == "ok", r.message
    assert r.agreement["w_rel_err"] == 0.0 and 0 < r.agreement["fp32_w_rel_err"] < 0.1


def test_bad_amp_for_the_device_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = cli(capsys, "bench", "--device", "cpu", "--amp", "off,fp16", "--variants", "maml", "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "--amp fp16 is not available on cpu" in err and "valid choices on cpu: off, bf16" in err, err
    assert len(err.splitlines()) == 1 and not list(tmp_path.iterdir())  # validated before anything is written


@pytest.mark.parametrize("amp, needle", [("fp8", "unknown precision 'fp8'"), (",", "empty --amp"),
                                         ("fp16", "fp16 needs a CUDA device")])
def test_parse_amps_names_the_valid_choices(amp: str, needle: str) -> None:
    from harness.settings import parse_amps
    from harness.core.config import ConfigError

    with pytest.raises(ConfigError, match="valid choices on cpu: off, bf16") as exc:
        parse_amps(amp, "cpu")
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert parse_amps("off, bf16,off", "cpu") == ["off", "bf16"]
