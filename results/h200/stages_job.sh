#!/usr/bin/env bash
# Issue 12's acceptance matrix (matrices/h200-runtime.toml) with the staged expert compute (engines/runtime.py
# COPY_STAGES), against OLD (the commit before it, in a git worktree) on the same trained `small` and prompts, in one
# device call: this code's whole matrix first, then OLD's copy-bound cells (the ones staging changes).
#   bash results/h200/stages_job.sh 570 fd208b8 [NEW_RUN_ID]
set -u
limit=${1:?usage: stages_job.sh SECONDS OLD_COMMIT [NEW_RUN_ID]}
old=${2:?usage: stages_job.sh SECONDS OLD_COMMIT [NEW_RUN_ID]}
new_id=${3:-h200-runtime-staged}
source "$(dirname "$0")/job_lib.sh"

run_old() {  # matrices/h200-runtime.toml's offload and nospec cells, measured by OLD
    [ "$(left)" -gt 60 ] || return 0
    [ -d /tmp/old ] || git -C "$repo" worktree add -f /tmp/old "$old" > /dev/null 2>&1 || return 1
    log "h200-runtime-old ($old)"
    (cd /tmp/old && PYTHONPATH=/tmp/old timeout -s INT $(( $(left) - 15 )) python3 -m harness.cli run \
        "$repo/matrices/h200-runtime.toml" --run-id h200-runtime-old --results-dir "$repo/results/runs" --quiet \
        --only engine=offload,nospec) 2>&1 | grep -v Warn | tail -40 | tee -a "$out/job.log"
    tar czf "$out/h200-runtime-old.tgz" --exclude=reference -C results/runs h200-runtime-old
}

once train-small train_small
run matrices/h200-runtime.toml "$new_id"
run_old
ls -la "$out"
