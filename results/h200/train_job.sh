#!/usr/bin/env bash
# A device job: train each paper-condition recipe twice from scratch into separate directories, timed by the
# wall clock, and report held-out loss, routing skew and weights_sha256 of each, so that one call shows both the
# 4-minute budget and whether the deterministic trainer gives the same bits twice.
#   bash results/h200/train_job.sh                       # nllb-like and mixtral-like, two runs each
#   bash results/h200/train_job.sh nllb-like             # one recipe
# PREFLIGHT=1 first trains each recipe scaled down to seconds, twice, on the device: a quick look at whether the
# bits repeat and whether an operation without a deterministic form raises (the trainer runs torch's strict
# deterministic mode; in the full runs such an error would also come within the first step).
# Environment: OUT (results; default /tmp/smb-train-out), BUDGET (seconds for the whole job, default 570: a
# training that would start with less than MIN_LEFT=150 s left is skipped and says so), DEVICE (default: the
# recipe's, cuda), SETTINGS (extra `--set KEY=VALUE` words for every training, e.g. a scaled-down dry run),
# RUNS (default "a b").
# Under $OUT: summary.tsv (one row per training), RECIPE-RUN.training.json, RECIPE-RUN.log, preflight.log,
# machine.txt. Run a's checkpoint is moved into the cache that `--model RECIPE` reads
# ($SPECMOE_BENCH_CACHE/models), so later jobs on the same machine do not train it again; run b's is deleted.
set -u
out=${OUT:-/tmp/smb-train-out}
budget=${BUDGET:-570}
min_left=${MIN_LEFT:-150}
runs=${RUNS:-a b}
settings=${SETTINGS:-}
end=$((SECONDS + budget))
mkdir -p "$out"
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(nllb-like mixtral-like)
# cuBLAS reads its workspace setting when CUDA starts; the trainer sets it too, this makes sure it is first.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export SPECMOE_BENCH_CACHE=${SPECMOE_BENCH_CACHE:-$PWD/.cache/specmoe-bench}
work=$PWD/.cache/train-job
device_args=()
[ -n "${DEVICE:-}" ] && device_args=(--device "$DEVICE")
py=${PYTHON:-python3}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  $py -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  df -h "$PWD" | tail -1; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

sha_of() { $py -c "import json, sys; print(json.load(open(sys.argv[1]))['weights_sha256'])" "$1"; }

if [ "${PREFLIGHT:-0}" = 1 ]; then
    smoke="--set vocab_size=300 --set hidden_size=64 --set intermediate_size=128 --set dense_intermediate_size=128
           --set heads=4 --set kv_heads=2 --set seq_len=64 --set batch_size=8 --set steps=5 --set eval_windows=4
           --set tokenizer_chars=200000"
    for recipe in "${recipes[@]}"; do
        for run in 1 2; do
            # shellcheck disable=SC2086
            $py -m harness.cli model train --preset "$recipe" --corpus stdlib --quiet ${device_args[@]+"${device_args[@]}"} \
                $smoke $settings --out "$work/preflight-$recipe-$run" >> "$out/preflight.log" 2>&1 \
                || { echo "preflight of $recipe failed; see preflight.log:"; tail -20 "$out/preflight.log"; exit 3; }
        done
        a=$(sha_of "$work/preflight-$recipe-1/training.json"); b=$(sha_of "$work/preflight-$recipe-2/training.json")
        echo "preflight $recipe (scaled down, 5 steps, twice): $a $b $([ "$a" = "$b" ] && echo same || echo DIFFERENT)" \
            | tee -a "$out/preflight.log"
        rm -rf "$work/preflight-$recipe-1" "$work/preflight-$recipe-2"
    done
fi

printf 'recipe\trun\texit\twall_s\ttrain_s\ttokens_per_s\tsteps\theldout_loss\tunigram_loss\trouting_skew\tskew_per_layer\tweights_sha256\tpeak_gib\n' \
    > "$out/summary.tsv"
for recipe in "${recipes[@]}"; do
    for run in $runs; do
        left=$((end - SECONDS))
        if [ "$left" -lt "$min_left" ]; then
            echo "== $recipe run $run skipped: $left s of the budget left" | tee -a "$out/summary.log"
            continue
        fi
        dir="$work/$recipe-$run"
        rm -rf "$dir"
        echo "== $recipe run $run ($left s left)"
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        timeout -s INT $((left - 10)) $py -m harness.cli model train --preset "$recipe" --out "$dir" --quiet \
            ${device_args[@]+"${device_args[@]}"} --time-limit $((left - 40)) $settings > "$out/$recipe-$run.log" 2>&1
        rc=$?
        wall=$($py -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0")
        tail -8 "$out/$recipe-$run.log"
        if [ -f "$dir/training.json" ]; then
            cp "$dir/training.json" "$out/$recipe-$run.training.json"
            $py - "$dir/training.json" "$recipe" "$run" "$rc" "$wall" >> "$out/summary.tsv" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
steps = m.get("stopped_early_at_step", m["preset"]["steps"])
print("\t".join(map(str, [*sys.argv[2:6], m["train_seconds"], m["train_tokens_per_s"], steps, m["heldout_loss"],
                          m["unigram_loss"], m["routing_skew"], ",".join(map(str, m["routing_skew_per_layer"])),
                          m["weights_sha256"], round(m.get("peak_device_memory_bytes", 0) / 2**30, 1)])))
EOF
        else
            printf '%s\t%s\t%s\t%s\tno training.json\n' "$recipe" "$run" "$rc" "$wall" >> "$out/summary.tsv"
        fi
        if [ "$run" = a ] && [ -z "$settings" ] && [ "$rc" = 0 ]; then
            cached=$($py -c "import sys; from workloads.train import cached_checkpoint; print(cached_checkpoint(sys.argv[1]))" "$recipe")
            if grep -q stopped_early_at_step "$dir/training.json"; then
                echo "not cached: run a stopped at the time limit"
            else
                mkdir -p "$(dirname "$cached")" && rm -rf "$cached" && mv "$dir" "$cached" && echo "cached: $cached"
            fi
        fi
        rm -rf "$dir"
    done
done

echo
column -t -s $'\t' "$out/summary.tsv" 2>/dev/null || cat "$out/summary.tsv"
for recipe in "${recipes[@]}"; do
    shas=$(awk -F'\t' -v r="$recipe" '$1 == r && $12 != "" {print $12}' "$out/summary.tsv" | sort -u)
    n=$(awk -F'\t' -v r="$recipe" '$1 == r && $12 != "" {n++} END {print n + 0}' "$out/summary.tsv")
    if [ "$n" -ge 2 ]; then
        [ "$(echo "$shas" | wc -l)" = 1 ] && echo "$recipe: $n trainings, the same weights_sha256 $shas" \
            || echo "$recipe: $n trainings, DIFFERENT weights_sha256: $(echo $shas)"
    fi
done | tee "$out/reproducibility.txt"
ls -la "$out"
