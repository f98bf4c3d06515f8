# The shared part of the resumable device jobs (acceptance_job.sh, paper_job.sh): sourced, not run. Each call of a
# job runs its plan from the top; a resumed run skips the cells an earlier call finished and `once` skips the steps
# done on this machine, so back-to-back calls on a warm machine go on where the last one stopped (results/runs/ and
# .cache/, both ignored paths, stay on the machine between calls).
# Needs: limit (this call's seconds). Sets: end, out ($OUT), repo, and the environment of the harness.
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

once() {  # NAME COMMAND...: a step that runs once per machine (until it succeeds)
    [ -f "$repo/.cache/done-$1" ] && return 0
    "${@:2}" && touch "$repo/.cache/done-$1"
}

train_small() {  # the trained `small` into the cache every run of this machine uses; its training.json to $OUT
    log "train small"
    timeout 420 python3 -c "from workloads.train import trained_checkpoint; print(trained_checkpoint('small'))" \
        2>&1 | tail -2 | tee -a "$out/job.log"
    cp "$(python3 -c "from workloads.train import cached_checkpoint; print(cached_checkpoint('small'))")/training.json" \
        "$out/training-small.json"
}

train() {  # RECIPE RUN: one training by train_job.sh, with the time this call has left
    [ "$(left)" -gt 200 ] || { log "train $1 $2: too little time left"; return 1; }
    log "train $1 run $2"
    OUT="$out/train-$1-$2" RUNS=$2 BUDGET=$(( $(left) - 15 )) bash "$repo/results/h200/train_job.sh" "$1" 2>&1 \
        | tail -6 | tee -a "$out/job.log"
    awk -F"\t" -v r="$1" -v n="$2" '$1 == r && $2 == n && $3 == 0 {ok = 1} END {exit !ok}' "$out/train-$1-$2/summary.tsv"
}

gpu_tests() {
    [ "$(left)" -gt 90 ] || return 1
    log "tests/gpu"
    timeout $(( $(left) - 10 )) python3 -m pytest -q -s tests/gpu > "$out/gpu-tests.log" 2>&1
    local rc=$?
    tail -2 "$out/gpu-tests.log" | tee -a "$out/job.log"
    return $rc
}
