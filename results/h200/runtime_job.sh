#!/usr/bin/env bash
# The fast-runtime acceptance job, one device call: matrices/h200-runtime.toml measured with the new runtime (this
# checkout) and the old one (OLD, a commit checked out in a git worktree) on the same trained `small` (trained once,
# by the first run, into one cache both use), then one SpecMoE draft forward timed as a CUDA-graph replay, then
# tests/gpu if time is left. Each step is cut at the time left; what was measured is archived under $OUT after it.
#   bash results/h200/runtime_job.sh 560 6cb2bcb
set -u
limit=${1:?usage: runtime_job.sh SECONDS OLD_COMMIT}
old=${2:?usage: runtime_job.sh SECONDS OLD_COMMIT}
end=$((SECONDS + limit))
out=${OUT:-/tmp/smb-out}
repo=$PWD
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SPECMOE_BENCH_CACHE=$repo/.cache/specmoe-bench
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv; python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
transformers.__version__)"; echo "new: $(git -C "$repo" rev-parse HEAD) dirty=$(git -C "$repo" status --porcelain | wc -l)"; \
  echo "old: $old"; } > "$out/machine.txt" 2>&1
left() { echo $((end - SECONDS)); }
step() {  # NAME DIR SECONDS: run the matrix from DIR into /tmp/runs/NAME, then archive its cells
    echo "== $1 ($(left) s left)" | tee -a "$out/job.log"
    (cd "$2" && PYTHONPATH=$2 timeout -s INT "$3" python3 -m harness.cli run "$repo/matrices/h200-runtime.toml" \
        --run-id "$1" --results-dir /tmp/runs) 2>&1 | tail -40 | tee -a "$out/job.log"
    tar czf "$out/$1.tgz" --exclude=reference -C /tmp/runs "$1"
}
step new "$repo" 300
echo "== draft forward ($(left) s left)" | tee -a "$out/job.log"
PYTHONPATH=$repo timeout 70 python3 results/h200/runtime_bench.py --model small --engines specmoe \
    --batch-sizes 1,64 --iterations 1 --json "$out/draft.json" 2>&1 | grep -v Warn | tail -4 | tee -a "$out/job.log"
git -C "$repo" worktree add -f /tmp/old "$old" > /dev/null 2>&1
step old /tmp/old $(( $(left) - 15 ))
if [ "$(left)" -gt 60 ]; then
    PYTHONPATH=$repo timeout $(( $(left) - 5 )) python3 -m pytest -q -s tests/gpu > "$out/gpu-tests.log" 2>&1
    tail -2 "$out/gpu-tests.log" | tee -a "$out/job.log"
fi
ls -la "$out"
