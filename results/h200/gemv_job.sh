#!/usr/bin/env bash
# Issue 12's few-pair expert kernel (engines/gemv.py) on one H200, then what is left of issues 14 and 13, in
# back-to-back device calls of one session on one machine; every call runs this plan from the top and goes on where
# the last one stopped (job_lib.sh). Send the next call at once: a machine idle for about 30 s is given back.
#   bash results/h200/gemv_job.sh 560 OLD      # SECONDS: this call's share; OLD: the commit before the kernel
# The plan, most needed first (after the kernel's own GPU tests, which end the call if they fail):
#   1. the trained `small`, once per machine
#   2. matrices/h200-runtime.toml's batch-1 cells and resident at 64: this code (run h200-runtime-gemv), then OLD in a
#      git worktree (run h200-runtime-old), so old and new run on one machine, one checkpoint, minutes apart
#   3. the rest of matrices/h200-runtime.toml with this code
#   4. tests/gpu, once per machine
#   5. results/h200/gemv_bench.py: the kernel's tiles against torch._grouped_mm at 1-8 pairs
#   6. profile_runtime.py: resident's decode step at batch 1 on small's shape (kernels per step, where the time goes)
#   7. train mixtral-like (issue 14), then matrices/h200-paper-mixtral.toml, run paper-mixtral
#   8. matrices/h200-specmoe-n.toml (issue 13's N sweep), run h200-specmoe-n
set -u
limit=${1:?usage: gemv_job.sh SECONDS OLD_COMMIT}
old=${2:?usage: gemv_job.sh SECONDS OLD_COMMIT}
source "$(dirname "$0")/job_lib.sh"

bench() {
    log "gemv_bench"
    timeout 200 python3 results/h200/gemv_bench.py --json "$out/gemv.json" 2>&1 | grep -v Warn \
        | tee "$out/gemv-bench.log" | tail -40 | tee -a "$out/job.log"
    [ -s "$out/gemv.json" ]
}

profile() {  # ENGINE BATCH [HARDWARE]: one decode profile, small's shape with random weights
    log "profile $1 batch $2"
    timeout 150 python3 results/h200/profile_runtime.py --engine "$1" --hardware "${3:-cuda}" --batch "$2" \
        --model small-random > "$out/profile-$1-b$2.log" 2>&1
    tail -30 "$out/profile-$1-b$2.log" | tee -a "$out/job.log"
}

run_old() {  # the batch-1 cells and resident at 64 of matrices/h200-runtime.toml, measured by OLD
    [ "$(left)" -gt 60 ] || return 0
    [ -d /tmp/old ] || git -C "$repo" worktree add -f /tmp/old "$old" > /dev/null 2>&1 || return 1
    log "h200-runtime-old ($old)"
    for only in "--only batch_size=1" "--only engine=resident"; do
        (cd /tmp/old && PYTHONPATH=/tmp/old timeout -s INT $(( $(left) - 20 )) python3 -m harness.cli run \
            "$repo/matrices/h200-runtime.toml" --run-id h200-runtime-old --results-dir "$repo/results/runs" --quiet \
            $only) 2>&1 | grep -v Warn | tail -25 | tee -a "$out/job.log"
    done
    tar czf "$out/h200-runtime-old.tgz" --exclude=reference -C results/runs h200-runtime-old
}

kernel_smoke() {  # the kernel's GPU tests first: if it does not compile or disagrees, the call ends here
    log "tests/gpu -k few_pair"
    timeout 120 python3 -m pytest -q -s tests/gpu -k few_pair > "$out/gpu-smoke.log" 2>&1
    local rc=$?
    tail -3 "$out/gpu-smoke.log" | tee -a "$out/job.log"
    return $rc
}

once kernel-smoke kernel_smoke || { log "the kernel failed its GPU tests: stopping"; exit 1; }
once train-small train_small
run matrices/h200-runtime.toml h200-runtime-gemv --only batch_size=1
run matrices/h200-runtime.toml h200-runtime-gemv --only engine=resident
run_old
run matrices/h200-runtime.toml h200-runtime-gemv
once gpu_tests gpu_tests
once bench bench
once profile-resident profile resident 1
once train-mixtral-a train mixtral-like a
run matrices/h200-paper-mixtral.toml paper-mixtral --only batch_size=1,256
run matrices/h200-paper-mixtral.toml paper-mixtral
run matrices/h200-specmoe-n.toml h200-specmoe-n
ls -la "$out"
