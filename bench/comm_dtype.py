"""Which dtype the gradient all-reduce should sum in: bf16 vs fp32 over 128 simulated ranks, on CPU.

    python bench/comm_dtype.py [--ranks 128] [--preset tiny] [--batch 8] [--quick]

Each simulated rank's gradient is a real backward of the preset's model (``MSTModel``; the same weights
on every rank, as data parallelism has; its own seed for the views and masks) rounded to bf16, as a
bf16 run holds it. Also a synthetic set: per element a shared mean plus 10× larger rank-local
noise (small per-rank batches: the noise dominates, partial sums cancel). The sums:

* fp32: every rank's bf16 gradient upcast, summed in fp32 (``communication_data_type: fp32``);
* bf16: a ring as NCCL runs it for bf16 — the partial sum travels as bf16 and each hop adds its rank's
  gradient in fp32 and rounds back to bf16 (127 roundings for 128 ranks);

each against the float64 sum of the same bf16 gradients. Printed: the relative L2 error of the whole
gradient, the median over elements of the relative error, and the worst parameter's relative L2 error;
plus, as the floor a bf16 result cannot beat, the float64 sum rounded once to bf16. A measurement, no
assertions (``engine.communication_data_type``'s description quotes it). Measured (128 ranks, tiny):

    gradients                    sum                            rel L2  median elem  worst param
    tiny MST backward (275964)   fp32 sum                     7.78e-09     0.00e+00     2.23e-08
    tiny MST backward (275964)   bf16 ring                    1.16e-02     9.40e-03     4.56e-02
    tiny MST backward (275964)   fp64 sum → bf16 (floor)      1.64e-03     1.35e-03     2.05e-03
    mean + 10× noise (1M)        fp32 sum                     5.42e-09     0.00e+00     5.42e-09
    mean + 10× noise (1M)        bf16 ring                    1.21e-02     9.70e-03     1.21e-02
    mean + 10× noise (1M)        fp64 sum → bf16 (floor)      1.66e-03     1.35e-03     1.66e-03
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mst_ds.config import load_config  # noqa: E402
from mst_ds.model import MSTModel  # noqa: E402


def model_gradients(preset: str, ranks: int, batch: int) -> tuple[torch.Tensor, list[int]]:
    """(ranks, P) bf16 gradients of one real backward per rank, and the parameters' sizes (P = Σ sizes)."""
    cfg = load_config(preset, []).config
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg).train()
    teacher = model.make_teacher()
    params = [p for p in model.parameters() if p.requires_grad]
    G, L, n_local = cfg.augment.global_crop_size, cfg.augment.local_crop_size, cfg.augment.n_local_crops
    rows = []
    for r in range(ranks):
        g = torch.Generator().manual_seed(1000 + r)
        views = [torch.randn(batch, 3, G, G, generator=g) for _ in range(2)] + [
            torch.randn(batch, 3, L, L, generator=g) for _ in range(n_local)]
        model.zero_grad(set_to_none=True)
        model(views, teacher, 0.04, torch.Generator().manual_seed(r))["loss"].backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    return torch.stack(rows).bfloat16(), [p.numel() for p in params]


def synthetic_gradients(ranks: int, n: int, noise: float = 10.0) -> tuple[torch.Tensor, list[int]]:
    """(ranks, n) bf16: a shared N(0, 1e-3²) mean plus rank-local noise ``noise``× as large."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, generator=g) * 1e-3
    return (mean + noise * 1e-3 * torch.randn(ranks, n, generator=g)).bfloat16(), [n]


def ring_sum_bf16(grads: torch.Tensor) -> torch.Tensor:
    """(ranks, P) bf16 → (P,) bf16: the partial sum travels as bf16, each hop adds in fp32 and rounds."""
    acc = grads[0].clone()
    for r in range(1, grads.shape[0]):
        acc = (acc.float() + grads[r].float()).bfloat16()
    return acc


def errors(got: torch.Tensor, ref: torch.Tensor, sizes: list[int]) -> tuple[float, float, float]:
    """(relative L2 error, median element relative error, worst parameter's relative L2 error)."""
    diff = got.double() - ref
    whole = float(diff.norm() / ref.norm())
    nz = ref != 0
    median = float((diff[nz].abs() / ref[nz].abs()).median())
    worst = max(float(d.norm() / r.norm()) for d, r in zip(diff.split(sizes), ref.split(sizes)) if r.norm() > 0)
    return whole, median, worst


def table(name: str, grads: torch.Tensor, sizes: list[int]) -> None:
    ref = grads.double().sum(0)
    rows = {
        "fp32 sum": grads.float().sum(0),
        "bf16 ring": ring_sum_bf16(grads),
        "fp64 sum → bf16 (floor)": ref.bfloat16(),
    }
    for label, got in rows.items():
        whole, median, worst = errors(got, ref, sizes)
        print(f"{name:<28} {label:<24} {whole:>12.2e} {median:>12.2e} {worst:>12.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=128)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="32 ranks (bench/run_all)")
    args = ap.parse_args()
    ranks = 32 if args.quick else args.ranks
    torch.set_num_threads(1)
    print(f"{ranks} simulated ranks; error relative to the float64 sum of the same bf16 gradients")
    print(f"{'gradients':<28} {'sum':<24} {'rel L2':>12} {'median elem':>12} {'worst param':>12}")
    grads, sizes = model_gradients(args.preset, ranks, args.batch)
    table(f"{args.preset} MST backward ({sum(sizes)})", grads, sizes)
    table("mean + 10× noise (1M)", *synthetic_gradients(ranks, 1 << 20))


if __name__ == "__main__":
    main()
