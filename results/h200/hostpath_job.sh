#!/usr/bin/env bash
# The host-path A/B (results/h200/hostpath/README.md) in one device call on `small` with random weights: tests/gpu
# on this tree, then hostpath_ab.py, OLD (a commit, in a git worktree) against this tree in one process, with the
# per-layer copy timeline.
#   bash results/h200/hostpath_job.sh 540 c2dd715 "nospec:1,16,64,256;offload:256;specmoe:16,64"
set -u
limit=${1:?usage: hostpath_job.sh SECONDS OLD_COMMIT CELLS}
old=${2:?usage: hostpath_job.sh SECONDS OLD_COMMIT CELLS}
cells=${3:?usage: hostpath_job.sh SECONDS OLD_COMMIT CELLS}
source "$(dirname "$0")/job_lib.sh"
[ -d /tmp/old ] || git -C "$repo" worktree add -f /tmp/old "$old" > /dev/null 2>&1 || exit 1
log "tests/gpu"
timeout 150 python3 -m pytest -q -s tests/gpu > "$out/gpu-tests.log" 2>&1
tail -2 "$out/gpu-tests.log" | tee -a "$out/job.log"
log "hostpath_ab $old: $cells"
timeout $(( $(left) - 10 )) python3 results/h200/hostpath_ab.py --old /tmp/old --cells "$cells" --rounds 2 \
    --timeline --json "$out/hostpath_ab.json" 2>&1 | grep -v Warn | tee "$out/hostpath_ab.log"
log "done"
