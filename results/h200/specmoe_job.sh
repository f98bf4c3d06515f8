#!/usr/bin/env bash
# Issue 13's acceptance job on one H200, in three device calls of at most 9 minutes each:
#   bash results/h200/specmoe_job.sh 1      # then 2, then 3 (an optional second argument: seconds, default 540)
# matrices/h200-specmoe.toml (65 cells: offload, overlap, caching, lru, nospec, specmoe paper, specmoe best and the
# gamma sweep 1-10 at batch 1, 4, 16, 64, 256) and matrices/h200-specmoe-n.toml (10 cells: the N sweep at 16, 64),
# trained `small`, bf16, code-heldout, 64 new tokens, cuda:budget=25% (50% for part of the N sweep).
#
# The plan, from what the last H200 calls measured (training `small` 182 s; an offload cell at batch 16 with 64 new
# tokens 50 s including the reference and the worker's start, at batch 64 25 s; offload runs 3.6-4.6 s per
# 64-token iteration from batch 16 up, specmoe cells are shorter) and about 8 s of load, equivalence and reference
# per cell; each cell here is 1 warm-up and 2 measured iterations:
#   call 1: tests/gpu -k specmoe as a smoke test of the CUDA prefetch path (~40 s), training (~182 s), then batch
#           1 and 4 (26 cells, ~320 s)                                                            ~540 s
#   call 2: batch 16 and 64 (26 cells, ~430 s), then what call 1 left                             ~540 s
#   call 3: batch 256 (13 cells, ~260 s), what is left, the N sweep (10 cells, ~130 s), tests/gpu  ~500 s
# Each call runs its own cells first, then every unfinished cell of the main matrix (a resumed run skips the
# finished ones) while time is left, so a call that overran the estimate hands its rest to the next one; the N
# sweep, the least needed for the acceptance table, comes last. In all ~1,600 s: the session's 30 minutes of device
# time also hold the machine's start-up and the gaps between calls, so make the calls back to back and give the
# last one what is left (status's budget_left_s less a minute) as SECONDS.
# Runs go to results/runs/h200-specmoe{,-n} and the trained checkpoint to .cache/: ignored paths that a warm machine
# keeps between calls. On a fresh machine a call trains `small` again (another checkpoint: GPU training is not
# bit-reproducible; every cell records its weights_sha256) and starts its run afresh, unless the earlier cells are
# carried back (untar the earlier calls' archives into results/runs/ and name results/runs in the run's carry).
# After every step the cell files (not the cached reference logits, which are large) are archived under $OUT, so
# what was measured comes back even when a call is cut short.
set -u
call=${1:?usage: specmoe_job.sh CALL(1|2|3) [SECONDS]}
limit=${2:-540}
end=$((SECONDS + limit))
out=${OUT:-/tmp/smb-out}
repo=$PWD
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo HF_HUB_OFFLINE=1 SPECMOE_BENCH_CACHE=$repo/.cache/specmoe-bench
left() { echo $((end - SECONDS)); }
log() { echo "== $* ($(left) s left)" | tee -a "$out/job.log"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
transformers.__version__)"; echo "code: $(git -C "$repo" rev-parse HEAD) dirty=$(git -C "$repo" status --porcelain | wc -l)"; \
  echo "call $call"; } >> "$out/machine.txt" 2>&1

run() {  # MATRIX RUN_ID [--only ...]: measure until the time left minus a margin, then archive the cells
    local matrix=$1 id=$2
    shift 2
    [ "$(left)" -gt 45 ] || return 0
    log "$id $*"
    timeout -s INT $(( $(left) - 25 )) python3 -m harness.cli run "$matrix" --run-id "$id" --results-dir results/runs \
        --quiet "$@" 2>&1 | tail -60 | tee -a "$out/job.log"
    [ -d "results/runs/$id" ] && tar czf "$out/$id.tgz" --exclude=reference -C results/runs "$id"
}

train() {  # the trained `small`, once per machine; its training.json (loss, weights hash) goes to $OUT
    log "train small"
    timeout 300 python3 -c "from workloads.train import trained_checkpoint; print(trained_checkpoint('small'))" \
        2>&1 | tail -3 | tee -a "$out/job.log"
    cp "$(python3 -c "from workloads.train import cached_checkpoint; print(cached_checkpoint('small'))")/training.json" \
        "$out/training-small.json" 2>/dev/null
}

gpu_tests() {  # ARGS...: tests/gpu, output to $OUT
    [ "$(left)" -gt 60 ] || return 0
    log "tests/gpu $*"
    timeout $(( $(left) - 20 )) python3 -m pytest -q -s tests/gpu "$@" > "$out/gpu-tests-$call.log" 2>&1
    tail -3 "$out/gpu-tests-$call.log" | tee -a "$out/job.log"
}

main=matrices/h200-specmoe.toml
nsweep=matrices/h200-specmoe-n.toml
case $call in
    1) gpu_tests -x -k specmoe; train; run $main h200-specmoe --only batch_size=1,4 ;;
    2) train; run $main h200-specmoe --only batch_size=16,64 ;;
    3) train; run $main h200-specmoe --only batch_size=256 ;;
    *) echo "call must be 1, 2 or 3" >&2; exit 2 ;;
esac
run $main h200-specmoe    # whatever an earlier call left (or the next call's cells, where time is left)
[ "$call" = 3 ] && { run $nsweep h200-specmoe-n; gpu_tests; }
ls -la "$out" | tee -a "$out/job.log"
