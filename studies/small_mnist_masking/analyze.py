"""The pre-registered comparisons of studies/small_mnist_masking from a `mst-ds study` table.json.

python studies/small_mnist_masking/analyze.py OUT/table.json > studies/small_mnist_masking/comparisons.md

Per comparison (row A − row B, per seed): mean ± SE over the seeds both rows finished, 95 % CI
(mean ± t₀.₉₇₅,ₙ₋₁ · SE) and a two-sided paired t-test — for k-NN (k = 20) and the linear probe.
"""

from __future__ import annotations

import json
import math
import sys

from scipy import stats

LOW, HIGH, RANDOM = "mst_deit_s_100ep", "ablation_mask_high", "ablation_random_masking"
COMPARISONS = [("high − low (primary 1)", HIGH, LOW), ("low − random (primary 2)", LOW, RANDOM),
               ("high − random (secondary)", HIGH, RANDOM)]
METRICS = [("k-NN top-1 (k = 20)", "knn_k20_top1"), ("linear top-1 (default probe)", "linear_cls_top1")]


def paired(a: dict[str, float], b: dict[str, float]) -> str:
    seeds = sorted(set(a) & set(b), key=int)
    d = [a[s] - b[s] for s in seeds]
    per_seed = ", ".join(f"{x:+.1f}" for x in d)
    if len(d) < 2:
        return f"| n = {len(d)} | — | — | — | {per_seed or '—'} |"
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    half = stats.t.ppf(0.975, len(d) - 1) * se
    p = stats.ttest_rel(a=[a[s] for s in seeds], b=[b[s] for s in seeds]).pvalue if se > 0 else float("nan")
    return f"| n = {len(d)} | {mean:+.2f} ± {se:.2f} | [{mean - half:+.1f}, {mean + half:+.1f}] | {p:.3f} | {per_seed} |"


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    for title, key in METRICS:
        print(f"\n### {title}: paired differences (points)\n")
        print("| comparison | seeds | mean ± SE | 95 % CI | p (paired t) | per seed |")
        print("|---|---|---|---|---|---|")
        for name, a, b in COMPARISONS:
            va = rows.get(a, {}).get("metrics", {}).get(key, {}).get("values", {})
            vb = rows.get(b, {}).get("metrics", {}).get(key, {}).get("values", {})
            print(f"| {name} {paired(va, vb)}")
        print(f"\n{title} per seed:\n")
        print("| row | " + " | ".join(f"seed {s}" for s in range(5)) + " |")
        print("|---|" + "---|" * 5)
        for row in (LOW, HIGH, RANDOM):
            v = rows.get(row, {}).get("metrics", {}).get(key, {}).get("values", {})
            print(f"| `{row}` | " + " | ".join(f"{v[str(s)]:.1f}" if str(s) in v else "—" for s in range(5)) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
