"""DeepSpeed engine overhead vs plain PyTorch, and ZeRO's optimizer-state partitioning, on CPU.

1. Step time (1 process): the same MST model, batch, AdamW groups and clipping, trained by a plain
   PyTorch loop and by the DeepSpeed engine at ZeRO-1 and ZeRO-2 (fp32), side by side → ratio
   DeepSpeed ÷ plain (target ≤ 1.10). Two models: the tiny preset and a DeiT-S-shaped MST (12 blocks,
   dim 384, 6 heads, DINO head with 65,536 prototypes) at a small batch and small views.
2. Memory (2 processes, torchrun): per rank, the bytes of optimizer state (AdamW moments), gradients
   and parameters at ZeRO-0 / 1 / 2 for the DeiT-S-shaped model, plus peak RSS. ZeRO-1/2 should hold
   ≈ 1/world of the ZeRO-0 optimizer state.

    python bench/engine_overhead.py [--quick]

Timings are printed, never asserted. The first engine start may JIT-build DeepSpeed's CPU comm op.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import bench_line  # noqa: E402

from mst_ds import engine as eng  # noqa: E402
from mst_ds.config import derive, load_config  # noqa: E402
from mst_ds.host_memory import keep_freed_memory  # noqa: E402

MODELS = {
    "tiny": ("tiny", ["optim.batch_size=16"]),
    # DeiT-S shape (ViT-S/16 + the paper's DINO head) on 64-px globals / 32-px locals so a CPU step
    # takes seconds, not minutes; the optimizer still carries all ~39 M parameters.
    "deit_s": ("mst_deit_s_100ep", ["optim.batch_size=4", "augment.global_crop_size=64", "augment.local_crop_size=32",
                                    "augment.n_local_crops=2", "model.timm_kwargs={img_size: 64}",
                                    "model.drop_path_rate=0.0", "decoder.channels=[64,32,16,16]"]),
}
COMMON = ["engine.precision=fp32", "run.schedule_steps=1000", "data.num_workers=0"]


def _views(cfg, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.augment.global_crop_size] * 2 + [cfg.augment.local_crop_size] * cfg.augment.n_local_crops
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def _config(name: str, stage: int):
    preset, sets = MODELS[name]
    return load_config(preset, [*sets, *COMMON, f"engine.zero_stage={stage}"]).config


class PlainTrainer:
    """Plain PyTorch: forward (teacher inside), backward, global-norm clip, AdamW step."""

    label = "plain"

    def __init__(self, name: str) -> None:
        from mst_ds.model.mst import MSTModel

        self.cfg = _config(name, 0)
        torch.manual_seed(0)
        self.model = MSTModel.from_config(self.cfg)
        self.teacher = self.model.make_teacher()
        self.opt = torch.optim.AdamW(eng.param_groups(self.model), lr=1e-4)
        self.batch = derive(self.cfg, 1, 10**6).micro_batch

    def forward(self, i: int) -> torch.Tensor:
        return self.model(_views(self.cfg, self.batch, i), self.teacher, 0.04)["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class EngineTrainer(PlainTrainer):
    """The DeepSpeed engine at a ZeRO stage: engine(...), engine.backward, engine.step (same groups)."""

    def __init__(self, name: str, stage: int) -> None:
        from mst_ds.model.mst import MSTModel

        self.label = f"ZeRO-{stage}"
        self.cfg = _config(name, stage)
        derived = derive(self.cfg, 1, 10**6)
        torch.manual_seed(0)
        model = MSTModel.from_config(self.cfg)
        self.teacher = model.make_teacher()
        self.engine, _ = eng.build_engine(model, self.cfg, derived, "fp32")
        self.batch = derived.micro_batch

    def forward(self, i: int) -> torch.Tensor:
        return self.engine(_views(self.cfg, self.batch, i), self.teacher, 0.04)["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def time_interleaved(trainers: list, warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds of forward / backward / step per trainer; the trainers take turns step by step
    so that load from other processes on the machine hits all of them alike."""
    times = {t.label: {"forward": [], "backward": [], "step": []} for t in trainers}
    for i in range(warmup + steps):
        for t in trainers:
            t0 = time.perf_counter()
            loss = t.forward(i)
            t1 = time.perf_counter()
            t.backward(loss)
            t2 = time.perf_counter()
            t.step()
            t3 = time.perf_counter()
            if i >= warmup:
                for k, v in zip(("forward", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2)):
                    times[t.label][k].append(v)
    out = {}
    for label, phases in times.items():
        out[label] = {k: statistics.median(v) for k, v in phases.items()}
        out[label]["total"] = statistics.median([sum(x) for x in zip(*phases.values())])
    return out


# --------------------------------------------------------------------------------------------------
# Memory per rank (worker mode, launched by torchrun)
# --------------------------------------------------------------------------------------------------
def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def memory_worker(stage: int, out: str) -> None:
    from mst_ds.model.mst import MSTModel

    rank, world = eng.init_distributed()
    cfg = _config("deit_s", stage)
    derived = derive(cfg, world, 10**6)
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    engine, _ = eng.build_engine(model, cfg, derived, "fp32")
    for i in range(2):
        loss = engine(_views(cfg, derived.micro_batch, i), teacher, 0.04)["loss"]
        engine.backward(loss)
        engine.step()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = sum(_tensor_bytes(s) for s in base.state.values())
    params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    row = {"rank": rank, "world": world, "stage": stage, "optimizer_state_mb": state / 2**20,
           "params_mb": params / 2**20, "n_params": sum(p.numel() for p in engine.module.parameters()),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(f"{out}.rank{rank}").write_text(json.dumps(row))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_table(procs: int = 2) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2):
            out = f"{tmp}/mem{stage}"
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                   str(_port()), __file__, "--memory-worker", str(stage), "--out", out]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker ZeRO-{stage} failed: {res.stderr[-2000:]}")
            rows += [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(procs)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: OpenMP spin-waits make multi-thread timings erratic on a shared machine)")
    ap.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.out)
        return
    warmup, steps = (1, 4) if args.quick else (2, 10)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training on CPU does (mst_ds.trainer), for the plain loop and the engine alike
    eng.init_distributed()
    print(f"torch threads {torch.get_num_threads()}, {warmup} warm-up + {steps} timed steps, interleaved; "
          "median s/step (forward / backward / step)\n")
    print(f"{'model':7} {'plain':>22} {'ZeRO-1':>22} {'÷ plain':>7} {'ZeRO-2':>22} {'÷ plain':>7}")
    for name in MODELS:
        r = time_interleaved([PlainTrainer(name), EngineTrainer(name, 1), EngineTrainer(name, 2)], warmup, steps)
        cell = {k: f"{v['total']:.3f} ({v['forward']:.2f}/{v['backward']:.2f}/{v['step']:.2f})" for k, v in r.items()}
        plain = r["plain"]["total"]
        print(f"{name:7} {cell['plain']:>22} {cell['ZeRO-1']:>22} {r['ZeRO-1']['total'] / plain:7.2f} "
              f"{cell['ZeRO-2']:>22} {r['ZeRO-2']['total'] / plain:7.2f}", flush=True)
        for stage in ("ZeRO-1", "ZeRO-2"):
            bench_line(f"DeepSpeed {stage} / plain PyTorch step ({name})", r[stage]["total"] / plain, "<=", 1.10)

    print("\nDeiT-S-shaped MST, 2 processes (torchrun, gloo), per rank after 2 steps:")
    rows = memory_table()
    ref = statistics.mean(r["optimizer_state_mb"] for r in rows if r["stage"] == 0)
    print(f"{'ZeRO':>4} {'rank':>4} {'params M':>9} {'optim state MiB':>16} {'÷ ZeRO-0':>9} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['stage']:>4} {r['rank']:>4} {r['n_params'] / 1e6:9.2f} {r['optimizer_state_mb']:16.1f} "
              f"{r['optimizer_state_mb'] / ref:9.2f} {r['peak_rss_mb']:13.0f}")
    z2 = statistics.mean(r["optimizer_state_mb"] for r in rows if r["stage"] == 2)
    # ZeRO partitions for real: each of 2 ranks holds about half the optimizer state.
    bench_line("optimizer state per rank, ZeRO-2 / ZeRO-0 (2 ranks; ≈ 0.5 expected)", z2 / ref, "<=", 0.55)


if __name__ == "__main__":
    main()
