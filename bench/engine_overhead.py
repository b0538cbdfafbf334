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

from mst_ds import engine as eng  # noqa: E402
from mst_ds.config import derive, load_config  # noqa: E402

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


def _time_steps(step_fn, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step_fn(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step_fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_step_time(name: str, warmup: int, steps: int) -> float:
    """Plain PyTorch: forward (teacher inside), backward, global-norm clip, AdamW step."""
    from mst_ds.model.mst import MSTModel

    cfg = _config(name, 0)
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    opt = torch.optim.AdamW(eng.param_groups(model), lr=1e-4)
    batch = derive(cfg, 1, 10**6).micro_batch

    def step(i: int) -> None:
        loss = model(_views(cfg, batch, i), teacher, 0.04)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, warmup, steps)


def engine_step_time(name: str, stage: int, warmup: int, steps: int) -> float:
    """The DeepSpeed engine at ZeRO ``stage``: engine(...), engine.backward, engine.step."""
    from mst_ds.model.mst import MSTModel

    cfg = _config(name, stage)
    derived = derive(cfg, 1, 10**6)
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    engine, _ = eng.build_engine(model, cfg, derived, "fp32")

    def step(i: int) -> None:
        loss = engine(_views(cfg, derived.micro_batch, i), teacher, 0.04)["loss"]
        engine.backward(loss)
        engine.step()

    return _time_steps(step, warmup, steps)


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
    ap.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.out)
        return
    warmup, steps = (1, 3) if args.quick else (2, 8)
    eng.init_distributed()
    print(f"torch threads {torch.get_num_threads()}, {warmup} warm-up + {steps} timed steps (median)\n")
    print(f"{'model':8} {'plain s/step':>13} {'ZeRO-1':>9} {'ratio':>6} {'ZeRO-2':>9} {'ratio':>6}")
    for name in MODELS:
        plain = plain_step_time(name, warmup, steps)
        z1 = engine_step_time(name, 1, warmup, steps)
        z2 = engine_step_time(name, 2, warmup, steps)
        print(f"{name:8} {plain:13.3f} {z1:9.3f} {z1 / plain:6.2f} {z2:9.3f} {z2 / plain:6.2f}", flush=True)

    print("\nDeiT-S-shaped MST, 2 processes (torchrun, gloo), per rank after 2 steps:")
    rows = memory_table()
    ref = statistics.mean(r["optimizer_state_mb"] for r in rows if r["stage"] == 0)
    print(f"{'ZeRO':>4} {'rank':>4} {'params M':>9} {'optim state MiB':>16} {'÷ ZeRO-0':>9} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['stage']:>4} {r['rank']:>4} {r['n_params'] / 1e6:9.2f} {r['optimizer_state_mb']:16.1f} "
              f"{r['optimizer_state_mb'] / ref:9.2f} {r['peak_rss_mb']:13.0f}")


if __name__ == "__main__":
    main()
