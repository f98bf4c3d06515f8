#!/usr/bin/env bash
# Issue 14's study on one H200 (results/h200/paper/README.md), in back-to-back device calls of one session on one
# machine; every call runs this plan from the top and goes on where the last one stopped (job_lib.sh):
#   bash results/h200/paper_job.sh 570        # SECONDS: this call's share of the device time
#   bash results/h200/paper_job.sh 570 rest TAG  # only what the 2026-12-02 calls did not measure, run ids -TAG:
#                                                # train nllb-like, the N sweep and draft policies, mixtral-like
#                                                # (trained, then its matrix), T(gamma) at batch 64
#   bash results/h200/paper_job.sh 570 default TAG  # the draft_experts default (all that fit) against the old N = 4
#                                                # on nllb-like (matrices/h200-paper-nllb-default.toml, with T(10)
#                                                # at N = 16), the disk tier (matrices/h200-paper-nllb-disk.toml),
#                                                # then the figure's batch sizes 2, 8, 32, 128
# The plan, most needed first:
#   1. tests/gpu, once per machine (issue 12's check of every engine on CUDA; ~40 s)
#   2. train nllb-like (run a, cached for the cells: results/h200/train_job.sh)
#   3. matrices/h200-paper-nllb-gamma.toml at batch 1 (T(gamma), the acceptance's T(10)), run paper-nllb-gamma
#   4. matrices/h200-paper-nllb.toml at batch 1 and 256 (the acceptance's speedup), run paper-nllb
#   5. train nllb-like again (run b: the same weights_sha256?), then mixtral-like (run a)
#   6. the rest of paper-nllb at 16 and 64, then the N sweep and draft policies (paper-nllb-n), then T(gamma) at 64,
#      then the remaining batch sizes and the 19% budget
#   7. matrices/h200-paper-mixtral.toml, run paper-mixtral
# A machine left idle for about 30 s is given back, and a fresh one has none of the trained checkpoints: send the
# next call at once (2026-12-02, call 3 found a fresh machine and spent its time training nllb-like again).
# Under $OUT: job.log, machine.txt, gpu-tests.log, train-RECIPE-RUN/ (train_job.sh's files), RUN_ID.tgz (cells).
set -u
limit=${1:?usage: paper_job.sh SECONDS [rest TAG]}
source "$(dirname "$0")/job_lib.sh"

if [ "${2:-}" = default ]; then
    tag=-${3:?usage: paper_job.sh SECONDS default TAG}
    once train-nllb-a train nllb-like a
    run matrices/h200-paper-nllb-default.toml "paper-nllb-default$tag"
    run matrices/h200-paper-nllb-disk.toml "paper-nllb-disk$tag"
    run matrices/h200-paper-nllb.toml "paper-nllb$tag" --only batch_size=2,8,32,128
    ls -la "$out"
    exit 0
fi

if [ "${2:-}" = rest ]; then
    tag=-${3:?usage: paper_job.sh SECONDS rest TAG}
    once train-nllb-a train nllb-like a
    run matrices/h200-paper-nllb-n.toml "paper-nllb-n$tag"
    once train-mixtral-a train mixtral-like a
    run matrices/h200-paper-mixtral.toml "paper-mixtral$tag" --only batch_size=1,64,256
    once train-mixtral-b train mixtral-like b
    run matrices/h200-paper-nllb-gamma.toml "paper-nllb-gamma$tag" --only batch_size=64
    run matrices/h200-paper-mixtral.toml "paper-mixtral$tag"
    ls -la "$out"
    exit 0
fi

once gpu_tests gpu_tests
once train-nllb-a train nllb-like a
run matrices/h200-paper-nllb-gamma.toml paper-nllb-gamma --only batch_size=1
run matrices/h200-paper-nllb.toml paper-nllb --only batch_size=1,256
once train-nllb-b train nllb-like b
once train-mixtral-a train mixtral-like a
run matrices/h200-paper-nllb.toml paper-nllb --only batch_size=16,64
run matrices/h200-paper-nllb-n.toml paper-nllb-n
run matrices/h200-paper-nllb-gamma.toml paper-nllb-gamma
run matrices/h200-paper-nllb.toml paper-nllb
run matrices/h200-paper-mixtral.toml paper-mixtral
ls -la "$out"
