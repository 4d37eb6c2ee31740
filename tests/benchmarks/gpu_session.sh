#!/usr/bin/env bash
# One short GPU session's measurements, most valuable first, each under its own time limit; after every step what
# the runs wrote (results/*-GPU, plots/*-GPU) is packed into OUTDIR/results.tar.gz, so a session cut short still
# returns what it measured.  The steps:
#   1. bench: the <checkpointing, learnable LR, order> matrix on the seed preset (K = 3), step and binomial
#      checkpointing, and the peers beside them -- CUDA allocator peaks, the NVML sampler, CUDA-event times and the
#      agreement with the non-checkpointed reference, on the GPU;        -> results/seed-GPU
#   2. check: every registered variant on the report's own model (docs/seed_model.py, its forward calling
#      torch.utils.checkpoint itself) at the cpu-bench size, float64 on the GPU: exact, refused or wrong;
#                                                                            -> results/check-seed-GPU
#   3. the tests marked gpu, and the CUDA measurement's tests against fakes, with CUDA present;
#   4. the long-horizon sweep on the seed preset (docs/checkpointing.md), as far as its time limit gets.
#                                                                            -> results/horizon-seed-GPU
#
#     bash tests/benchmarks/gpu_session.sh OUTDIR [GPU-NAME]       # e.g. OUTDIR=/tmp/gpu h200
#
# Commit the unpacked results from a clean tree (the rows record git_commit and git_dirty).  DEVICE, PRESET and
# LIMIT_SCALE exist for a dry run on the CPU (DEVICE=cpu PRESET=quick LIMIT_SCALE=0.2).
set -u
out=${1:?usage: gpu_session.sh OUTDIR [GPU-NAME]}
gpu=${2:-gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-seed}
LIMIT_SCALE=${LIMIT_SCALE:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$out"

log() { echo "[$(date -u +%T)] $*" | tee -a "$out/session.log"; }
pack() { tar czf "$out/results.tar.gz" $(ls -d results/*-"$gpu" plots/*-"$gpu" 2>/dev/null) 2>/dev/null || true; }
step() {  # step LIMIT_S NAME COMMAND...: SIGINT at the limit (the matrix records what it finished), KILL 20 s later
    local limit name rc
    limit=$(awk "BEGIN{print int($1 * $LIMIT_SCALE)}"); name=$2; shift 2
    log "start $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    log "end $name rc=$rc"
    pack
}

{
    date -u; uptime; nproc
    nvidia-smi 2>&1 | head -20
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    $PY -c "import higher, torchopt, torch_maml, checkpoint_schedules, pynvml; print('peers and schedules import')"
    echo "commit $(git rev-parse HEAD 2>&1)"; echo "status:"; git status --porcelain --untracked-files=no 2>&1 | head -20
} > "$out/env.log" 2>&1
log "environment in env.log"

MATRIX=maml,fo,lr,lr_fo,ckpt,ckpt_fo,ckpt_lr,ckpt_lr_fo,sckpt,sckpt_lr,ckpt_sckpt_lr,bckpt_lr
PEERS=higher:maml,torchopt:maml,torch_maml:maml,torch_maml:sckpt
step 240 bench $PY -m harness bench --device "$DEVICE" --preset "$PRESET" --variants "$MATRIX,$PEERS" \
    --timeout 90 --run-id "seed-$gpu" --force
step 90 check $PY -m harness check --model docs/seed_model.py:SeedModel --device "$DEVICE" --preset cpu-bench \
    --timeout 60 --run-id "check-seed-$gpu" --force
step 40 gpu-tests $PY -m pytest -p no:cacheprovider -q -rfEs tests/test_measure.py tests/test_measure_fakes.py \
    tests/test_cli_core.py
step 120 horizon $PY -m harness sweep --device "$DEVICE" --preset "$PRESET" --variant sckpt_lr,bckpt_lr,lr \
    --param inner_steps=8,32 --warmup 0 --repeats 1 --pairs 1 --timeout 100 --run-id "horizon-seed-$gpu" --force
log "done"
