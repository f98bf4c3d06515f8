#!/usr/bin/env bash
# A device job of the first H200 results: steps of matrices/gpu.toml, each MODEL[:AXIS=V1,V2...] (the --only
# filters of `specmoe-bench run`), run in turn into one run directory per model (h200-MODEL) that a later job
# resumes, until SECONDS have passed. After every step the cell files (not the cached reference logits, which are
# large) are archived under $OUT, so what was measured comes back even when the job is cut short.
#   bash results/h200/job.sh 560 mixtral-8x7b:batch_size=1,16,64 small:batch_size=16:engine=offload,specmoe
# MATRIX overrides the matrix file.
set -u
limit=${1:?usage: job.sh SECONDS MODEL[:AXIS=V1,V2...]...}
shift
end=$((SECONDS + limit))
out=${OUT:-/tmp/smb-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 SPECMOE_BENCH_CACHE=$PWD/.cache/specmoe-bench
matrix=${MATRIX:-matrices/gpu.toml}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max,power.limit \
    --format=csv; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
transformers.__version__)"; } >> "$out/machine.txt" 2>&1
for step in "$@"; do
    left=$((end - SECONDS))
    [ "$left" -gt 30 ] || break
    IFS=: read -r model filters <<< "$step"
    only=(--only "model=$model")
    IFS=: read -ra parts <<< "$filters"
    for f in "${parts[@]}"; do only+=(--only "$f"); done
    echo "== step $step ($left s left)" | tee -a "$out/job.log"
    timeout -s INT "$left" python3 -m harness.cli run "$matrix" "${only[@]}" --run-id "h200-$model" --trace \
        --results-dir results/runs 2>&1 | tee -a "$out/job.log"
    tar czf "$out/h200-$model.tgz" --exclude=reference -C results/runs "h200-$model"
done
ls -la "$out"
