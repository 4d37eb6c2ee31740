"""Issue 25 (third audit), cases 5, 7, 8, 9, 13, 14, 15, 16, 19, 20: every file the harness writes stays inside
the run's own folders and is never written through a symlink it did not create; the project's variants come
from the installed package, never from the current directory; every option, environment variable and
claim/lock file is checked by the one rule (one line, exit 2, nothing written).

    python -m pytest tests/test_audit3.py
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from harness import variants as reg
from harness.bench import cells
from harness.bench.cells import PLUGIN_ENV
from harness.bench.executors import check_cpus_per_cell
from harness.bench.measure import LiveBytesTracker
from harness.bench.request import resolve_variants
from harness.bench.store import HOST, claim_cell, live_claim, release_cell, run_dir_lock
from harness.cli import bench as bench_cmd
from harness.cli.main import build_parser, main
from harness.core.config import ConfigError
from harness.loop import distributed
from harness.reporting.files import write_atomic
from harness.reporting.paths import plots_dir_for, plots_root
from harness.reporting.schema import ResultsError
from harness.settings import CPU_MEM_CAP_ENV, DIST_TIMEOUT_ENV
from tests.conftest import harness
from tests.test_cli_outputs import fake_cell
from tests.test_bad_input import BASE, FITS, OWN, USER_BASE, no_work, readme_section, refused  # noqa: F401 -- no_work is a fixture

__all__ = ["no_work"]


def test_a_run_id_longer_than_a_file_name_is_refused_before_results_is_made(no_work: Path, capsys) -> None:  # 16
    refused([*BASE["bench"], "--run-id", "r" * 300], capsys, no_work, "--run-id must be a folder name of at most 255")
    refused([*BASE["sweep"], "--run-id", "é" * 128], capsys, no_work, "got 256 bytes")  # bytes, not characters


@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate"])
def test_one_key_set_twice_to_two_values_is_refused(no_work: Path, capsys, command: str) -> None:  # 20
    refused([*BASE[command], "--set", "inner_steps=2", "--set", "inner_steps=3"], capsys, no_work,
            "--set inner_steps=3 contradicts --set inner_steps=2")


ENV_CASES = [(name, text) for name in (CPU_MEM_CAP_ENV, DIST_TIMEOUT_ENV) for text in ("abc", "-5", "nan", "1e400")]


@pytest.mark.parametrize("name, text", ENV_CASES)
@pytest.mark.parametrize("command", ["run", "bench"])
def test_a_numeric_environment_variable_that_is_not_a_positive_number_is_refused(
        no_work: Path, capsys, monkeypatch, command: str, name: str, text: str) -> None:  # 15
    monkeypatch.setenv(name, text)
    refused(BASE[command], capsys, no_work, f"environment variable {name}={text!r} must be a positive finite number")


@pytest.mark.parametrize("name, text", ENV_CASES)
def test_where_the_variables_are_read_they_are_checked_by_the_same_rule(monkeypatch, name: str, text: str) -> None:
    """A cell's process and every torchrun rank read them too: a ConfigError (one line), not a traceback."""
    monkeypatch.setenv(name, text)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    read = LiveBytesTracker if name == CPU_MEM_CAP_ENV else lambda: distributed.session("cpu").__enter__()
    with pytest.raises(ConfigError, match=f"{name}={text!r} must be a positive finite number"):
        read()


def test_the_numeric_environment_variables_still_work(monkeypatch) -> None:
    monkeypatch.setenv(CPU_MEM_CAP_ENV, "0.5")
    assert LiveBytesTracker().cap_bytes == 512 * 1024
    monkeypatch.setenv(CPU_MEM_CAP_ENV, "")
    assert LiveBytesTracker().cap_bytes is None


@pytest.mark.parametrize("cpus, got", [("nan", "nan"), ("inf", "inf"), ("0", "0.0"), ("-1", "-1.0"),
                                       ("1000000", "1000000.0")])
@pytest.mark.parametrize("command", ["bench", "sweep", "ablate"])
def test_cpus_per_cell_is_checked_before_the_run_folder_is_made_or_ray_starts(
        no_work: Path, capsys, monkeypatch, command: str, cpus: str, got: str) -> None:  # 14
    monkeypatch.setattr("harness.bench.executors.RayExecutor.__init__", no_ray_start)
    refused([*BASE[command], "--executor", "ray", "--cpus-per-cell", cpus], capsys, no_work,
            f"--cpus-per-cell must be a number in (0, {os.cpu_count()}] (this machine's CPUs), got {got}")


@pytest.mark.parametrize("cpus, got", [("nan", "nan"), ("inf", "inf"), ("0", "0.0"), ("-1", "-1.0")])
@pytest.mark.parametrize("command", ["bench", "sweep", "ablate"])
def test_cpus_per_cell_is_checked_with_an_address_too(no_work: Path, capsys, monkeypatch, command: str, cpus: str,
                                                      got: str) -> None:  # 14, with --address
    monkeypatch.setattr("harness.bench.executors.RayExecutor.__init__", no_ray_start)
    refused([*BASE[command], "--executor", "ray", "--address", "127.0.0.1:1", "--cpus-per-cell", cpus], capsys,
            no_work, f"--cpus-per-cell must be a finite number > 0, got {got}")


def no_ray_start(*a: object, **k: object) -> None:
    raise AssertionError("Ray was started before --cpus-per-cell was checked")


def test_a_joined_cluster_may_have_more_cpus_than_this_machine() -> None:
    assert check_cpus_per_cell(1e6, "auto") == 1e6
    with pytest.raises(ConfigError, match=r"--cpus-per-cell must be a finite number > 0, got nan"):
        check_cpus_per_cell(math.nan, "auto")


FIT_CASES = [(["--set", "model.in_dim=5"], "preset 'cpu-bench' with --set model.in_dim=5: the model's forward on a "
                "task's support set (support_x of shape [4, 32, 16], torch.float32) failed: RuntimeError: mat1 and "
                "mat2 shapes cannot be multiplied (128x16 and 5x64)"),
             (["--set", "task.out_dim=3"], "preset 'cpu-bench' with --set task.out_dim=3: the loss on the model's "
                                           "output ([4, 32, 16]) and support_y (shape [4, 32, 3]")]


@pytest.mark.parametrize("argv, words", FIT_CASES)
@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate"])
def test_model_and_task_keywords_that_do_not_fit_are_refused_naming_them_and_the_shapes(
        no_work: Path, capsys, command: str, argv: list[str], words: str) -> None:  # 17
    refused([*BASE[command], *argv], capsys, no_work, words)


@pytest.mark.parametrize("command", ["run", "bench"])
def test_model_and_task_keywords_that_fit_pass_the_check(no_work: Path, capsys, command: str) -> None:
    with pytest.raises(AssertionError, match="the work started"):  # past every check, to the work
        main([*BASE[command], "--set", "model.in_dim=5", "--set", "task.in_dim=5"])


RANKS_CASES = [(["sweep", "--variant", "maml", "--param", "ranks=1,3"],
                "maml on cpu-bench [ranks=3]: ranks=3 is invalid: each rank needs at least one task of the meta-batch "
                "of 2; valid: 1..2"),
               (["sweep", "--variant", "maml", "--param", "meta_batch=1,2", "--set", "ranks=2"],
                "maml on cpu-bench [meta_batch=1,ranks=2]: ranks=2 is invalid"),
               (["bench", "--variants", "maml", "--set", "ranks=3"], "ranks=3 is invalid")]


@pytest.mark.parametrize("argv, words", RANKS_CASES)
def test_ranks_beyond_the_meta_batch_of_any_cell_are_refused_up_front(no_work: Path, capsys, argv: list[str],
                                                                       words: str) -> None:  # 18
    refused([*argv, "--preset", "cpu-bench", "--device", "cpu"], capsys, no_work, words)


NO_DATA = "preset 'omniglot' reads real data: pass --data-root DIR (and --download to fetch it)"
DATA_BASE = {**{c: [a if a != "cpu-bench" else "omniglot" for a in argv] for c, argv in BASE.items()},
             "check": ["check", "--preset", "omniglot", "--device", "cpu", "--model", OWN]}


@pytest.mark.parametrize("extra", [[], ["--download"]])
@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate", "check"])
def test_omniglot_without_a_data_root_is_refused_by_every_command(no_work: Path, capsys, command: str,
                                                                  extra: list[str]) -> None:  # 18
    refused([*DATA_BASE[command], *extra], capsys, no_work, NO_DATA)


@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate"])
def test_a_data_root_for_a_preset_that_generates_its_tasks_is_refused(no_work: Path, capsys, command: str) -> None:
    refused([*BASE[command], "--data-root", "data"], capsys, no_work,
            "--data-root/--download are for real-data presets; preset 'cpu-bench' generates its tasks")


def test_a_data_root_flag_and_its_set_must_agree(no_work: Path, capsys) -> None:
    refused([*DATA_BASE["bench"], "--data-root", "a", "--set", "task.data_root=b"], capsys, no_work,
            "--data-root a contradicts --set task.data_root=b")


def test_bench_takes_a_data_root_for_its_cells_and_keeps_it_out_of_the_run_id(no_work: Path) -> None:
    req = bench_cmd.request_from_args(build_parser().parse_args([*DATA_BASE["bench"], "--variants", "maml",
                                                                 "--data-root", "/data/omniglot"]))
    assert req.run_dir == Path("results/omniglot-cpu")
    assert [c.settings for c in req.cells] == [{"task.data_root": "/data/omniglot"}]


@pytest.fixture
def run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp/out/r``, an existing run folder; measuring a cell fails the test (the refusal must come first)."""
    monkeypatch.setattr("harness.bench.matrix.measure_cell", no_measure)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "r").mkdir(parents=True)
    return tmp_path / "out" / "r"


def no_measure(*a: object, **k: object) -> None:
    raise AssertionError("a cell was measured before the run folder was checked")


def bench_refuses(run_dir: Path, capsys, words: str) -> None:
    code = main([*BASE["bench"], "--variants", "maml", "--set", "width=16", "--out", str(run_dir.parent),
                 "--run-id", run_dir.name, "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (run_dir / "cells.jsonl").exists()


def test_a_lock_file_replaced_by_a_symlink_is_refused_and_its_target_kept(run_folder: Path, capsys) -> None:  # 5
    target = run_folder.parent.parent / "precious.txt"
    target.write_text("keep me")
    (run_folder / ".lock").symlink_to(target)
    bench_refuses(run_folder, capsys, f"{run_folder / '.lock'} is a symbolic link, which this harness did not make")
    assert target.read_text() == "keep me"


def test_a_lock_file_hard_linked_to_another_file_is_refused(run_folder: Path) -> None:
    target = run_folder.parent.parent / "precious.txt"
    target.write_text("keep me")
    os.link(target, run_folder / ".lock")
    with pytest.raises(ResultsError, match="a hard link to another file"):
        with run_dir_lock(run_folder):
            pass
    assert target.read_text() == "keep me"


def test_a_claims_folder_replaced_by_a_symlink_is_refused_and_nothing_written_there(run_folder: Path,
                                                                                    capsys) -> None:  # 7
    elsewhere = run_folder.parent.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.json").write_text('{"pid": 1, "host": "h", "deadline": 0}')
    (run_folder / ".running").symlink_to(elsewhere, target_is_directory=True)
    bench_refuses(run_folder, capsys, f"{run_folder / '.running'} is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine.json"]


def test_a_claims_folder_swapped_for_a_symlink_mid_run_is_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".running").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ResultsError, match="is a symbolic link"):
        claim_cell(tmp_path / "r", "k", 10.0)
    release_cell(tmp_path / "r", "k")  # leaves anything that is not its own claim alone
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("planted", ["plots/r/memory.png", "plots/r/time.png", "r/table.md", "r/summary.csv"])
def test_a_plot_or_table_replaced_by_a_symlink_is_replaced_and_its_target_kept(tmp_path: Path, monkeypatch,
                                                                                planted: str) -> None:  # 6
    monkeypatch.setattr("harness.bench.matrix.measure_cell", fake_cell)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out" / planted
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    assert main(["bench", "--variants", "maml,fo", "--device", "cpu", "--set", "width=16", "--out", "out",
                 "--run-id", "r"]) == 0
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.is_file() and link.stat().st_size > 0
    assert not [p for p in link.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_the_one_writer_replaces_a_link_in_a_folder_given_by_fd_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "f.json").symlink_to(target)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomic(Path("f.json"), b"{}", dir_fd=fd)
    finally:
        os.close(fd)
    assert target.read_text() == "keep me" and (tmp_path / "f.json").read_text() == "{}"

    def broken(fh: object) -> None:
        raise RuntimeError("savefig failed")

    with pytest.raises(RuntimeError, match="savefig failed"):
        write_atomic(tmp_path / "g.png", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "precious.txt"]


MALFORMED_CLAIMS = [
    ('{"pid": "abc", "host": "h", "deadline": 1}', "pid 'abc'"),
    ('{"pid": 1000000000000000000000000000000, "host": "h", "deadline": 1}', "pid 1000000000000000000000000000000"),
    ('{"pid": true, "host": "h", "deadline": 1}', "pid True"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"pid": 1, "host": "h", "deadline": "tomorrow"}', "deadline 'tomorrow'"),
    ('{"pid": 1, "host": "h", "deadline": Infinity}', "deadline inf"),
    ('{"pid": 1, "host": 7, "deadline": 1}', "host 7"),
    ("{not json", "not JSON"),
]


@pytest.mark.parametrize("text, why", MALFORMED_CLAIMS)
def test_a_malformed_claim_is_one_line_exit_2_naming_its_file(run_folder: Path, capsys, text: str,
                                                               why: str) -> None:  # 13
    claim = run_folder / ".running" / "0123456789abcdef0123.json"
    claim.parent.mkdir()
    claim.write_text(text)
    bench_refuses(run_folder, capsys, f"claim file {claim} is malformed ({why})")
    assert claim.read_text() == text


@pytest.mark.parametrize("text, why", MALFORMED_CLAIMS)
def test_a_malformed_claim_found_while_running_is_a_results_error(tmp_path: Path, text: str, why: str) -> None:
    claim_cell(tmp_path, "k", 10.0)
    (claim,) = (tmp_path / ".running").iterdir()
    claim.write_text(text)
    with pytest.raises(ResultsError, match=re.escape(f"({why})")):
        live_claim(tmp_path, "k")
    release_cell(tmp_path, "k")  # not a claim of ours: left alone
    assert claim.read_text() == text


def test_a_well_formed_claim_is_still_read_taken_over_and_released(tmp_path: Path) -> None:
    assert claim_cell(tmp_path, "k", 10.0) is None and live_claim(tmp_path, "k") is None  # ours
    (claim,) = (tmp_path / ".running").iterdir()
    claim.write_text(json.dumps({"pid": os.getppid(), "host": HOST, "deadline": time.time() + 60}))
    assert live_claim(tmp_path, "k")["pid"] == os.getppid()  # another live process's
    release_cell(tmp_path, "k")
    assert claim.exists()  # not ours: left alone
    claim.write_text(json.dumps({"pid": os.getppid(), "host": HOST, "deadline": time.time() - 1}))
    assert claim_cell(tmp_path, "k", 10.0) is None  # stale: taken over
    release_cell(tmp_path, "k")
    assert list((tmp_path / ".running").iterdir()) == []


@pytest.mark.parametrize("argv", [[*BASE["bench"], "--variants", "maml,hihger:maml"],
                                  [*BASE["sweep"][:2], "hihger:maml", *BASE["sweep"][3:]],
                                  [*BASE["bench"], "--variants", ":maml"]])
def test_a_misspelt_peer_is_refused_listing_the_peers(no_work: Path, capsys, argv: list[str]) -> None:  # 19
    refused(argv, capsys, no_work, "; valid peers: higher, torchopt, torch_maml (as peer:variant)")


@pytest.mark.parametrize("command", ["bench", "sweep", "check"])
@pytest.mark.parametrize("plugins", ["nosuchmod", "tests.user_models, nosuchmod"])
def test_a_cell_plugin_module_that_does_not_import_is_refused(no_work: Path, capsys, monkeypatch, command: str,
                                                              plugins: str) -> None:  # 19
    monkeypatch.setenv(PLUGIN_ENV, plugins)
    argv = [*USER_BASE["check"], "--model", OWN, "--tasks", FITS] if command == "check" else BASE[command]
    refused(argv, capsys, no_work, f"{PLUGIN_ENV} names module 'nosuchmod', which cannot be imported "
                                            "(ModuleNotFoundError: No module named 'nosuchmod')")


def test_a_plugin_builder_adds_a_peer_prefix(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "audit3_plugin.py").write_text("from harness.bench.cells import BUILDERS\n"
                                               "BUILDERS['mine'] = lambda peer, variant, exp: exp.learner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGIN_ENV, "audit3_plugin")
    try:
        assert resolve_variants("mine:maml,higher:fo") == ["mine:maml", "higher:fo"]
    finally:
        cells.BUILDERS.pop("mine", None)  # the registration is undone with the test


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_with_an_explicit_out_the_plots_go_under_it_and_two_outs_share_no_figure(
        tmp_path: Path, monkeypatch, command: str) -> None:  # 9
    monkeypatch.setattr("harness.bench.matrix.measure_cell", fake_cell)
    monkeypatch.chdir(tmp_path)
    argv = (["bench", "--variants", "maml,fo"] if command == "bench"
            else ["sweep", "--variant", "maml", "--param", "inner_steps=1,2"])
    for out in ("runs/a", "runs/b"):
        assert main([*argv, "--device", "cpu", "--set", "width=16", "--out", out, "--run-id", "r"]) == 0
        assert any((tmp_path / out / "plots" / "r").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b"]  # no runs/plots/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    rebuilt = tmp_path / "runs" / "a" / "plots" / "r"
    shutil.rmtree(rebuilt)
    assert main(["report", "runs/a/r"]) == 0 and any(rebuilt.glob("*.png"))  # report finds them where bench put them


def test_ablate_with_an_explicit_out_keeps_its_learning_curves_under_it(tmp_path: Path, monkeypatch) -> None:  # 9
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "--preset", "quick", "--variants", "maml", "--meta-steps", "1", "--seeds", "2",
                 "--eval-tasks", "1", "--no-progress", "--jobs", "1", "--run-id", "abl", "--out", "runs/a"]) == 0
    assert (tmp_path / "runs" / "a" / "plots" / "abl" / "learning_curves.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_by_default_results_and_plots_are_the_repository_pair(tmp_path: Path, monkeypatch) -> None:  # 9
    monkeypatch.setattr("harness.bench.matrix.measure_cell", fake_cell)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--variants", "maml", "--device", "cpu", "--set", "width=16", "--run-id", "r"]) == 0
    assert (tmp_path / "results" / "r" / "cells.jsonl").is_file() and any((tmp_path / "plots" / "r").glob("*.png"))
    assert plots_root(None) == Path("plots") and plots_root(Path("runs/a")) == Path("runs/a/plots")
    assert plots_dir_for(Path("results/r")) == Path("plots/r")
    assert plots_dir_for(Path("runs/a/r")) == Path("runs/a/plots/r")


def test_an_explicit_out_decides_the_plots_folder_not_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    """Review: whether --out was given comes from the parser (None or a path), not from comparing it with cwd:
    ``--out results`` given explicitly is a folder named like any other, its plots under it."""
    monkeypatch.setattr("harness.bench.matrix.measure_cell", fake_cell)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--variants", "maml", "--device", "cpu", "--set", "width=16", "--run-id", "r",
                 "--out", "results"]) == 0
    assert any((tmp_path / "results" / "plots" / "r").glob("*.png")) and not (tmp_path / "plots").exists()
    assert plots_root(Path("results")) == Path("results/plots")
    assert plots_root(tmp_path / "results") == tmp_path / "results" / "plots"


def one_rank_of_run(rank: int, port: int, report: str, argv: list[str]) -> None:
    """One of two gloo ranks (spawned): ``harness run ARGV`` as torchrun would start it; its exit code and stderr
    into ``report/rank<r>.json``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HARNESS_DIST_TIMEOUT_S="180")  # generous: a loaded machine
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    Path(report, f"rank{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue()}))


RANK1_DIFFERS = [(["--seed", "1"], "seed (rank 0: 0, rank 1: 1)"),
                 (["--inner-steps", "3"], "inner_steps (rank 0: 2, rank 1: 3)"),
                 (["--set", "task.shots=3"], "task.shots (rank 0: (unset), rank 1: 3)")]


def test_ranks_started_with_different_settings_all_exit_2_naming_the_setting(tmp_path: Path) -> None:  # 21
    """One launch of two ranks, rank 1 differing in three settings at once (a seed, a spec size, a task
    keyword): every one is named with both ranks' values, on both ranks."""
    rank1_args = [a for args, _ in RANK1_DIFFERS for a in args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, report = tmp_path / "out", tmp_path / "report"
    report.mkdir()
    argv = ["run", "--variant", "maml", "--preset", "quick", "--device", "cpu", "--meta-steps", "1", "--out", str(out)]
    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=one_rank_of_run, args=(r, port, str(report), argv + (rank1_args if r else [])))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(300)
    # the ranks end on the named mismatch, not on the collective timeout (180 s): the message shows which
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
    for r in range(2):
        got = json.loads((report / f"rank{r}.json").read_text())
        assert got["code"] == 2 and got["err"].count("\n") == 1 and "Traceback" not in got["err"], got
        assert "the 2 ranks were started with different settings: " in got["err"], got
        for _, named in RANK1_DIFFERS:
            assert named in got["err"], (named, got)
    assert not out.exists()


SHADOW_INIT = "open('shadow-ran', 'w').write('the cwd variants package ran')\n"
SHADOW_PLUGIN = ("open('shadow-ran', 'w').write('the cwd plugin ran')\n"
                 "from harness.variants import Variant\nVARIANT = Variant('evil')\n")


def test_a_variants_folder_in_the_current_directory_is_not_run_nor_registered(tmp_path: Path) -> None:  # 8
    """The one case that needs a real process: ``python -m harness`` puts the current directory first on the path."""
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "__init__.py").write_text(SHADOW_INIT)
    (tmp_path / "variants" / "evil.py").write_text(SHADOW_PLUGIN)
    r = harness("list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()]
    assert names[:2] == ["maml", "fo"] and "evil" not in names and "vmaml" in names
    assert not (tmp_path / "shadow-ran").exists()


def test_the_project_plugins_are_found_by_file_even_after_a_same_named_package_was_imported(
        tmp_path: Path, monkeypatch) -> None:  # 8
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "__init__.py").write_text("")
    (tmp_path / "variants" / "evil.py").write_text("from harness.variants import Variant\nVARIANT = Variant('evil')\n")
    monkeypatch.delitem(sys.modules, "variants", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Path(importlib.import_module("variants").__file__).parent == tmp_path / "variants"  # the shadow, by name
    names = [v.name for v in reg._collect()]
    assert "evil" not in names and "maml" in names
    assert Path(sys.modules["variants"].__file__).parent == reg.PLUGIN_DIR


def test_the_readme_states_every_rule_these_tests_check() -> None:
    section = " ".join(readme_section().split())  # line breaks do not matter
    for words in ("at most 255\nbytes", "`--set` key given twice", "HARNESS_CELL_PLUGINS", "`--cpus-per-cell` must be",
                  CPU_MEM_CAP_ENV, DIST_TIMEOUT_ENV, "`O_NOFOLLOW`", "A claim file that\nis not a JSON object",
                  "`DIR/plots/<run-id>/`", "never from a `variants/` folder in the current directory",
                  "bench --variants hihger:maml", "--cpus-per-cell nan", "--set inner_steps=2 --set inner_steps=3",
                  "checked for fit before\nanything is written", "`sweep --param ranks=1,3`", "needs\n`--data-root DIR`",
                  "ranks started with different settings", "`write_atomic`", "`plots/<run-id>/memory.png` is replaced",
                  "--set model.in_dim=5", "--preset omniglot", "`results` too"):
        assert " ".join(words.split()) in section, words


def test_a_claim_with_our_pid_from_another_host_is_not_ours(tmp_path: Path) -> None:
    """A results folder shared between machines: a claim written by the same pid on another host is that
    host's live claim, not ours (mutation: ``mine`` without the host check measured the cell twice)."""
    assert claim_cell(tmp_path, "k", 10.0) is None  # ours, to get the claim file's name
    (claim,) = (tmp_path / ".running").iterdir()
    other = {"pid": os.getpid(), "host": HOST + "-other", "deadline": time.time() + 600}
    claim.write_text(json.dumps(other))
    assert live_claim(tmp_path, "k")["host"] == HOST + "-other"
    assert claim_cell(tmp_path, "k", 10.0)["host"] == HOST + "-other"  # not taken over
