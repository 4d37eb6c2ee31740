"""Claims (issue 13, input side): every option of run, bench, sweep and ablate is checked up front by one
set of rules -- the same value is refused by every command that takes it, with one line and exit 2,
before anything runs or is written; output folders are tried before the work; duplicates collapse;
exit codes mean one thing across commands; the README's list is the one the tests check."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from harness.bench import cells as C
from harness.bench import matrix as M
from harness.bench.cells import Cell
from harness.bench.request import MatrixRequest
from harness.cli import args as A
from harness.cli import bench as bench_cmd
from harness.cli import sweep as sweep_cmd
from harness.cli.main import build_parser, main
from harness.settings import SEED_MAX, SETTING_KEYS, parse_settings, split_settings
from harness.loop.spec import Experiment, RunSpec
from harness.reporting.schema import CellRow
from tests.conftest import REPO, TINY, cli, harness

BASE = {  # each command on the same preset, so one bad value means the same thing everywhere
    "run": ["run", "--variant", "maml", "--preset", "cpu-bench", "--device", "cpu"],
    "bench": ["bench", "--preset", "cpu-bench", "--device", "cpu"],
    "sweep": ["sweep", "--variant", "maml", "--param", "width=8,16", "--preset", "cpu-bench", "--device", "cpu"],
    "ablate": ["ablate", "--preset", "cpu-bench", "--device", "cpu"],
}
BAD_EVERYWHERE = [  # (argv, words the one-line error must contain)
    (["--inner-steps", "-1"], "--inner-steps"),
    (["--inner-steps", "1000000000"], "--allow-huge"),
    (["--meta-batch", "0"], "--meta-batch"),
    (["--meta-batch", str(10 ** 21)], "--meta-batch"),
    (["--dtype", "bogus"], "valid dtypes"),
    (["--threads", "-1"], "--threads"),
    (["--set", "width=abc"], "--set width must be an integer"),
    (["--set", "inner_steps=-1"], "--set inner_steps"),
    (["--set", "meta_batch=1e21"], "--set meta_batch must be an integer"),
    (["--set", "task.bogus=1"], "takes no 'bogus'"),
    (["--set", "nonsense=1"], "accepted: inner_steps, meta_batch"),
    (["--preset", ""], "--preset"),
    (["--device", ""], "--device"),
    (["--device", "tpu"], "valid devices"),
    (["--out", ""], "--out"),
]
SEEDED = [(["--seed", "1e23"], "--seed"), (["--seed", str(10 ** 23)], "--seed must be in 0..2**62")]
MATRIX_ONLY = [(["--timeout", "nan"], "--timeout"), (["--timeout", "inf"], "--timeout"),
               (["--timeout", "-1"], "--timeout"), (["--variants", ""], "--variants"),
               (["--run-id", "../escaped"], "--run-id"), (["--run-id", "a/b"], "--run-id"),
               (["--repeats", "0"], "--repeats")]
CASES = ([(cmd, a, w) for cmd in BASE for a, w in BAD_EVERYWHERE]
         + [(cmd, a, w) for cmd in ("run", "bench", "sweep") for a, w in SEEDED]
         + [(cmd, a, w) for cmd in ("bench", "sweep") for a, w in MATRIX_ONLY if cmd == "bench" or a[0] != "--variants"]
         + [("sweep", ["--param", "meta_batch=1e21"], "--param meta_batch must be an integer"),
            ("sweep", ["--param", "width=0"], "--param width"),
            ("ablate", ["--eval-tasks", str(10 ** 12)], "--eval-tasks"),
            ("ablate", ["--variants", ""], "--variants"), ("ablate", ["--run-id", "../escaped"], "--run-id"),
            ("run", ["--meta-steps", "1000000000"], "--meta-steps")]
         + [(cmd, [*variant, "--set", setting], words) for cmd, variant in (("bench", ["--variants", "ckpt"]),
                                                                            ("sweep", ["--variant", "ckpt"]))
            for setting, words in (("vmap_chunk=2", "vmap_chunk=2 needs vectorize"),
                                   ("vectorize=1", "vectorize cannot be combined with layer_ckpt"))])

# issue 21: the user's --model / --tasks / --ckpt, refused up front by every command (tests/user_models.py)
OWN, FITS = "tests.user_models:make_stack", "tests.user_models:regression"
USER_BAD = [
    (["--model", "tests/user_models.py"], "expected pkg.module:NAME or path/to/file.py:NAME"),
    (["--model", "tests.user_model_unimportable:make"],
     "cannot import module 'tests.user_model_unimportable': ModuleNotFoundError: No module named"),
    (["--model", "tests.user_models:nope"], "has no attribute 'nope'"),
    (["--model", "tests.user_models:raising_factory"], "raising_factory() raised ValueError: width must be even"),
    (["--model", "tests.user_models:not_a_module"], "not_a_module() returned int, not a torch.nn.Module"),
    (["--tasks", "tests.user_models:raising_sampler"], "raised RuntimeError: the data folder is missing"),
    (["--tasks", "tests.user_models:tuple_sampler"], "returned tuple; expected a list of 1 harness.Task"),
    (["--tasks", "tests.user_models:empty_sampler"], "returned an empty list"),
    (["--tasks", "tests.user_models:wrong_items_sampler"], "item 0 is dict, not a harness.Task"),
    (["--model", OWN], "preset 'cpu-bench''s tasks: the model's forward on a task's support set"),
    (["--model", OWN, "--tasks", "tests.user_models:wide_sampler"], "mat1 and mat2 shapes cannot be multiplied"),
    (["--model", OWN, "--tasks", FITS, "--set", "model.bogus=1"], "takes no 'bogus'; accepted: model.width, model.depth"),
    (["--tasks", FITS, "--set", "task.tokens=4"], "takes no keywords"),
    (["--ckpt", "nothing.*"], "--ckpt 'nothing.*' matches no submodule of ResMLP"),
    (["--model", OWN, "--tasks", FITS, "--ckpt", "blocks.*"], "--ckpt 'blocks.*' matches no submodule of Stack"),
]
USER_BASE = {**BASE, "sweep": ["sweep", "--variant", "maml", "--param", "inner_steps=1,2", "--preset", "cpu-bench",
                               "--device", "cpu"],
             "check": ["check", "--preset", "cpu-bench", "--device", "cpu"]}
CHECK_BAD = [  # check needs --model (the preset gives the tasks without --tasks); the rest as every command
    (["--tasks", FITS], "check needs --model SPEC"),
    (["--model", "tests.user_models:raising_factory", "--tasks", FITS], "raised ValueError: width must be even"),
    (["--model", OWN, "--tasks", "tests.user_models:empty_sampler"], "returned an empty list"),
    (["--model", OWN, "--tasks", "tests.user_models:wide_sampler"], "mat1 and mat2 shapes cannot be multiplied"),
    (["--model", OWN, "--tasks", FITS, "--ckpt", "nothing.*"], "--ckpt 'nothing.*' matches no submodule of Stack"),
    (["--model", OWN, "--tasks", FITS, "--set", "model.bogus=1"], "takes no 'bogus'"),
    (["--model", OWN, "--tasks", FITS, "--fd-directions", "-1"], "--fd-directions must be in 0..100"),
    (["--model", OWN, "--tasks", FITS, "--run-id", "../escaped"], "--run-id"),
]
USER_CASES = ([(cmd, a, w) for cmd in BASE for a, w in USER_BAD]
              + [("check", a, w) for a, w in CHECK_BAD])


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Any command that starts its work fails the test at once; the current directory is an empty folder."""
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the work started: the bad input was not refused up front")

    for target in ("harness.cli.run.run_single", "harness.cli.bench.run_request", "harness.cli.sweep.run_request",
                   "harness.cli.check.run_check",
                   "harness.cli.ablate.run_ablation", "harness.cli.diagnose.run_diagnosis", "harness.cli.report.build",
                   "harness.cli.scaling.run_scaling"):
        monkeypatch.setattr(target, refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv: list[str], capsys: pytest.CaptureFixture, where: Path, words: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in where.rglob("*")) == [], "something was written"


@pytest.mark.parametrize("command, argv, words", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_a_bad_value_is_refused_by_every_command_before_anything_runs(no_work: Path, capsys, command, argv,
                                                                       words) -> None:
    refused([*BASE[command], *argv], capsys, no_work, words)


@pytest.mark.parametrize("command, argv, words", USER_CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_a_bad_user_model_tasks_or_ckpt_is_refused_by_every_command_before_anything_runs(no_work: Path, capsys,
                                                                                          command, argv, words) -> None:
    refused([*USER_BASE[command], *argv], capsys, no_work, words)


def test_a_broken_user_factory_is_one_line_exit_2_in_a_fresh_process(tmp_path: Path) -> None:
    """The canary: as a user runs it, a relative file path; no traceback, nothing written."""
    out = harness("run", "--variant", "maml", "--model", "tests/user_models.py:not_a_module", "--out", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "user_models.py:not_a_module: not_a_module() returned int, not a torch.nn.Module" in out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_a_model_keyword_value_the_model_refuses_is_one_line_exit_2_and_nothing_written(tmp_path, capsys) -> None:
    refused(["run", "--variant", "maml", "--preset", "conv4", "--device", "cpu", "--set", "model.norm=bogus",
             "--out", str(tmp_path / "out")], capsys, tmp_path, "model.norm must be one of batch, group, none")


def test_a_seed_too_large_is_one_line_exit_2_not_an_overflow_traceback(tmp_path: Path, capsys) -> None:
    """In this process (run's fresh-process canary for bad input is the broken user factory above)."""
    out = cli(capsys, "run", "--variant", "maml", "--seed", "100000000000000000000000", "--out", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--seed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_the_largest_valid_seed_builds_a_cell_and_one_more_is_refused() -> None:
    Experiment(RunSpec("maml", seed=SEED_MAX))  # seeds seed and seed + 1 without an OverflowError
    with pytest.raises(ValueError, match="--seed"):
        RunSpec("maml", seed=SEED_MAX + 1)


def test_allow_huge_lifts_the_typo_limit_and_only_it(no_work: Path, capsys) -> None:
    refused([*BASE["run"], "--inner-steps", "2000"], capsys, no_work, "--allow-huge")
    from harness.cli.run import spec_from_args

    spec = spec_from_args(build_parser().parse_args([*BASE["run"], "--inner-steps", "2000", "--allow-huge"]))
    assert spec.inner_steps == 2000
    refused([*BASE["run"], "--inner-steps", "1000000000", "--allow-huge"], capsys, no_work, "--inner-steps")


# -- output folders -------------------------------------------------------------
def out_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    return [("run", [*BASE["run"], "--out"]), ("bench", [*BASE["bench"], "--out"]),
            ("sweep", [*BASE["sweep"], "--out"]), ("ablate", [*BASE["ablate"], "--out"]),
            ("diagnose", ["diagnose", "--out"]), ("scaling", ["scaling", "--out"]),
            ("check", ["check", "--model", OWN, "--tasks", FITS, "--device", "cpu", "--out"])]


@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate", "diagnose", "scaling", "check"])
@pytest.mark.parametrize("kind", ["a file", "below a file", "unwritable (/proc)"])
def test_an_unusable_out_folder_is_exit_2_before_the_work(no_work: Path, capsys, command: str, kind: str) -> None:
    blocker = no_work / "results.txt"
    blocker.write_text("not a folder\n")
    out = {"a file": str(blocker), "below a file": str(blocker / "sub"), "unwritable (/proc)": "/proc/harness"}[kind]
    argv = dict(out_cases(no_work))[command]
    code = main([*argv, out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out" in err, err
    assert sorted(p.name for p in no_work.rglob("*")) == ["results.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0o555 folder; the /proc case covers root")
def test_a_read_only_out_folder_is_exit_2(no_work: Path, capsys) -> None:
    ro = no_work / "ro"
    ro.mkdir(mode=0o555)
    refused([*BASE["bench"], "--out", str(ro)], capsys, ro, "--out")


def test_the_writability_probe_really_tries_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not os.access (root passes it for a 0o555 folder): a file created and removed at once."""
    with pytest.raises(A.UsageError, match="cannot write"):
        A.check_out_dir(Path("/proc/x"))
    assert A.check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # nothing created, the probe removed


def test_report_checks_the_plots_folder_before_rewriting_the_tables(no_work: Path, capsys,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = no_work / "results" / "r"
    run.mkdir(parents=True)
    row = {**C.base_row(Cell("maml", "cpu-bench")).to_dict(), "status": "ok", "env": {}}
    (run / "cells.jsonl").write_text(json.dumps(row) + "\n")
    (no_work / "results" / "plots").write_text("a file where the plots folder goes\n")  # --out DIR: DIR/plots/
    code = main(["report", "r", "--out", str(no_work / "results")])
    assert code == 2 and "plots" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["cells.jsonl"]


# -- one --set parser, one list of keys; duplicates collapse ---------------------
def request(argv: list[str]) -> MatrixRequest:
    return {"bench": bench_cmd, "sweep": sweep_cmd}[argv[0]].request_from_args(build_parser().parse_args(argv))


def test_bench_accepts_every_key_a_cells_run_spec_accepts(tmp_path: Path) -> None:
    req = request([*BASE["bench"], "--variants", "lr", "--set", "step_ckpt=1", "--set", "amp=bf16",
                   "--set", "width=16", "--set", "task.tokens=4", "--out", str(tmp_path)])
    (cell,) = req.cells
    assert cell.settings == {"step_ckpt": 1, "amp": "bf16", "width": 16, "task.tokens": 4}
    spec = cell.run_spec()
    assert spec.amp == "bf16" and spec.settings.spec == {"amp": "bf16"}
    assert spec.settings.model == {"width": 16} and spec.settings.task == {"tokens": 4}
    assert spec.settings.variant == {"step_ckpt": 1} and spec.variant_obj.step_ckpt == 1
    every = [f"{k}={'step' if k == 'step_rebuild' else '1MiB' if k == 'memory_budget' else 1}" for k in SETTING_KEYS
             if k != "amp"]
    assert set(split_settings(parse_settings(every, "cpu-bench")).spec) == {"inner_steps", "meta_batch"}
    with pytest.raises(ValueError, match="segment, step"):
        parse_settings(["step_rebuild=1"], "cpu-bench")


@pytest.mark.parametrize("key", ["nonsense", "model.", "task.", "amp.x", "step-ckpt"])
def test_the_parser_and_the_cells_refuse_the_same_keys(key: str) -> None:
    with pytest.raises(ValueError):
        parse_settings([f"{key}=1"], "cpu-bench")
    with pytest.raises(ValueError):
        Cell("maml", "cpu-bench", settings={key: 1}).run_spec()


def test_duplicate_variants_and_values_are_one_cell_each(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path)]
    assert [c.variant for c in request([*BASE["bench"], "--variants", "maml,maml,fo", *out]).cells] == ["maml", "fo"]
    sweep = request(["sweep", "--variant", "maml,maml", "--param", "inner_steps=1,1,2", "--device", "cpu", *out])
    assert [(c.variant, c.settings["inner_steps"]) for c in sweep.cells] == [("maml", 1), ("maml", 2)]
    from harness.cli.ablate import spec_from_args

    assert spec_from_args(build_parser().parse_args(["ablate", "--variants", "maml,maml"])).variants == ("maml",)
    assert not any(tmp_path.iterdir())


# -- exit codes -----------------------------------------------------------------
@pytest.mark.parametrize("status, code", [("ok", 0), ("unsupported", 0), ("diverged", 1), ("timeout", 1),
                                          ("error", 1), ("oom", 1), ("killed", 1)])
@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_the_exit_code_says_whether_every_cell_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      command: str, status: str, code: int) -> None:
    def fake(cell: Cell, opts: C.MeasureOptions, executor: object = None) -> CellRow:
        return replace(C.base_row(cell), status="ok" if cell.variant == "fo" or cell.settings.get("width") == 8
                       else status, env={})

    monkeypatch.setattr(M, "measure_cell", fake)
    sets = [a for k, v in TINY.items() if k != "width" for a in ("--set", f"{k}={v}")]
    argv = [*BASE[command], *sets, "--out", str(tmp_path), "--run-id", "r", "--no-plots"]
    assert main([*argv, "--variants", "fo,maml"] if command == "bench" else argv) == code


def test_an_interrupt_is_130(no_work: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def interrupted(*a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("harness.cli.bench.run_request", interrupted)
    assert main([*BASE["bench"], "--no-plots"]) == A.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Bad input and exit codes", 1)[1].split("\n## ", 1)[0]


def test_the_readme_exit_codes_are_the_ones_the_commands_use() -> None:
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme_section(), re.M))
    codes = {A.EXIT_OK, A.EXIT_FAILED, A.EXIT_USAGE, A.EXIT_INTERRUPTED, 128 + signal.SIGTERM}
    assert {int(k) for k in table} == codes == {0, 1, 2, 130, 143}
    assert "unsupported" in table["0"] and "diverged" in table["1"] and "regression" in table["1"]
    assert "nothing" in table["2"]


def test_every_refused_example_in_the_readme_is_refused(no_work: Path, capsys) -> None:
    block = readme_section().split("```console", 1)[1].split("```", 1)[0]
    examples = [line.split("python -m harness ", 1)[1] for line in block.splitlines() if "python -m harness" in line]
    assert len(examples) >= 10
    for ex in examples:
        code = main(shlex.split(ex))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, (ex, err)
    assert sorted(p.name for p in no_work.rglob("*")) == []
