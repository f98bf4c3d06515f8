#!/usr/bin/env bash
# One device job of the first H200 results: one model's part of matrices/gpu.toml, batch sizes 1,16,64 first (the
# ones issue 4 asks for), then 4 and 256, all into one run directory that a later job resumes. Everything it
# measured comes back under $OUT as one archive, even when the time limit cuts the run short.
#   bash results/h200/job.sh mixtral-8x7b 560      # model (as in the matrix), seconds this job may take
# MATRIX and BATCHES (groups run in turn) override the matrix file and the batch groups.
set -u
model=${1:?usage: job.sh MODEL SECONDS}
limit=${2:-560}
end=$((SECONDS + limit))
out=${OUT:-/tmp/smb-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 SPECMOE_BENCH_CACHE=$PWD/.cache/specmoe-bench
matrix=${MATRIX:-matrices/gpu.toml}
run_id=h200-$model
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max,power.limit \
    --format=csv; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
transformers.__version__)"; } >> "$out/machine.txt" 2>&1
for batches in ${BATCHES:-1,16,64 4 256}; do
    left=$((end - SECONDS))
    [ "$left" -gt 30 ] || break
    timeout -s INT "$left" python3 -m harness.cli run "$matrix" --only "model=$model" \
        --only "batch_size=$batches" --run-id "$run_id" --trace --results-dir results/runs 2>&1 | tee -a "$out/$model.log"
done
tar czf "$out/$run_id.tgz" -C results/runs "$run_id"
ls -la "$out"
