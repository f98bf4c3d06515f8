#!/usr/bin/env bash
# Issues 12 and 13's acceptance on one H200 in back-to-back device calls of one session: every call runs the same
# plan from the top, and a resumed run skips the cells an earlier call finished, so each call goes on where the
# last one stopped (a warm machine keeps results/runs/ and the trained checkpoint in .cache/, both ignored paths).
#   bash results/h200/acceptance_job.sh 570 [TAG]  # SECONDS: this call's share of the device time; TAG, appended
#                                                  # to the run ids, keeps a new job's cells apart from older ones
# The plan, most needed first:
#   1. tests/gpu -x -k "prefetch or disk": a smoke test of the CUDA prefetch path and the disk tier, once per machine
#   2. the trained `small`, once per machine (~182 s); its training.json goes to $OUT
#   3. matrices/h200-runtime.toml (issue 12: resident, offload, nospec, specmoe gamma 4 against nospec), run h200-runtime;
#      only on an H200 (the card issue 12 asks for; it was measured on an H100 on 2026-12-07, ../draftsets/cold/)
#   4. matrices/h200-specmoe.toml (issue 13) at batch 1 and 16, then 64, then 4 and 256, run h200-specmoe
#   5. matrices/h200-specmoe-n.toml (the N sweep), run h200-specmoe-n
#   6. tests/gpu, once per machine
# After every step the cell files (not the cached reference logits, which are large) are archived under $OUT.
set -u
limit=${1:?usage: acceptance_job.sh SECONDS [TAG]}
tag=${2:+-$2}
source "$(dirname "$0")/job_lib.sh"

smoke() {
    [ "$(left)" -gt 60 ] || return 1
    log "tests/gpu -k 'prefetch or disk'"
    timeout 150 python3 -m pytest -q -s -x tests/gpu -k "prefetch or disk" > "$out/gpu-smoke.log" 2>&1
    tail -2 "$out/gpu-smoke.log" | tee -a "$out/job.log"
}

once smoke smoke
once train-small train_small
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && run matrices/h200-runtime.toml "h200-runtime$tag"
run matrices/h200-specmoe.toml "h200-specmoe$tag" --only batch_size=1,16
run matrices/h200-specmoe.toml "h200-specmoe$tag" --only batch_size=64
run matrices/h200-specmoe.toml "h200-specmoe$tag"
run matrices/h200-specmoe-n.toml "h200-specmoe-n$tag"
once gpu_tests gpu_tests
ls -la "$out"
