#!/usr/bin/env bash
# Hot-temporal's warm start and pair-share scoring on the GPU (results/h200/draftsets/README.md): one device call
# that trains `small`, measures issue 12's `specmoe` and `nospec` cells of matrices/h200-runtime.toml (warm: the default when
# this ran; run with start = "warm" in that matrix's [engines.specmoe] to repeat it),
# then matrices/h200-draftstart.toml (the same `specmoe` cells cold, and the best settings warm).
#   bash results/h200/draftstart_job.sh 540
set -u
limit=${1:?usage: draftstart_job.sh SECONDS}
source "$(dirname "$0")/job_lib.sh"
once train-small train_small
run matrices/h200-runtime.toml h200-runtime-warm --only engine=specmoe,nospec --only batch_size=16,64,1
run matrices/h200-draftstart.toml h200-draftstart
ls -la "$out"
