"""``mst-ds study``: the paper's comparisons (Table 4, §9, §10, MST vs DINO) as one resumable command.

Every (row, seed) is an ordinary run directory trained through ``launch.sh`` — the code path of ``mst-ds
train`` on any launcher (``--cpu N`` here, ``--launcher '--hostfile H --nodes 4 --gpus-per-node 8'`` on a
cluster) — then evaluated with ``mst-ds knn`` (and ``mst-ds linear --probe cls`` with ``--linear``).

A *row* is a preset's difference from the paper root ``mst_deit_s_100ep`` (its recipe chain below the
root, without the ``run`` section), so the same rows run at any scale: ``--base tiny`` applies each
row's recipe (masking strategy, replacement, target, weights, BN) on top of ``tiny``; without ``--base``
the rows are the paper presets as they are. The resolved recipes are written to ``OUT/recipes/``.

Resumable at every level: a run whose newest complete checkpoint is its last step carries a
``study_done.json`` (written by this command) and is never retrained; an interrupted run is relaunched
with the same command and resumes from its checkpoint (``mst-ds train``'s own resume); an evaluation
whose JSON exists is kept. The table (``study.md``, ``study.json``, ``study.png``) aggregates with
``mst-ds report``'s code: mean ± standard error over seeds, the difference to a reference row with its
standard error, and a t-test p-value — paired by seed when both rows ran the same seeds, else Welch's.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mst_ds import atomic, cost, job
from mst_ds.config import ConfigError, MSTConfig, RunFailure, UsageError, flatten, load_config, recipe_chain
from mst_ds.eval.identity import data_identity, network_identity, same_data, same_network
from mst_ds.run_dir import STUDY_DONE, RunDir

REPO = Path(__file__).resolve().parent.parent
PAPER_ROOT = "mst_deit_s_100ep"
# Named row sets → (rows, reference row). The reference is the row every other is compared to.
ROW_SETS: dict[str, tuple[list[str], str]] = {
    "table4": (["ablation_t4_random_bert_masked_nodino", "ablation_t4_random_bert_masked_dino",
                "ablation_t4_attention_bert_image", "mst_deit_s_100ep"], "mst_deit_s_100ep"),
    "lambda2": (["ablation_lambda2_02", "ablation_lambda2_04", "ablation_lambda2_06", "ablation_lambda2_08"],
                "ablation_lambda2_06"),
    "random_p": (["ablation_random_p0", "ablation_random_p001", "ablation_random_p005", "ablation_random_p01",
                  "ablation_random_p015"], "ablation_random_p0"),
    "mst_vs_dino": (["dino_deit_s_100ep", "mst_deit_s_100ep"], "dino_deit_s_100ep"),
    # Which patches to hide: MST's lowest-attention, AttMask's highest (and with hints), random at the same rate.
    "masking": (["mst_deit_s_100ep", "ablation_mask_high", "ablation_mask_hint", "ablation_random_masking"],
                "mst_deit_s_100ep"),
}
# The k-NN number the table shows: DINO's headline k (20) when evaluated, else the smallest k.
HEADLINE_K = 20
# Run-health scalars summarised per row from the last logged step, when the run logged them.
HEALTH_KEYS = ("attn_entropy", "attn_guidance", "teacher_entropy_rel", "restore_loss_share", "mask_ratio")
DONE = STUDY_DONE
SPEC = "study.json"


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------
def parse_rows(text: str) -> tuple[list[str], str | None]:
    """``table4`` or ``PRESET,PRESET,…`` (named sets may be mixed in) → (rows, the set's reference)."""
    rows: list[str] = []
    reference = None
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item in ROW_SETS:
            named, ref = ROW_SETS[item]
            rows += named
            reference = reference or ref
        else:
            rows.append(item)
    rows = list(dict.fromkeys(rows))
    if not rows:
        raise UsageError(f"--rows {text!r}: no rows (named sets: {', '.join(ROW_SETS)})")
    return rows, reference


def row_difference(preset: str) -> dict[str, Any]:
    """The recipe of a row: flattened keys its chain sets below the paper root, ``run`` excluded."""
    chain = recipe_chain(preset)
    labels = [label for label, _ in chain]
    start = labels.index(f"preset:{PAPER_ROOT}") + 1 if f"preset:{PAPER_ROOT}" in labels else 0
    diff: dict[str, Any] = {}
    for _, data in chain[start:]:
        diff.update({k: v for k, v in flatten(data).items() if not k.startswith("run.")})
    return diff


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


@dataclass(frozen=True)
class Run:
    row: str
    seed: int
    preset: str  # what launch.sh gets: a preset name or the recipe file of the row on --base
    sets: tuple[str, ...]
    run_dir: Path
    config_hash: str
    global_batch: int

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Study:
    out: Path
    rows: list[str]
    reference: str
    seeds: list[int]
    base: str | None
    steps: int | None
    sets: list[str]
    train: str
    val: str
    linear: bool
    launcher: list[str]
    # The environment the study started with, for its launches: the in-process evaluations start a
    # world of one and leave its rendezvous (RANK, MASTER_PORT, …) in os.environ.
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def recipe(self, row: str) -> str:
        """The preset launch.sh trains for ``row``: the row itself, or its recipe on the base."""
        if self.base is None:
            return row
        return str(self.out / "recipes" / f"{row}.yaml")

    def write_recipes(self) -> None:
        if self.base is None:
            return
        (self.out / "recipes").mkdir(parents=True, exist_ok=True)
        for row in self.rows:
            body = {"parent": self.base, **_nest(row_difference(row))}
            text = (f"# Row {row} of a study: its difference from {PAPER_ROOT}, on top of {self.base}.\n"
                    + yaml.safe_dump(body, sort_keys=False))
            path = Path(self.recipe(row))
            if not path.exists() or path.read_text() != text:
                atomic.write_text(path, text)

    def run_sets(self, row: str, seed: int) -> list[str]:
        sets = [*self.sets, f"run.seed={seed}", f"run.output_dir={self.out / 'runs'}", f"run.name={row}_seed{seed}"]
        if self.train:
            sets.append(f"data.train={self.train}")
        if self.steps:
            sets += [f"run.max_steps={self.steps}", f"run.schedule_steps={self.steps}", "checkpoint.every_epochs=0",
                     f"checkpoint.every_steps={max(1, self.steps // 4)}"]
        return sets

    def config(self, row: str, seed: int) -> MSTConfig:
        """The resolved config of (row, seed) — the same values launch.sh's run will resolve."""
        clash = sorted({s.split("=", 1)[0].strip() for s in self.sets} & set(row_difference(row)))
        if clash:
            raise UsageError(f"--set {', '.join(clash)}: row {row} sets this itself (it is what the row compares)")
        try:
            if self.base is None:
                return load_config(row, self.run_sets(row, seed)).config
            return load_config(self.base, self.run_sets(row, seed), overrides=row_difference(row)).config
        except ConfigError as err:
            raise UsageError(f"row {row}: {err}") from None

    def runs(self) -> list[Run]:
        """Every (row, seed), its config validated now — before anything is launched. Seed-major: every row
        of seed 0, then of seed 1, …, so a study stopped early has whole seeds done and its rows compare
        paired on the same seeds."""
        out = []
        for seed in self.seeds:
            for row in self.rows:
                cfg = self.config(row, seed)
                out.append(Run(row, seed, self.recipe(row), tuple(self.run_sets(row, seed)),
                               self.out / "runs" / f"{row}_seed{seed}", cfg.hash(), cfg.optim.batch_size))
        return out

    def spec(self) -> dict[str, Any]:
        return {"rows": self.rows, "reference": self.reference, "seeds": self.seeds, "base": self.base,
                "steps": self.steps, "sets": self.sets, "train": self.train, "val": self.val, "linear": self.linear,
                "launcher": self.launcher}


def study_from_args(args) -> Study:
    rows, named_ref = parse_rows(args.rows)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be positive (got {args.seeds})")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be positive (got {args.steps})")
    reference = getattr(args, "ref", None) or named_ref or rows[0]
    if reference not in rows:
        raise UsageError(f"--ref {reference}: not one of the rows ({', '.join(rows)})")
    cpu, launcher_text = getattr(args, "cpu", None), getattr(args, "launcher", None)
    if cpu is not None and launcher_text:
        raise UsageError("--cpu and --launcher: give one of them")
    if cpu is not None and cpu < 1:
        raise UsageError(f"--cpu must be positive (got {cpu})")
    launcher = ["--cpu", str(cpu)] if cpu else shlex.split(launcher_text or "")
    return Study(out=Path(getattr(args, "out", None) or "study").resolve(), rows=rows, reference=reference,
                 seeds=list(range(args.seeds)), base=args.base, steps=args.steps, sets=list(args.sets),
                 train=getattr(args, "train", None) or "", val=getattr(args, "val", None) or "",
                 linear=bool(getattr(args, "linear", False)), launcher=launcher)


# --------------------------------------------------------------------------------------------------
# Running: train, evaluate, each step kept once done
# --------------------------------------------------------------------------------------------------
def _check_out_dir(out: Path) -> None:
    """The study writes only into a folder that is new, empty, or one of its own."""
    if out.exists() and any(out.iterdir()) and not (out / SPEC).is_file():
        raise UsageError(f"--out {out}: not empty and not a study folder (no {SPEC}); choose a new folder")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _is_done(run: Run) -> bool:
    marker = RunDir(run.run_dir).study_done
    if not marker.is_file():
        return False
    done = _read_json(marker)
    if not isinstance(done, dict) or done.get("config_hash") != run.config_hash:
        found = done.get("config_hash") if isinstance(done, dict) else "unreadable"
        raise UsageError(f"{run.run_dir}: finished with config {found}, this study asks for "
                         f"{run.config_hash} (another --set/--steps/--base?); use a new --out")
    return True


def _newest_meta(run: Run) -> dict[str, Any] | None:
    """The marker of the run's newest complete checkpoint, if any."""
    from mst_ds import checkpoint as ckpt

    ckpt_dir = RunDir(run.run_dir).checkpoints
    tag = ckpt.newest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
    return None if tag is None else ckpt.read_meta(ckpt_dir / tag)


def _trained_steps(run: Run) -> int:
    """Optimizer steps of the run's newest complete checkpoint (0 without one)."""
    meta = _newest_meta(run)
    return 0 if meta is None else meta["samples"] // run.global_batch


def accept(study: Study, runs: list[Run], train_id: dict[str, Any]) -> None:
    """Refuse, in one line and before anything is written, a rerun into OUT whose runs cannot be
    kept: a finished run with another config, or a run trained on other data than ``--train``
    (compared by the manifest's fingerprint, as resume does: moved shards are the same data)."""
    from mst_ds.data.manifest import fingerprint_difference

    for run in runs:
        _is_done(run)
        meta = _newest_meta(run)
        data = meta.get("data") if meta is not None else None
        if isinstance(data, dict) and data.get("digest") != train_id["digest"]:
            raise UsageError(f"--train {study.train}: {run.run_dir} was trained on other data "
                             f"({fingerprint_difference(data, train_id)}); use a new --out")


def _stream(cmd: list[str], log: Path, env: dict[str, str], *, echo: bool = False) -> int:
    """Run one command (an argument list, never a shell), its output appended to ``log`` (and, with
    ``echo``, shown here as it comes)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        if not echo:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env).returncode
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env,
                              text=True, bufsize=1) as proc:
            for line in proc.stdout:
                fh.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()
        return proc.returncode


def _env(study: Study) -> dict[str, str]:
    """The environment of the study's commands: its own, with this Python's scripts first on PATH."""
    return {**study.env, "PATH": f"{Path(sys.executable).parent}:{study.env.get('PATH', '')}"}


def _tail(log: Path, n: int = 12) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def train_run(study: Study, run: Run, index: str) -> None:
    if _is_done(run):
        print(f"{index} {run.name}: trained (kept)", flush=True)
        return
    resumed = _trained_steps(run)
    print(f"{index} {run.name}: training" + (f" (resuming at step {resumed})" if resumed else ""), flush=True)
    cmd = ["bash", str(REPO / "launch.sh"), *study.launcher, "--preset", run.preset]
    for s in run.sets:
        cmd += ["--set", s]
    cmd = job.tied_command(cmd)  # launch.sh dies with the study (kill -9 included), and its ranks with it
    log = study.out / "logs" / f"{run.name}.train.log"
    t0 = time.time()
    rc = _stream(cmd, log, _env(study))
    wall = time.time() - t0
    if rc != 0:
        print(_tail(log), file=sys.stderr)
        raise RunFailure(f"{run.name}: training failed (exit {rc}); log: {log}")
    cfg = load_config(run.preset, run.sets).config
    steps = _trained_steps(run)
    wanted = cfg.run.max_steps
    if wanted is not None and steps < wanted:
        raise RunFailure(f"{run.name}: training stopped at step {steps} of {wanted} (time limit?); rerun to continue")
    atomic.write_json(RunDir(run.run_dir).study_done, {"row": run.row, "seed": run.seed, "config_hash": run.config_hash,
                                           "steps": steps, "wall_s": wall, "resumed_at": resumed})
    print(f"{index} {run.name}: trained {steps} steps in {wall:.0f} s", flush=True)


def evaluate_run(study: Study, run: Run, index: str, data: dict[str, Any]) -> None:
    """``mst-ds knn`` (and ``linear``) of a trained run; a result is kept only while the identity of
    its bank and query (``data``: {"train", "val"} of :func:`mst_ds.eval.features.data_identity`) is
    what it records. Run like training: a command of its own, tied to the study, logged (and shown)."""
    common = ["--ckpt", str(run.run_dir), "--train", study.train, "--val", study.val, "--out",
              str(RunDir(run.run_dir).eval_dir), "--num-workers", "0"]
    todo = [("knn.json", ["knn", *common])]
    if study.linear:
        todo.append(("linear_cls.json", ["linear", "--probe", "cls", *common]))
    # The reuse rule: a kept result records this run's network (its newest checkpoint's files, the teacher)
    # and this study's bank and query; a name (the run's folder) is not enough.
    # torch comes with the checkpoint module: imported only when a study evaluates (plan --study is torch-free)
    from mst_ds.checkpoint import run_config

    network = network_identity(str(run.run_dir), run_config(run.run_dir), "teacher")
    for result, argv in todo:
        kept = _read_json(RunDir(run.run_dir).eval_dir / result)
        if isinstance(kept, dict) and same_data(kept.get("data"), data) and same_network(kept.get("model"), network):
            continue
        why = ""
        if isinstance(kept, dict):
            why = (" (its bank or query was other data: redone)" if not same_data(kept.get("data"), data)
                   else " (it was computed from another checkpoint of the run: redone)")
        print(f"{index} {run.name}: mst-ds {argv[0]}{why}", flush=True)
        rc = _stream(job.tied_command([sys.executable, "-m", "mst_ds.cli", *argv]),
                     study.out / "logs" / f"{run.name}.eval.log", _env(study), echo=True)
        if rc != 0:
            raise RunFailure(f"{run.name}: mst-ds {argv[0]} failed (exit {rc})")


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def _headline(metrics: dict[str, float], prefix: str = "knn_k") -> str | None:
    ks = sorted(int(m[len(prefix):].split("_")[0]) for m in metrics if m.startswith(prefix) and m.endswith("_top1"))
    if not ks:
        return None
    k = HEADLINE_K if HEADLINE_K in ks else ks[0]
    return f"{prefix}{k}_top1"


def compare(values: dict[int, float], ref: dict[int, float]) -> dict[str, Any]:
    """Row − reference over seeds → {diff, se, p, test}; paired by seed when both ran the same seeds."""
    from scipy import stats

    a, b = list(values.values()), list(ref.values())
    diff = sum(a) / len(a) - sum(b) / len(b)
    if set(values) == set(ref) and len(values) >= 2:
        d = [values[s] - ref[s] for s in sorted(values)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        p = float(stats.ttest_rel(a=[values[s] for s in sorted(values)], b=[ref[s] for s in sorted(ref)]).pvalue)
        test = "paired t"
    elif len(a) >= 2 and len(b) >= 2:
        var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
        se = math.sqrt(var(a) / len(a) + var(b) / len(b))
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        test = "Welch t"
    else:
        se, p, test = None, None, "n/a (one seed)"
    clean = lambda x: None if x is None or not math.isfinite(x) else x  # noqa: E731 (zero spread → nan p)
    return {"diff": diff, "se": clean(se), "p": clean(p), "test": test}


def table(study: Study, runs: list[Run], failed: dict[str, str] | None = None) -> dict[str, Any]:
    """The study's numbers, aggregated with ``mst-ds report``'s code from each run's result files;
    ``failed`` runs (name → why) are left out of the numbers and listed per row."""
    from mst_ds.eval.report import aggregate, read_jsonl, run_metrics

    failed = failed or {}
    rows: dict[str, Any] = {}
    for row in study.rows:
        mine = [r for r in runs if r.row == row and r.name not in failed]
        lost = {str(r.seed): failed[r.name] for r in runs if r.row == row and r.name in failed}
        per_run = {str(r.seed): run_metrics(r.run_dir) for r in mine}
        agg = aggregate(per_run)
        done = [json.loads(RunDir(r.run_dir).study_done.read_text()) for r in mine]
        health: dict[str, dict[str, Any]] = {}
        for key in HEALTH_KEYS:
            last = {}
            for r in mine:
                recs = [x for x in read_jsonl(RunDir(r.run_dir).metrics) if isinstance(x.get(key), int | float)] \
                    if RunDir(r.run_dir).metrics.is_file() else []
                if recs:
                    last[str(r.seed)] = float(recs[-1][key])
            if last:
                health[key] = aggregate({s: {key: v} for s, v in last.items()})[key]
        rows[row] = {"metrics": agg, "steps": max((d["steps"] for d in done), default=None),
                     "wall_s": [d["wall_s"] for d in done], "health": health, "runs": [str(r.run_dir) for r in mine],
                     "n": len(mine), "failed": lost}
    # The reference row's k-NN metric; another row's if every reference run failed.
    headline = next((h for h in (_headline(rows[r]["metrics"]) for r in [study.reference, *rows]) if h), None)
    linear = "linear_cls_top1"
    for row, entry in rows.items():
        for metric in (headline, linear):
            if metric and metric in entry["metrics"] and metric in rows[study.reference]["metrics"] and row != study.reference:
                entry.setdefault("vs_reference", {})[metric] = compare(
                    {int(s): v for s, v in entry["metrics"][metric]["values"].items()},
                    {int(s): v for s, v in rows[study.reference]["metrics"][metric]["values"].items()})
    return {"study": study.spec(), "headline": headline, "rows": rows}


def _pm(a: dict[str, Any] | None, digits: int = 1) -> str:
    if a is None:
        return "—"
    se = "n/a" if a["se"] is None else f"{a['se']:.{digits}f}"
    return f"{a['mean']:.{digits}f} ± {se}"


def _delta(d: dict[str, Any] | None) -> str:
    if d is None:
        return "—"
    return f"{d['diff']:+.1f} ± " + ("n/a" if d["se"] is None else f"{d['se']:.1f}")


def markdown(result: dict[str, Any]) -> str:
    spec, headline = result["study"], result["headline"]
    has_linear = any("linear_cls_top1" in r["metrics"] for r in result["rows"].values())
    health_keys = [k for k in HEALTH_KEYS if any(k in r["health"] for r in result["rows"].values())]
    lines = [f"# mst-ds study ({len(spec['rows'])} rows × {len(spec['seeds'])} seeds"
             + (f", base {spec['base']}" if spec["base"] else "") + ")", "",
             f"k-NN: `{headline}` (top-1 %, mean ± standard error over seeds); reference row: `{spec['reference']}`; "
             "Δ = row − reference ± its standard error, p from a t-test (paired by seed where the seeds match, "
             "else Welch); n = runs in the numbers, failed runs named and left out.", ""]
    cols = ["row", "n", "k-NN top-1", "Δ k-NN", "p"] + (["linear top-1", "Δ linear"] if has_linear else []) \
        + ["steps", "wall s / run"] + health_keys
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row, r in result["rows"].items():
        vs = r.get("vs_reference", {})
        d = vs.get(headline)
        n = f"{r['n']} of {r['n'] + len(r['failed'])}" + (
            f" (failed: seed {', '.join(r['failed'])})" if r["failed"] else "")
        cells = [f"`{row}`", n, _pm(r["metrics"].get(headline)),
                 "ref" if row == spec["reference"] else _delta(d),
                 "" if d is None or d["p"] is None else f"{d['p']:.3f}"]
        if has_linear:
            dl = vs.get("linear_cls_top1")
            cells += [_pm(r["metrics"].get("linear_cls_top1")),
                      "ref" if row == spec["reference"] else _delta(dl)]
        cells += ["—" if r["steps"] is None else str(r["steps"]),
                  f"{sum(r['wall_s']) / len(r['wall_s']):.0f}" if r["wall_s"] else "—"]
        cells += [_pm(r["health"].get(k), 3) for k in health_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = result["headline"]
    names = [n for n in result["rows"] if headline in result["rows"][n]["metrics"]]
    if not names:
        return
    means = [result["rows"][n]["metrics"][headline]["mean"] for n in names]
    ses = [result["rows"][n]["metrics"][headline]["se"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.8))
    colors = ["#b0b0b0" if n == result["study"]["reference"] else "#4c72b0" for n in names]
    ax.bar(range(len(names)), means, yerr=ses, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), [n.replace("ablation_", "") for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"{headline} (%)")
    lo = min(m - s for m, s in zip(means, ses))
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_title(f"{len(result['study']['seeds'])} seeds; error bars: standard error", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(study: Study, runs: list[Run], failed: dict[str, str] | None = None) -> dict[str, Any]:
    result = table(study, runs, failed)
    atomic.write_json(study.out / "table.json", result)
    atomic.write_text(study.out / "table.md", markdown(result))
    figure(result, study.out / "table.png")
    return result


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------
def _check_data(train: str, val: str) -> dict[str, Any]:
    """{"train", "val"} → each one's identity (what evaluations record); missing or bad data: one line."""
    from mst_ds.data.manifest import Manifest

    for flag, p in (("--train", train), ("--val", val)):
        if not p:
            raise UsageError(f"{flag}: required for a study")
    Manifest.load(train)  # training reads shards (the k-NN bank and --val may also be ImageFolders)
    return {"train": data_identity(train), "val": data_identity(val)}


def run(args) -> int:
    default_launch(args, gpu_visible=_gpu_visible())
    study = study_from_args(args)
    _check_out_dir(study.out)
    data = _check_data(study.train, study.val)
    runs = study.runs()
    accept(study, runs, data["train"])
    study.out.mkdir(parents=True, exist_ok=True)  # the rerun is accepted: only now is anything written
    atomic.write_json(study.out / SPEC, study.spec())
    study.write_recipes()
    print(f"study: {len(study.rows)} rows × {len(study.seeds)} seeds = {len(runs)} runs → {study.out}", flush=True)
    failed: dict[str, str] = {}  # run name → why; the other runs go on
    for i, r in enumerate(runs, 1):
        index = f"[{i}/{len(runs)}]"
        try:
            train_run(study, r, index)
            evaluate_run(study, r, index, data)
        except RunFailure as err:
            failed[r.name] = str(err)
            print(f"{index} {r.name}: FAILED ({err}); going on with the other runs", file=sys.stderr, flush=True)
    write_table(study, runs, failed)
    print((study.out / "table.md").read_text(), end="")
    print(f"wrote {study.out / 'table.md'}, {study.out / 'table.json'}, {study.out / 'table.png'}")
    if failed:
        raise RunFailure(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); the table leaves them out "
                         "(n per row); rerun the same command to retry them")
    return 0


def default_launch(args, *, gpu_visible: bool) -> None:
    """Neither ``--cpu`` nor ``--launcher``: one CPU process per run where no GPU is visible, else
    launch.sh's own default (every local GPU)."""
    if not args.cpu and not args.launcher:
        args.cpu = None if gpu_visible else 1


def _gpu_visible() -> bool:
    # torch comes with the engine module: imported only when a study runs (plan --study is torch-free)
    from mst_ds.engine import gpu_visible

    return gpu_visible()


# --------------------------------------------------------------------------------------------------
# mst-ds plan --study: the grid and its cost, before anything runs
# --------------------------------------------------------------------------------------------------
def step_cost(cfg: MSTConfig, batch: int = 16) -> float:
    """CPU seconds per training image here (``plan --measure-cpu``): the fastest of three real MST steps
    — teacher forward, student forward + backward, decoder — on random views of ``batch`` images, after
    one untimed step (it pays for allocation)."""
    import torch

    from mst_ds.model.mst import MSTModel

    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    a = cfg.augment
    batch = max(2, min(batch, cfg.optim.batch_size))

    def step() -> None:
        views = [torch.randn(batch, 3, a.global_crop_size, a.global_crop_size) for _ in range(2)] + \
            [torch.randn(batch, 3, a.local_crop_size, a.local_crop_size) for _ in range(a.n_local_crops)]
        model(views, teacher, cfg.loss.teacher_temp, torch.Generator().manual_seed(0))["loss"].backward()

    step()
    seconds = []
    for _ in range(3):  # the fastest of three: a busy machine inflates single timings
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return min(seconds) / batch


def fmt_hours(value: float) -> str:
    """Whole numbers with thousands separators from 10 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def plan_pricing(args) -> cost.Pricing:
    """--device / --peak-tflops / --mfu / --gpu-check → what ``plan`` prices GPU-hours with."""
    return cost.pricing(args.device, peak_override=args.peak_tflops, mfu=args.mfu,
                        gpu_check=Path(args.gpu_check) if args.gpu_check else None)


def plan(args) -> int:
    """``mst-ds plan --study --rows … [--seeds N] [--base P] [--steps S] [--device D]``: prints only,
    writes nothing. Every row is resolved and priced before anything is printed (an error: one line)."""
    from rich.console import Console
    from rich.table import Table

    from mst_ds.config import derive

    if not args.rows:
        raise UsageError("plan --study: --rows is required")
    study = study_from_args(args)
    configs = {row: study.config(row, 0) for row in study.rows}
    price = plan_pricing(args)
    flops = {row: cost.flops_per_image(cfg) for row, cfg in configs.items()}  # one count per flops_key (cached)
    console = Console()
    grid = Table(title=f"Study grid: {len(study.rows)} rows × {len(study.seeds)} seeds"
                       + (f" on base {study.base}" if study.base else " (paper presets as they are)")
                       + f"; reference row {study.reference}")
    for col in ("row", "recipe (difference from mst_deit_s_100ep)"):
        grid.add_column(col, overflow="fold")
    for row in study.rows:
        diff = row_difference(row)
        grid.add_row(row, ", ".join(f"{k}={v}" for k, v in diff.items()) or "— (the paper's MST)")
    console.print(grid)
    cpu_s: dict[tuple, float] = {}  # CPU seconds per image, measured once per flops_key
    dev = price.device.upper()
    cost_table = Table(title=f"Cost per run ({dev} GPU-hours = images × GFLOP / (peak × MFU); GFLOP: one training "
                             "image, teacher fwd + student fwd/bwd + head + decoder: mst_ds.cost.flops_per_image)")
    cost_table.add_column("row", overflow="fold")
    for col in ["steps", "images", "GFLOP/img", "PFLOP/run", f"{dev} h/run"] + (["CPU h/run here"] if args.measure_cpu else []):
        cost_table.add_column(col, justify="right", no_wrap=True)
    total_pflop = total_h = total_cpu = 0.0
    for row, cfg in configs.items():
        steps = cost.run_steps(cfg, derive(cfg, 1, cfg.data.num_samples).total_steps)
        images = steps * cfg.optim.batch_size
        pflop, hours = images * flops[row] / 1e15, price.hours(images, flops[row])
        total_pflop += pflop * len(study.seeds)
        total_h += hours * len(study.seeds)
        cells = [f"{steps:,}", f"{images:,}", f"{flops[row] / 1e9:.4g}", fmt_hours(pflop), fmt_hours(hours)]
        if args.measure_cpu:
            key = cost.flops_key(cfg)
            if key not in cpu_s:
                cpu_s[key] = step_cost(cfg)
            total_cpu += images * cpu_s[key] / 3600 * len(study.seeds)
            cells.append(f"{images * cpu_s[key] / 3600:.3g}")
        cost_table.add_row(row, *cells)
    console.print(cost_table)
    n = len(study.rows) * len(study.seeds)
    console.print(f"{n} runs: {fmt_hours(total_pflop)} PFLOP of training in all ≈ {fmt_hours(total_h)} {dev} GPU-hours "
                  "(evaluation comes on top)"
                  + (f"; ≈ {total_cpu:.3g} CPU-hours on this machine (one process, as loaded as it is now)"
                     if args.measure_cpu else ""))
    console.print(f"priced at {price.describe()}")
    return 0
