#!/usr/bin/env bash
# Issues 12 and 13's acceptance on one H200 in back-to-back device calls of one session: every call runs the same
# plan from the top, and a resumed run skips the cells an earlier call finished, so each call goes on where the
# last one stopped (a warm machine keeps results/runs/ and the trained checkpoint in .cache/, both ignored paths).
#   bash results/h200/acceptance_job.sh 570        # SECONDS: this call's share of the device time
# The plan, most needed first:
#   1. tests/gpu -x -k prefetch: a smoke test of the CUDA prefetch path, once per machine (~40 s)
#   2. the trained `small`, once per machine (~182 s); its training.json goes to $OUT
#   3. matrices/h200-runtime.toml (issue 12: resident, offload, nospec, specmoe gamma 4 against nospec), run h200-runtime
#   4. matrices/h200-specmoe.toml (issue 13) at batch 1 and 16, then 64, then 4 and 256, run h200-specmoe
#   5. matrices/h200-specmoe-n.toml (the N sweep), run h200-specmoe-n
#   6. tests/gpu, once per machine
# After every step the cell files (not the cached reference logits, which are large) are archived under $OUT.
set -u
limit=${1:?usage: acceptance_job.sh SECONDS}
end=$((SECONDS + limit))
out=${OUT:-/tmp/smb-out}
repo=$PWD
mkdir -p "$out" "$repo/.cache"
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo HF_HUB_OFFLINE=1 SPECMOE_BENCH_CACHE=$repo/.cache/specmoe-bench
left() { echo $((end - SECONDS)); }
log() { echo "== $(date -u +%T) $* ($(left) s left)" | tee -a "$out/job.log"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
transformers.__version__)"; echo "code: $(git -C "$repo" rev-parse HEAD) dirty=$(git -C "$repo" status --porcelain | wc -l)"; \
  } >> "$out/machine.txt" 2>&1

run() {  # MATRIX RUN_ID [--only ...]: measure until the time left minus a margin, then archive the cells
    local matrix=$1 id=$2
    shift 2
    [ "$(left)" -gt 45 ] || return 0
    log "$id $*"
    timeout -s INT $(( $(left) - 20 )) python3 -m harness.cli run "$matrix" --run-id "$id" --results-dir results/runs \
        --quiet "$@" 2>&1 | grep -v Warn | tail -40 | tee -a "$out/job.log"
    [ -d "results/runs/$id" ] && tar czf "$out/$id.tgz" --exclude=reference -C results/runs "$id"
}

once() {  # NAME COMMAND...: a step that runs once per machine
    [ -f "$repo/.cache/done-$1" ] && return 0
    "${@:2}" && touch "$repo/.cache/done-$1"
}

smoke() {
    [ "$(left)" -gt 60 ] || return 1
    log "tests/gpu -k prefetch"
    timeout 120 python3 -m pytest -q -s -x tests/gpu -k prefetch > "$out/gpu-smoke.log" 2>&1
    tail -2 "$out/gpu-smoke.log" | tee -a "$out/job.log"
}

train() {
    log "train small"
    timeout 300 python3 -c "from workloads.train import trained_checkpoint; print(trained_checkpoint('small'))" \
        2>&1 | tail -2 | tee -a "$out/job.log"
    cp "$(python3 -c "from workloads.train import cached_checkpoint; print(cached_checkpoint('small'))")/training.json" \
        "$out/training-small.json"
}

gpu_tests() {
    [ "$(left)" -gt 90 ] || return 1
    log "tests/gpu"
    timeout $(( $(left) - 10 )) python3 -m pytest -q -s tests/gpu > "$out/gpu-tests.log" 2>&1
    tail -2 "$out/gpu-tests.log" | tee -a "$out/job.log"
}

once smoke smoke
once train train
run matrices/h200-runtime.toml h200-runtime
run matrices/h200-specmoe.toml h200-specmoe --only batch_size=1,16
run matrices/h200-specmoe.toml h200-specmoe --only batch_size=64
run matrices/h200-specmoe.toml h200-specmoe
run matrices/h200-specmoe-n.toml h200-specmoe-n
once gpu_tests gpu_tests
ls -la "$out"
