#!/usr/bin/env bash
# SpecMoE and nospec cells of matrices/h200-runtime.toml (issue 12's configuration) after every generate call
# starts from the prepared draft sets (engines/specmoe.py `_start_from_prepared`): one device call that trains
# `small` and measures batch 16, 64 and 1, to check the first-iteration goal (results/h200/hostpath/README.md).
#   bash results/h200/draftsets_job.sh 470 [RUN_ID]
set -u
limit=${1:?usage: draftsets_job.sh SECONDS [RUN_ID]}
id=${2:-h200-runtime-reset}
source "$(dirname "$0")/job_lib.sh"
once train-small train_small
run matrices/h200-runtime.toml "$id" --only engine=specmoe,nospec --only batch_size=16,64,1
ls -la "$out"
