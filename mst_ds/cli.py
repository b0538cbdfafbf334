"""``mst-ds``: one entry point, every flag declared once.

Each sub-command is a thin adapter: it declares its flags here and calls ``run(args)`` of the module
that owns the work (imported lazily so ``mst-ds plan`` does not pay for DeepSpeed's import).
Bad input ends with one line on stderr and exit code 2; a failure found while running (a corrupt
shard, a NaN loss) with exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from mst_ds.config import (  # noqa: F401 (EXIT_USAGE, error_exit, parse_positive_list: callers name them here)
    DEFAULT_PRESET,
    EXIT_USAGE,
    ConfigError,
    RunFailure,
    UsageError,
    error_exit,
    parse_positive_list,
)

__all__ = ["ConfigError", "RunFailure", "UsageError", "main"]


def _add_which(p: argparse.ArgumentParser) -> None:
    p.add_argument("--which", choices=["teacher", "student"], default="teacher", help="which network of a checkpoint")


def _add_local_rank(p: argparse.ArgumentParser) -> None:
    # The deepspeed launcher appends --local_rank=N to the command line (after the sub-command).
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)


def _add_config_flags(p: argparse.ArgumentParser, *, default_preset: str | None = DEFAULT_PRESET) -> None:
    p.add_argument("--preset", default=default_preset,
                   help=f"preset name (mst-ds presets) or a recipe YAML path (default {DEFAULT_PRESET}; an export's "
                        "own settings when evaluating a .safetensors file)")
    _add_set_flag(p)


def _add_set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable); the value is parsed as YAML")


def _add_eval_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory/tag, run directory, timm .safetensors export or timm-folder export; omitted = random init of --preset")
    _add_which(p)
    p.add_argument("--train", required=True, help="labelled training data: shards (manifest/dir) or an ImageFolder")
    p.add_argument("--val", required=True, help="labelled validation data: shards (manifest/dir) or an ImageFolder")
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint, or runs/eval)")
    p.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch per rank")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers")
    p.add_argument("--no-cache", action="store_true", help="recompute features even if OUT/features holds them")
    p.add_argument("--force", action="store_true", help="replace a result file in --out that this command did not write")
    p.add_argument("--unknown-classes", choices=["error", "exclude"], default="error",
                   help="val classes the training data does not have (classes are matched by name): "
                        "an error, or left out and reported")


# (name, module, help, flag declarer)
COMMANDS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None]]] = []


def command(name: str, module: str, help: str):
    def deco(fn: Callable[[argparse.ArgumentParser], None]):
        COMMANDS.append((name, module, help, fn))
        return fn

    return deco


@command("presets", "mst_ds.plan", "list the presets")
def _presets(p):
    pass


def _add_study_grid_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--rows", required=required, default=None,
                   help="comma-separated presets and/or named sets (table4, lambda2, random_p, mst_vs_dino)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (0 … N-1)")
    p.add_argument("--base", default=None, help="apply each row's recipe on top of this preset (e.g. tiny); omitted = the rows as they are")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (schedules stretched to it); omitted = the rows' full schedules")
    p.add_argument("--ref", default=None, help="reference row for the differences (default: the named set's, else the first row)")


@command("plan", "mst_ds.plan", "print the resolved config, parameter counts, batches and schedules")
def _plan(p):
    _add_config_flags(p)
    p.add_argument("--study", action="store_true", help="plan a study (with --rows/--seeds/--base/--steps): grid, runs, cost")
    _add_study_grid_flags(p, required=False)
    p.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: WORLD_SIZE or 1)")
    p.add_argument("--dataset-size", type=int, default=None, help="training samples (default: manifest or data.num_samples)")
    p.add_argument("--no-model", action="store_true", help="skip building the model (parameter counts)")
    p.add_argument("--device", choices=["h100", "a100", "v100", "dcu"], default="h100",
                   help="price the run / study in GPU-hours of this device (peaks and their sources: mst_ds.cost)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense 16-bit peak (needed for dcu)")
    p.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation to price with (default: gpu_check's "
                   "measured MFU when its output is found, else an assumed 0.30, stated)")
    p.add_argument("--gpu-check", default=None, help="gpu_check's results (its --out JSONL, or its saved output; default: runs/gpu_check.jsonl if present)")
    p.add_argument("--measure-cpu", action="store_true", help="also time real training steps on this CPU (builds the model)")


@command("train", "mst_ds.train", "pre-train MST on the DeepSpeed engine (resumes automatically)")
def _train(p):
    _add_config_flags(p)
    p.add_argument("--run-dir", default=None, help="run directory (default: run.output_dir/run.name)")
    p.add_argument("--check", action="store_true", help="only validate config, data, run-directory lock and resume, "
                   "and build DeepSpeed's CPU comm op (launch.sh runs this once before starting ranks)")
    _add_local_rank(p)


@command("export", "mst_ds.export", "export a checkpoint's backbone for timm: a .safetensors file or a timm/Hub model folder")
def _export(p):
    p.add_argument("ckpt", help="checkpoint tag directory or run directory (newest complete checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors file, or the folder of --format timm-folder")
    p.add_argument("--format", choices=["safetensors", "timm-folder"], default="safetensors",
                   help="timm-folder: config.json + model.safetensors + README.md, loaded by timm.create_model('local-dir:OUT')")
    p.add_argument("--force", action="store_true", help="replace existing targets even if they are not an earlier export")
    _add_which(p)


@command("knn", "mst_ds.eval.knn", "weighted k-NN evaluation (Wu et al., as DINO runs it)")
def _knn(p):
    _add_config_flags(p, default_preset=None)
    _add_eval_data_flags(p)
    p.add_argument("--k", default=None, help="comma-separated k values (default: eval.knn_k)")
    p.add_argument("--temperature", type=float, default=None, help="default: eval.knn_temperature")


@command("linear", "mst_ds.eval.linear", "linear probe on frozen features (last CLS or DINO's last-4 concat)")
def _linear(p):
    _add_config_flags(p, default_preset=None)
    _add_eval_data_flags(p)
    p.add_argument("--probe", choices=["cls", "dino"], default="dino", help="cls: last CLS token; dino: last n blocks' CLS concatenated")
    p.add_argument("--epochs", type=int, default=None, help="default: eval.linear_epochs")
    p.add_argument("--lr-sweep", default=None, help="comma-separated extra lrs (at batch 1024) trained in the same pass, one head each (default: eval.linear_lr_sweep)")
    p.add_argument("--lr-grid", default=None, help="comma-separated lrs (at batch 1024) replacing eval.linear_lr and eval.linear_lr_grid "
                   "(e.g. 0.00024 with --holdout 0: the paper's single head)")
    p.add_argument("--wd-grid", default=None, help="comma-separated weight decays (default: eval.linear_lbfgs_wd_grid for "
                   "the L-BFGS solver; eval.linear_wd_grid, each with every lr, for SGD)")
    p.add_argument("--holdout", type=float, default=None, help="fraction of the training samples held out to choose the best head "
                   "(default: eval.linear_holdout; the val set is never used to choose)")
    p.add_argument("--avgpool", action="store_true", default=None, help="append average-pooled patch tokens (default: eval.avgpool_patch_tokens)")
    p.add_argument("--no-augment", action="store_true", help="--protocol dino only: train on cached center-crop features instead of random-resized-crop + flip")
    p.add_argument("--protocol", choices=["fast", "dino"], default="fast", help="fast (default): the grid on cached, standardised "
                   "features (--solver); dino: DINO's / the paper's epochs of SGD with augmentation (resumable)")
    p.add_argument("--solver", choices=["auto", "lbfgs", "sgd"], default=None, help="--protocol fast: lbfgs solves logistic "
                   "regression per weight decay (CLIP's protocol), sgd trains the lr x wd grid (DINOv2's); auto (default: "
                   "eval.linear_solver) takes lbfgs up to eval.linear_lbfgs_max_rows training rows, sgd above")
    p.add_argument("--iters", type=int, default=None, help="--protocol fast, SGD solver: iterations (default: eval.linear_iters)")
    _add_local_rank(p)


@command("attn", "mst_ds.eval.attention", "last-layer CLS attention maps, side-by-side figures, video")
def _attn(p):
    _add_config_flags(p, default_preset=None)
    p.add_argument("inputs", nargs="+", help="image files, folders, shard manifests, or (with --video) a video file / frame folder")
    p.add_argument("--ckpt", action="append", default=[], help="model to show (repeat for model A, model B); 'random' = random init of --preset")
    _add_which(p)
    p.add_argument("--out", default="runs/attn", help="output directory")
    p.add_argument("--keep", type=float, default=0.6, help="thresholded map keeps this fraction of the attention mass")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--video", action="store_true", help="treat the input as a video / frame folder")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the assembled video (default: the source's, else 10)")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many video frames (0 = all)")


@command("report", "mst_ds.eval.report", "mean ± standard error over seeds, and training curves")
def _report(p):
    p.add_argument("run_dirs", nargs="+", help="run directories holding eval results and metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory (default: the first run's parent/report)")
    p.add_argument("--force", action="store_true", help="replace report files in --out that mst-ds report did not write")


@command("status", "mst_ds.status", "how a run (or each run of a study folder) is doing, from its directory alone")
def _status(p):
    p.add_argument("run", help="run directory, or a study folder (one row per run)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--watch", type=float, default=None, metavar="S",
                   help="print it again every S seconds until every run has finished, was preempted or failed")


@command("study", "mst_ds.study", "the paper's ablations: rows × seeds trained, evaluated, tabulated (resumable)")
def _study(p):
    _add_study_grid_flags(p, required=True)
    _add_set_flag(p)  # applies to every run of the study
    p.add_argument("--train", required=True, help="training shards (pre-training and the k-NN bank)")
    p.add_argument("--val", required=True, help="held-out shards (k-NN / linear evaluation)")
    p.add_argument("--out", required=True, help="study folder: recipes/, runs/, logs/, table.md/json/png")
    p.add_argument("--cpu", type=int, default=None, help="train each run on N local CPU processes (launch.sh --cpu N)")
    p.add_argument("--launcher", default=None, help="launch.sh arguments for each run, e.g. '--hostfile H --nodes 4 --gpus-per-node 8'")
    p.add_argument("--linear", action="store_true", help="also train the linear probe (last-layer CLS) of every run")


@command("demo", "mst_ds.demo", "end to end on real images on CPU: shards, pre-training, k-NN, figures")
def _demo(p):
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="pre-training optimizer steps (default: the demo's budget)")
    p.add_argument("--procs", type=int, default=2, help="DeepSpeed CPU processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mst-ds", description="MST pre-training and evaluation on DeepSpeed")
    # `deepspeed --module mst_ds.cli` puts --local_rank=N before the sub-command.
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help, declare in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        declare(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except ConfigError as err:
        return error_exit(str(err))
    except RunFailure as err:
        return error_exit(str(err), 1)
    except KeyboardInterrupt:
        return error_exit("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
