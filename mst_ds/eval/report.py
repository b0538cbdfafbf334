"""``mst-ds report RUN_DIR...``: mean ± standard error over seeds [S §1], and training curves.

Per run directory it reads the evaluators' results (``RUN/eval/knn.json``, ``RUN/eval/linear_*.json`` —
or those files directly in the directory given) and ``RUN/metrics.jsonl`` (one JSON object per logged
step: step, loss, dino, restore, lr, mask_ratio, …). Every metric found in at least one run is
aggregated as mean ± standard error, SE = sample standard deviation (ddof = 1) / √n, written as
``report.md`` and ``report.json``; with one run the SE is undefined (null, shown as "n/a"). Curves go to
``loss.png`` (total, DINO and restoration loss), ``lr.png``, ``mask_ratio.png`` and the run-health curves
(``online_knn.png``, ``collapse.png``, ``attention.png``, ``loss_share.png``), one line per run. The
alerts of each run (``RUN/alerts.jsonl``) are listed; the online k-NN's last value and the alert count
are aggregated like the evaluators' metrics, and so is the throughput (median img/s in all and per device,
data-wait share and MFU over the logged steps, the highest peak memory; curves ``throughput.png`` and
``data_wait.png``).
Runs whose configs differ in more than the ``run`` section (seed, name) are flagged in the report.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mst_ds.config import UsageError
from mst_ds.run_dir import ALERTS as ALERTS_FILE  # noqa: F401 (tests name it)
from mst_ds.run_dir import RunDir
from mst_ds.scalars import ATTENTION, COLLAPSE, LOSSES, MFU, SHARES, THROUGHPUT

CURVES = {"loss": LOSSES[:3], "lr": ("lr",), "mask_ratio": ("mask_ratio",),
          # run health (issue 10, mst_ds.health): online k-NN, collapse, attention, loss balance
          "online_knn": ("monitor_knn_top1",), "collapse": COLLAPSE, "attention": ATTENTION, "loss_share": SHARES,
          # throughput (issue 31): is the speed normal, is the loader keeping up
          "throughput": THROUGHPUT[:2], "data_wait": ("data_wait_share",)}


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error with the sample std, ddof=1); SE is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def result_files(run_dir: Path) -> list[Path]:
    found: list[Path] = []
    for folder in (RunDir(run_dir).eval_dir, run_dir):
        if folder.is_dir():
            found += sorted(folder.glob("knn.json")) + sorted(folder.glob("linear_*.json"))
    return [f for f in found if not f.name.endswith("_state.json")]


def run_metrics(run_dir: Path) -> dict[str, float]:
    """metric name → value from every result file of the run (later files win on a name clash)."""
    metrics: dict[str, float] = {}
    for f in result_files(run_dir):
        try:
            record = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{f}: not valid JSON") from None
        for k, v in record.get("metrics", {}).items():
            if isinstance(v, int | float) and math.isfinite(v):
                metrics[k] = float(v)
    return metrics


# The logged SHARES are summarised over the whole run: the loss balance is a property of the trajectory,
# not of one step (§10's "roughly equally weighted" at λ2 = 0.6).
def health_metrics(run_dir: Path) -> dict[str, float]:
    """From metrics.jsonl: the online k-NN's last value and, per logged share, its first, mean over the
    logged steps and last value; from alerts.jsonl: the number of alerts (each when present)."""
    out: dict[str, float] = {}
    run = RunDir(run_dir)
    if run.metrics.is_file():
        recs = read_jsonl(run.metrics)
        knn = [r["monitor_knn_top1"] for r in recs if isinstance(r.get("monitor_knn_top1"), int | float)]
        if knn:
            out["online_knn_top1_last"] = float(knn[-1])
        for key in SHARES:
            vals = [float(r[key]) for r in recs if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
            if vals:
                out |= {f"{key}_first": vals[0], f"{key}_mean": sum(vals) / len(vals), f"{key}_last": vals[-1]}
    if run.alerts.is_file():
        out["alerts"] = float(len(read_jsonl(run.alerts)))
    return out


def throughput_metrics(run_dir: Path) -> dict[str, float]:
    """From metrics.jsonl: the median over the logged steps of img_per_s, img_per_s_per_device,
    data_wait_share and mfu (a median: the first interval pays for start-up), and the highest peak_mem_gb."""
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        return {}
    recs = read_jsonl(run.metrics)
    out: dict[str, float] = {}
    for key in (*THROUGHPUT, MFU):
        vals = sorted(float(r[key]) for r in recs if isinstance(r.get(key), int | float) and math.isfinite(r[key]))
        if vals:
            out[f"{key}_max" if key == "peak_mem_gb" else f"{key}_median"] = \
                vals[-1] if key == "peak_mem_gb" else statistics.median(vals)
    return out


def run_seed(run_dir: Path) -> int | None:
    cfg = RunDir(run_dir).config
    if not cfg.is_file():
        return None
    from mst_ds.config import config_from_file

    return config_from_file(cfg).run.seed


# What may differ between the runs of one seed study: the run section (seed, name, budget), where the
# data and checkpoints live, loader workers, and the evaluation settings.
SEED_STUDY_IGNORE = ("run", "checkpoint", "eval", "data.train", "data.val", "data.num_workers")


def config_hashes(run_dirs: list[Path]) -> dict[str, str]:
    from mst_ds.config import config_from_file

    return {str(r): config_from_file(RunDir(r).config).hash(ignore=SEED_STUDY_IGNORE)
            for r in run_dirs if RunDir(r).config.is_file()}


def aggregate(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{run: {metric: value}} → {metric: {mean, se, n, values: {run: value}}} (sorted by metric)."""
    names = sorted({m for metrics in per_run.values() for m in metrics})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        values = {run: metrics[name] for run, metrics in per_run.items() if name in metrics}
        mean, se = mean_and_se(list(values.values()))
        out[name] = {"mean": mean, "se": se, "n": len(values), "values": values}
    return out


def markdown(agg: dict[str, dict[str, Any]], runs: list[str], notes: list[str],
             alerts: dict[str, list[dict[str, Any]]] | None = None) -> str:
    lines = ["# mst-ds report", "", f"{len(runs)} run(s): " + ", ".join(f"`{r}`" for r in runs), ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += ["| metric | mean ± s.e. | n |", "|---|---|---|"]
    for name, a in agg.items():
        se = "n/a" if a["se"] is None else f"{a['se']:.2f}"
        lines.append(f"| {name} | {a['mean']:.2f} ± {se} | {a['n']} |")
    if alerts:
        lines += ["", "## Alerts", ""]
        for run, recs in alerts.items():
            lines.append(f"- `{run}`: " + ("none" if not recs else "; ".join(
                f"{r['rule']} at step {r['step']} ({r['metric']} {r['value']:.4g} vs {r['threshold']:.4g})" for r in recs)))
    return "\n".join(lines) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL; a line cut by a kill (the last one) is ignored."""
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(series: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """{run label: metrics records} → loss.png, lr.png, mask_ratio.png (those with any data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for figure, keys in CURVES.items():
        present = [k for k in keys if any(k in r for recs in series.values() for r in recs)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
        for ax, key in zip(axes[0], present):
            for label, recs in series.items():
                pts = [(r["step"], r[key]) for r in recs if "step" in r and isinstance(r.get(key), int | float)]
                if pts:
                    ax.plot(*zip(*pts), label=label, linewidth=1.2)
            ax.set_xlabel("step")
            ax.set_title(key)
            ax.grid(alpha=0.3)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run(args) -> int:
    run_dirs = [Path(r) for r in args.run_dirs]
    for r in run_dirs:
        if not r.is_dir():
            raise UsageError(f"{r}: no such run directory")
    labels = {}
    for r in run_dirs:
        seed = run_seed(r)
        labels[str(r)] = r.name if seed is None else f"{r.name} (seed {seed})"
    per_run = {str(r): {**run_metrics(r), **health_metrics(r), **throughput_metrics(r)} for r in run_dirs}
    alerts = {labels[str(r)]: read_jsonl(RunDir(r).alerts) for r in run_dirs if RunDir(r).alerts.is_file()}
    series = {labels[str(r)]: read_jsonl(RunDir(r).metrics) for r in run_dirs if RunDir(r).metrics.is_file()}
    if not any(per_run.values()) and not series:
        raise UsageError(f"no knn.json, linear_*.json or metrics.jsonl in {' '.join(map(str, run_dirs))}")
    notes = []
    hashes = config_hashes(run_dirs)
    if len(set(hashes.values())) > 1:
        notes.append("the runs' configs differ in more than the seed: the spread is not seed variance alone")
    seeds = [run_seed(r) for r in run_dirs]
    if len([s for s in seeds if s is not None]) != len({s for s in seeds if s is not None}):
        notes.append("some runs share a seed")
    out = Path(args.out) if args.out else run_dirs[0].resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(per_run)
    (out / "report.md").write_text(markdown(agg, [labels[str(r)] for r in run_dirs], notes, alerts))
    (out / "report.json").write_text(json.dumps({"runs": [str(r) for r in run_dirs], "notes": notes,
                                                 "metrics": agg, "alerts": alerts}, indent=2) + "\n")
    figures = plot_curves(series, out) if series else []
    print((out / "report.md").read_text(), end="")
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}" + "".join(f", {f}" for f in figures))
    return 0
