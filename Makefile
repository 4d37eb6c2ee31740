# Two commands set everything up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-torch-compat bench bench-cpu bench-micro install clean regress baseline results horizon horizon-a horizon-b

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,peers,cluster]'  # no fallback: CI must compare against the peers or fail
	touch $(STAMP)

install: $(STAMP)

# The suite on every core (pytest-xdist), the tests that take minutes apart: `make test` is what a
# contributor runs; CI (.ci/run) runs `make test` and `make test-slow`.
PYTEST := $(PY) -m pytest -n auto --dist worksteal
test: $(STAMP)
	$(PYTEST) -m "not slow"
	$(MAKE) --no-print-directory regress

test-slow: $(STAMP)
	$(PYTEST) -m slow

# torch 2.4-2.13 route a model's checkpoints through other hooks than 2.14 (harness/core/torch_routing.py; the H200
# image has 2.11): the routing's tests on torch $(OLD_TORCH)'s CPU wheel, in a venv of its own that reads .venv's other
# packages.  Where that wheel cannot be installed it says so and skips (CI runs it: .ci/run).
OLD_TORCH ?= 2.13.0
COMPAT := build/venv-torch-$(OLD_TORCH)
test-torch-compat: $(STAMP)
	@test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	@if ! $(COMPAT)/bin/python -m pip install -q --no-deps "torch==$(OLD_TORCH)+cpu" 2>/dev/null; then \
		echo "test-torch-compat: SKIPPED, torch==$(OLD_TORCH)+cpu cannot be installed here"; exit 0; fi; \
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$($(COMPAT)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_harness_venv.pth" && \
	$(COMPAT)/bin/python -c 'import torch; assert torch.__version__.startswith("$(OLD_TORCH)"), torch.__version__' && \
	$(COMPAT)/bin/python -m pytest -n auto --dist worksteal -p no:cacheprovider tests/test_recompute.py \
		tests/test_user_code.py tests/test_zoo_oracle.py

# CI memory/gradient regression: every registered variant on a tiny cpu-bench configuration,
# each cell isolated, compared against the committed CPU baseline (results/baseline).
REGRESS_MATRIX := --device cpu --preset cpu-bench --set width=16 --set depth=2 --set task.sequences=2 \
	--set task.tokens=8 --warmup 0 --repeats 1 --pairs 1 --threads 1 --no-plots
regress: $(STAMP)
	$(PY) -m harness bench $(REGRESS_MATRIX) --out build/regress --run-id new --force
	$(PY) -m harness compare results/baseline build/regress/new --fail mem:5% --fail grad:1e-6

# Regenerate the committed baseline (after an intended memory change); commit results/baseline.
baseline: $(STAMP)
	$(PY) -m harness bench $(REGRESS_MATRIX) --out results --run-id baseline --force

bench: $(STAMP)
	$(PY) -m harness bench --peers

# The harness's own cost (issue 24): start-up of list/run against `import torch`, and the per-cell overhead of a
# bench with cells forked from the cell server and started fresh, with the load; commit from a clean tree.
overhead: $(STAMP)
	$(PY) tests/benchmarks/startup_figures.py results/overhead-cpu

# The per-variant meta-step micro-benchmarks (pytest-benchmark, tests/benchmarks), skipped by `make test`.
bench-micro: $(STAMP)
	HARNESS_BENCH_MICRO=1 $(PY) -m pytest tests/benchmarks --benchmark-only

# Regenerate every committed CPU result from this commit, one command after another (about an hour on
# 2 cores), then the README's and docs' generated tables.  Commit from a clean tree: rows record git_dirty.
# The timing-sensitive runs come first; cpu-bench-peers-load is `make bench` again with one CPU-bound
# process beside it, the check that the paired ratios hold under load (docs/measurement.md).
HOG := $(PY) -c 'while True: pass'
results: $(STAMP)
	$(MAKE) --no-print-directory baseline
	$(PY) -m harness bench --device cpu --peers --run-id cpu-bench-peers --force
	$(HOG) & hog=$$!; $(PY) -m harness bench --device cpu --peers --run-id cpu-bench-peers-load --force; rc=$$?; kill $$hog; exit $$rc
	$(PY) -m harness bench --device cpu --amp off,bf16 --run-id cpu-bench-amp --force
	$(PY) -m harness bench --device cpu --preset sinusoid --meta-batch 25 --variants maml,fo,lr,lr_fo,vmaml,vfo,vlr,vlr_fo \
		--peers --repeats 7 --run-id sinusoid-mb25 --force
	$(PY) -m harness bench --device cpu --preset conv4 --set model.norm=group --variants \
		maml,fo,vmaml,vfo,higher:maml,torchopt:maml,torch_maml:maml,higher:fo,torchopt:fo \
		--repeats 5 --pairs 11 --timeout 900 --run-id conv4-gn --force
	for K in 8 32; do $(PY) -m harness bench --device cpu --preset cpu-bench --inner-steps $$K \
		--variants maml,sckpt,torch_maml:maml,torch_maml:sckpt --repeats 5 --pairs 11 --timeout 900 \
		--run-id sckpt-k$$K --force || exit 1; done
	$(PY) -m harness scaling --ranks 2 --pairs 7 --run-id scaling-cpu
	$(PY) -m harness sweep --device cpu --preset cpu-bench --variant lr,ckpt_lr,sckpt_lr,ckpt_sckpt_lr \
		--param inner_steps=1,2,4,8,16 --run-id sweep-steps-cpu --repeats 3 --force
	$(PY) -m harness sweep --device cpu --preset cpu-bench --variant lr,ckpt_lr,sckpt_lr,ckpt_sckpt_lr \
		--param depth=2,4,8,16 --inner-steps 4 --run-id sweep-depth-cpu --repeats 3 --force
	$(PY) -m harness sweep --device cpu --preset cpu-bench --variant lr,ckpt_lr,sckpt_lr,ckpt_sckpt_lr \
		--param inner_steps=2,8 --set task.tokens=512 --run-id sweep-steps-cpu-tokens512 --repeats 1 --warmup 0 --pairs 3 --force
	$(PY) -m harness sweep --device cpu --preset cpu-bench --variant sckpt_lr,ckpt_sckpt_lr --param step_ckpt=1,2,4,8 \
		--inner-steps 8 --run-id sweep-segments-cpu --repeats 3 --force
	$(PY) -m harness sweep --device cpu --preset sinusoid --meta-batch 25 --variant vmaml,vlr --param vmap_chunk=0,1,5,25 \
		--run-id sweep-vmap-chunk-cpu --repeats 5 --force
	$(PY) -m harness ablate --device cpu --preset sinusoid --force
	$(PY) -m harness ablate --device cpu --preset digits --force
	$(PY) -m harness diagnose --device cpu
	$(PY) -m harness diagnose --device cpu --amp bf16
	$(PY) -m harness diagnose --device cpu --amp fp16
	$(PY) -m harness docs

# The long-horizon figures (issue 22, docs/checkpointing.md): K = 8..1024, second order, learnable LR, cpu-bench at
# meta-batch 1 (half the time; the sequential engine's peak is per task), the CPU figure; one warm-up-free timed
# step and one pair per cell (the memory figure is deterministic, the time ratios are paired).  Two halves that may
# run at once (`make -j2 horizon`), then the table and plots of the whole run.
HORIZON := --device cpu --preset cpu-bench --meta-batch 1 --warmup 0 --repeats 1 --pairs 1 --timeout 3600 --allow-huge \
	--run-id horizon-cpu --no-plots
HORIZON_K := inner_steps=8,32,128,512,1024
horizon-a: $(STAMP)
	$(PY) -m harness sweep $(HORIZON) --variant sckpt_lr,bckpt_lr --param $(HORIZON_K)
	$(PY) -m harness sweep $(HORIZON) --variant bckpt_lr --param inner_steps=64
	$(PY) -m harness sweep $(HORIZON) --variant lr,torch_maml:sckpt --param inner_steps=8,32,128
horizon-b: $(STAMP)
	$(PY) -m harness sweep $(HORIZON) --variant lr --memory-budget 12MiB --param $(HORIZON_K)
	$(PY) -m harness sweep $(HORIZON) --variant lr --memory-budget 48MiB --param $(HORIZON_K)
	$(PY) -m harness sweep $(HORIZON) --variant sckpt_lr --set step_ckpt=sqrt --set step_rebuild=step --param $(HORIZON_K)
horizon: horizon-a horizon-b
	$(PY) -m harness report results/horizon-cpu

clean:
	rm -rf $(VENV) build *.egg-info
