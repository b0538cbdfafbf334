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

The reuse rule (``mst_ds.eval.identity``): the values of one metric are averaged only when every result
records the same data (bank and query), step and ``--which``, and each another network; any other mix is
one line (exit 2). Every input that is not as mst-ds writes it (not UTF-8, not JSON, a result or its
``metrics`` that is not an object, an alert without a field) is one line, exit 2. The outputs replace only
files this command wrote (``report.md``'s first line, ``report.json``'s ``"mst_ds": "report"``, the PNGs'
``Software`` text): anything else at those names is refused unless ``--force``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from mst_ds import atomic
from mst_ds.config import UsageError
from mst_ds.eval.identity import json_written_by, refuse_foreign
from mst_ds.run_dir import ALERTS as ALERTS_FILE  # noqa: F401 (tests name it)
from mst_ds.run_dir import RunDir
from mst_ds.scalars import ATTENTION, COLLAPSE, LOSSES, MFU, SHARES, THROUGHPUT

MD_MARK = "<!-- written by mst-ds report -->"  # report.md's first line: what marks it as ours
PNG_MARK = "mst-ds report"  # the PNG "Software" text chunk of the curves
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


def read_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (not UTF-8, not JSON, another JSON value) is one line."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise UsageError(f"{path}: not valid JSON") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object (a result of mst-ds knn / linear is one)")
    return data


class Result(NamedTuple):
    """One metric of one run, with what it was computed from (None for results of older versions)."""

    value: float
    path: Path
    network: dict[str, Any] | None  # the record's "model" (mst_ds.eval.identity.network_identity)
    data: dict[str, Any] | None  # the record's "data": {"train", "val"} identities


def run_results(run_dir: Path) -> dict[str, Result]:
    """metric name → :class:`Result` from every result file of the run. A metric found in two files of
    one run is refused (which of the two is the run's would be a guess)."""
    results: dict[str, Result] = {}
    for f in result_files(run_dir):
        record = read_object(f)
        metrics = record.get("metrics", {})
        if not isinstance(metrics, dict):
            raise UsageError(f"{f}: 'metrics' is not a JSON object")
        network = record.get("model") if isinstance(record.get("model"), dict) else None
        data = record.get("data") if isinstance(record.get("data"), dict) else None
        for k, v in metrics.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if k in results:
                raise UsageError(f"{run_dir}: {k} is in both {results[k].path} and {f}; keep one of them")
            results[k] = Result(float(v), f, network, data)
    return results


def run_metrics(run_dir: Path) -> dict[str, float]:
    """metric name → value from every result file of the run."""
    return {k: r.value for k, r in run_results(run_dir).items()}


def check_comparable(results: dict[str, dict[str, Result]]) -> list[str]:
    """The reuse rule for an aggregate over seeds: the values of one metric must come from the same data
    (bank and query), the same step and the same ``--which``, and from different networks (one network
    twice is not two seeds). Any other mix is refused in one line; → notes about results that record no
    identity (older versions: their data and network cannot be checked)."""
    names = sorted({m for per_run in results.values() for m in per_run})
    unknown: set[str] = set()
    for name in names:
        have = {run: per_run[name] for run, per_run in results.items() if name in per_run}
        known = {run: r for run, r in have.items() if r.network is not None and r.data is not None}
        unknown |= set(have) - set(known)
        items = list(known.values())
        for a, b in zip(items, items[1:]):
            for what, left, right in (("data (bank or query)", a.data, b.data),
                                      ("steps", a.network.get("step"), b.network.get("step")),
                                      ("networks (--which)", a.network.get("which"), b.network.get("which"))):
                if left != right:
                    raise UsageError(f"{name}: {a.path} and {b.path} were computed on different {what}; "
                                     "a mean over seeds needs the same data, step and --which in every run")
        seen: dict[str, str] = {}
        for r in items:
            weights = str(r.network.get("weights"))
            if weights in seen:
                raise UsageError(f"{name}: {seen[weights]} and {r.path} are results of one network "
                                 "(the same weights): not two seeds")
            seen[weights] = str(r.path)
    if unknown:
        return [f"the results of {', '.join(sorted(unknown))} do not record their network and data (an older "
                "mst-ds): they were not checked to be of the same data and step"]
    return []


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
        out["alerts"] = float(len(read_alerts(run.alerts)))
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
    lines = [MD_MARK, "# mst-ds report", "", f"{len(runs)} run(s): " + ", ".join(f"`{r}`" for r in runs), ""]
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
    """Records of a metrics / alerts JSONL. A line cut by a kill (not valid JSON; a resumed run appends
    after it) is ignored; a line that is not UTF-8 or is JSON but not an object is one line (exit 2)."""
    records = []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or err})") from None
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}: line {n} is not UTF-8 text") from None
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict):
            raise UsageError(f"{path}: line {n} is not a JSON object")
        records.append(record)
    return records


# What the report reads of an alert (mst_ds.health writes them), and its type.
ALERT_FIELDS = {"rule": str, "step": int, "metric": str, "value": (int, float), "threshold": (int, float)}


def read_alerts(path: Path) -> list[dict[str, Any]]:
    """The alerts of a run; an alert without a field the report shows (or of another type) is one line."""
    alerts = read_jsonl(path)
    for n, rec in enumerate(alerts, 1):
        for key, kind in ALERT_FIELDS.items():
            if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
                raise UsageError(f"{path}: alert {n} has no valid {key!r} (not as mst-ds train writes alerts)")
    return alerts


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
                pts = [(r["step"], r[key]) for r in recs
                       if _number(r.get("step")) and _number(r.get(key))]
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
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png", metadata={"Software": PNG_MARK})
        plt.close(fig)
        written.append(path)
    return written


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _png_ours(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_MARK
    except Exception:  # not an image at all: not ours
        return False


def _md_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == MD_MARK
    except (OSError, UnicodeDecodeError):
        return False


def outputs(out: Path) -> dict[Path, Any]:
    """Every file ``mst-ds report`` may write in ``out`` → how to tell it wrote it (its mark)."""
    targets: dict[Path, Any] = {out / "report.md": _md_ours,
                                out / "report.json": lambda p: json_written_by(p, "mst_ds", "report")}
    targets |= {out / f"{figure}.png": _png_ours for figure in CURVES}
    return targets


def run(args) -> int:
    run_dirs = [Path(r) for r in args.run_dirs]
    for r in run_dirs:
        if not r.is_dir():
            raise UsageError(f"{r}: no such run directory")
    labels = {}
    for r in run_dirs:
        seed = run_seed(r)
        labels[str(r)] = r.name if seed is None else f"{r.name} (seed {seed})"
    results = {str(r): run_results(r) for r in run_dirs}
    identity_notes = check_comparable(results)
    per_run = {str(r): {**{k: v.value for k, v in results[str(r)].items()}, **health_metrics(r), **throughput_metrics(r)}
               for r in run_dirs}
    alerts = {labels[str(r)]: read_alerts(RunDir(r).alerts) for r in run_dirs if RunDir(r).alerts.is_file()}
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
    notes += identity_notes
    out = Path(args.out) if args.out else run_dirs[0].resolve().parent / "report"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    for path, ours in outputs(out).items():  # before anything is written: only our own files are replaced
        refuse_foreign(path, ours, "mst-ds report", bool(getattr(args, "force", False)))
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(per_run)
    text = markdown(agg, [labels[str(r)] for r in run_dirs], notes, alerts)
    atomic.write_text(out / "report.md", text)
    atomic.write_text(out / "report.json", json.dumps({"mst_ds": "report", "runs": [str(r) for r in run_dirs],
                                                       "notes": notes, "metrics": agg, "alerts": alerts},
                                                      indent=2) + "\n")
    figures = plot_curves(series, out) if series else []
    print(text.split("\n", 1)[1], end="")  # (without the mark)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}" + "".join(f", {f}" for f in figures))
    return 0
