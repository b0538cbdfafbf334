"""What ``run.deterministic`` costs on CPU: the MST step (forward + backward) with the flag on ÷ off.

    python bench/deterministic.py [--preset tiny] [--batch 16] [--reps 9] [--set k=v ...]

One process, one intra-op thread, the same model, views and generator seed each way; on and off
alternate step by step so machine load hits both alike (thread CPU time, median). Also checks that the
loss and every gradient are bit-identical on and off (CPU kernels are deterministic either way). The GPU
cost is for ``bench/gpu_check.py`` to measure on the GPUs in use. No timing assertions: a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mst_ds import determinism  # noqa: E402
from mst_ds.config import load_config  # noqa: E402
from mst_ds.model import MSTModel  # noqa: E402


def step(model: MSTModel, teacher, views: list[torch.Tensor]) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """(CPU seconds of this thread, loss, gradients) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)  # same masks each way
    t0 = time.thread_time()
    loss = model(views, teacher, 0.04, gen)["loss"]
    loss.backward()
    spent = time.thread_time() - t0
    return spent, loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.preset, args.sets).config
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg).train()
    teacher = model.make_teacher()
    g = torch.Generator().manual_seed(0)
    a = cfg.augment
    views = [torch.randn(args.batch, 3, a.global_crop_size, a.global_crop_size, generator=g) for _ in range(2)] + [
        torch.randn(args.batch, 3, a.local_crop_size, a.local_crop_size, generator=g) for _ in range(a.n_local_crops)]
    cpu = determinism.CudaState(cuda_initialized=False, rocm=False)
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for i in range(args.reps + 1):
        for on in ((False, True) if i % 2 else (True, False)):
            determinism.apply(on, env={}, cuda=cpu)
            spent, loss, grads = step(model, teacher, views)
            if i:  # the first round warms both up
                times[on].append(spent)
            results[on] = (loss, grads)
    determinism.apply(False, env={}, cuda=cpu)
    same = torch.equal(results[True][0], results[False][0]) and all(
        torch.equal(x, y) for x, y in zip(results[True][1], results[False][1]))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"preset {args.preset} {' '.join(args.sets)} batch {args.batch}, {args.reps} steps each, 1 thread: "
          f"off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms, on/off {on / off:.3f}; "
          f"loss and gradients bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
