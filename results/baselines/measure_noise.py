"""Run-to-run noise of repeated runs of one commit, as `specmoe-bench regress` sees it: per cell and timing metric,
each run's best iteration (harness.regress.best_of: what `continuous` compares), and the worst ratio between any
two runs. Suggests a threshold of
twice the worst deviation, at least 25%, per metric.

    python results/baselines/measure_noise.py RUN_DIR RUN_DIR [RUN_DIR ...]
"""
import math
import sys

from harness.regress import best_of, load_run
from harness.schema import metric_fact

METRICS = ["tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms_p50"]
SHOWN = ["tokens_per_s", "tpot_ms_p50"]  # per-cell tables printed for these


def main(paths: list[str]) -> None:
    runs = [{r.config.key(): r for r in load_run(p) if r.status == "ok"} for p in paths]
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    worst_all: dict[str, float] = {}
    print(f"{len(runs)} runs, {len(keys)} cells in all of them")
    for m in METRICS:
        lines = []
        for key in keys:
            meds = [best_of(r[key].samples[m], metric_fact(m).better) for r in runs if r[key].samples.get(m)]
            if len(meds) < 2:
                continue
            ratio = max(meds) / min(meds)
            worst_all[m] = max(worst_all.get(m, 1.0), ratio)
            lines.append(f"  {key[:58]:58s} " + " ".join(f"{x:8.4g}" for x in meds) + f"   worst ratio {ratio:.2f}")
        if m in SHOWN and lines:
            print(f"{m}: best iteration of each run")
            print("\n".join(lines))
    for m, ratio in worst_all.items():
        suggested = max(0.25, math.ceil(2 * (ratio - 1) * 20) / 20)
        print(f"{m}: worst ratio between two runs {ratio:.2f} (deviation {ratio - 1:.0%}); "
              f"2 x deviation, at least 25%: {suggested:.0%}")


if __name__ == "__main__":
    main(sys.argv[1:])
