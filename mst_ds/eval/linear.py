"""Linear probe on a frozen backbone [S §5].

**Default protocol (``--protocol fast``)** — a probe that converges at every scale (issue 32): the
center-crop features of the training data are extracted once (cached on disk) and standardised with the
training rows' mean and std (an affine map a linear head could absorb: it only conditions the problem).
Two solvers (``--solver``, ``eval.linear_solver``):

* ``lbfgs`` — CLIP's protocol: multinomial logistic regression, mean cross-entropy + wd/2 ‖W‖², solved
  by full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search, at most
  ``eval.linear_lbfgs_iters`` iterations) for every weight decay of ``eval.linear_lbfgs_wd_grid``
  (:func:`lbfgs_grid`). Convex, so no lr and no schedule: the number is the features', not the
  optimizer's; what scikit-learn's ``LogisticRegression`` computes. (The weakest decays may stop at the
  iteration cap before their optimum; each cell records the iterations it ran.)
* ``sgd`` — DINOv2's protocol: the whole lr × weight-decay grid trains *together* as one batched tensor
  (:func:`train_grid`: one (H, F, C) weight, each head its own lr, decay and momentum buffer, gradients
  in closed form so a head's step involves only its own weights) for a budget of **iterations**, not
  epochs (``eval.linear_iters``, cosine to 0; DINOv2 trains 12,500 over cached features): the same
  budget whether the training set has 1,400 or 1.3 M rows.
* ``auto`` (default) — ``lbfgs`` up to ``eval.linear_lbfgs_max_rows`` training rows (60,000: the
  digits, MNIST, CIFAR), where full passes are cheap and SGD's minibatch noise and the choice among ~17
  near-equal lr cells cost 1–5 points (measured on the digits, README, Evaluation); ``sgd`` above
  (IN-100, ImageNet), where full-batch passes are what a GPU-less evaluation cannot afford and SGD has
  the rows to converge. An lr flag (``--lr-grid``, ``--lr-sweep``) asks for ``sgd``.

Either way the cell is chosen on held-out training rows and then retrained on all of them (below).

**``--protocol dino``** — DINO's / the paper's protocol, as before:

* Input: ``--probe cls`` the last layer's class token; ``--probe dino`` the final-norm class tokens of
  the last ``eval.n_last_blocks`` (4) blocks concatenated; ``--avgpool`` appends the average-pooled
  patch tokens.
* A linear layer (DINO's ``LinearClassifier``: weights N(0, 0.01), bias 0), SGD momentum 0.9, weight
  decay 0, lr = ``eval.linear_lr`` × global batch / 1024 [S §5: 0.00024 at batch 1024], cosine over the
  epochs stepped once per epoch (``CosineAnnealingLR(T_max=epochs, eta_min=0)``, as DINO), 100 epochs,
  RandomResizedCrop + flip on train, single center crop on val (top-1 of the final epoch).
* **A grid of heads in one pass** (DINOv2's linear evaluation): every lr of ``eval.linear_lr_grid``
  (plus ``eval.linear_lr`` and ``--lr-sweep``) × every weight decay of ``eval.linear_wd_grid`` is one
  head on the same features. Every head has its own optimizer, starts from the same initial weights,
  and its loss, gradient and step involve only its own parameters (gradients are all-reduced
  element-wise), so a head that diverges (a non-finite loss marks it and it stops) cannot change any
  other head: each head's trajectory is bit-identical to training it alone.
* **The best head is chosen on held-out training data, never on val**: a fraction
  ``eval.linear_holdout`` (10 %) of the training samples, picked by a seeded hash of the sample key (so
  the split does not depend on ranks, workers or order), is left out of training; every head is scored
  on their center-crop features and the best there is reported on val, with the whole grid. (The
  held-out features come from one center-crop pass over the training data, cached.) ``--holdout 0
  --lr-grid 0.00024`` is the paper's single-head protocol on all training data.
* Multi-process through the same launcher as training (``deepspeed``/``torchrun``): each rank reads its
  part of the data, head gradients are averaged with one all-reduce per step (DDP's rule).
* **Resumable**: heads, optimizers and the epoch are saved to ``OUT/linear_<probe>_state.pt`` after every
  epoch; a new run with the same settings continues from there (the data order and augmentations of
  an epoch are seeded by (seed, epoch, rank), so a resumed run equals an uninterrupted one).
* ``--no-augment`` (not the paper's protocol): the center-crop train features are extracted once
  (cached on disk) and the heads train on them for all epochs — on a CPU, minutes instead of hours.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mst_ds import atomic
from mst_ds.config import UsageError, parse_positive_list
from mst_ds.eval.identity import refuse_foreign
from mst_ds.schedules import cosine_schedule

REFERENCE_BATCH = 1024  # [S §5] the lr 0.00024 is given at batch 1024
PROTOCOLS = ("fast", "dino")
SOLVERS = ("auto", "lbfgs", "sgd")
WRITER = "mst-ds linear"  # the marker of the result files this command writes (and may replace)


class LinearHead(nn.Module):
    """DINO's ``LinearClassifier``: (B, F) → (B, C) logits."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.01, generator=generator)
            self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / REFERENCE_BATCH


class HeadBank:
    """Several linear heads on the same features, each with its own SGD optimizer, lr and weight decay."""

    def __init__(self, dim: int, num_classes: int, lrs: list[float], *, wds: list[float] | None = None,
                 momentum: float = 0.9, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.lrs = list(lrs)  # peak lr of each head (already batch-scaled)
        self.wds = [0.0] * len(self.lrs) if wds is None else list(wds)
        if len(self.wds) != len(self.lrs):
            raise ValueError("one weight decay per head")
        for lr in self.lrs:
            if not 0 < lr < torch.finfo(torch.float32).max:
                raise UsageError(f"linear-probe lr {lr:g} is outside (0, float32 max)")
        for wd in self.wds:
            if not 0 <= wd < torch.finfo(torch.float32).max:
                raise UsageError(f"linear-probe weight decay {wd:g} is outside [0, float32 max)")
        self.heads: list[LinearHead] = []
        for _ in self.lrs:
            # The same generator seed for every head: identical start, whatever the sweep holds.
            self.heads.append(LinearHead(dim, num_classes, torch.Generator().manual_seed(seed)).to(device))
        self.optimizers = [torch.optim.SGD(h.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
                           for h, lr, wd in zip(self.heads, self.lrs, self.wds)]
        self.diverged = [False] * len(self.lrs)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """DINO's CosineAnnealingLR(T_max=epochs, eta_min=0) value for ``epoch``."""
        for opt, lr in zip(self.optimizers, self.lrs):
            for g in opt.param_groups:
                g["lr"] = cosine_schedule(epoch, epochs + 1, lr, 0.0)

    def train_step(self, x: Tensor, y: Tensor, dist_active: bool = False) -> list[float]:
        """One SGD step of every live head on features x (B, F), labels y (B,) → losses (nan if dead)."""
        live = [i for i, d in enumerate(self.diverged) if not d]
        losses = torch.full((len(self.heads),), float("nan"), dtype=torch.float64)
        for i in live:
            self.optimizers[i].zero_grad(set_to_none=False)
            logits = self.heads[i](x)
            # A batch left empty (every sample held out) still joins the all-reduce, with zero gradient.
            loss = F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
            loss.backward()
            losses[i] = float(loss.detach())
        if dist_active:
            import torch.distributed as dist

            world = dist.get_world_size()
            grads = [p.grad for i in live for p in self.heads[i].parameters()]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)  # element-wise: a NaN stays inside its own head
                flat /= world
                off = 0
                for g in grads:
                    g.copy_(flat[off:off + g.numel()].view_as(g))
                    off += g.numel()
            dev_losses = losses.to(self.heads[0].linear.weight.device)
            dist.all_reduce(dev_losses)  # every rank marks the same heads as diverged
            losses = dev_losses.cpu() / world
        for i in live:
            if not math.isfinite(float(losses[i])):
                self.diverged[i] = True
                continue
            self.optimizers[i].step()
        return losses.tolist()

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, *, batch: int = 4096) -> list[dict[str, float | bool | None]]:
        """Top-1 / top-5 % of every head on val features x (N, F), labels y (N,)."""
        out = []
        for head, dead, lr, wd in zip(self.heads, self.diverged, self.lrs, self.wds):
            if dead:
                out.append({"lr": lr, "wd": wd, "top1": None, "top5": None, "diverged": True})
                continue
            dev = head.linear.weight.device
            c1 = c5 = 0
            for s in range(0, x.shape[0], batch):
                logits = head(x[s:s + batch].to(dev))
                t = y[s:s + batch].to(dev)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                c1 += int((top[:, 0] == t).sum())
                c5 += int((top == t[:, None]).any(1).sum())
            n = max(1, x.shape[0])
            out.append({"lr": lr, "wd": wd, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "diverged": False})
        return out

    def state_dict(self) -> dict:
        return {"lrs": self.lrs, "wds": self.wds, "heads": [h.state_dict() for h in self.heads],
                "optimizers": [o.state_dict() for o in self.optimizers], "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        for h, s in zip(self.heads, state["heads"]):
            h.load_state_dict(s)
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        self.diverged = list(state["diverged"])


def held_out(keys: list[str], fraction: float, seed: int) -> Tensor:
    """(N,) bool: the samples held out to choose the best head — a seeded hash of each sample key, so
    the split is the same whatever the ranks, workers, order or cache, and a sample never moves."""
    if fraction <= 0:
        return torch.zeros(len(keys), dtype=torch.bool)
    cut = int(fraction * 2**32)
    return torch.tensor([int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:4], "big") < cut
                         for k in keys], dtype=torch.bool)


def choose(scores: list[dict]) -> int | None:
    """Index of the best live head by top-1 (the first of equals, in grid order); None if all diverged."""
    live = [i for i, h in enumerate(scores) if not h["diverged"]]
    return max(live, key=lambda i: (scores[i]["top1"], -i)) if live else None


# --------------------------------------------------------------------------------------------------
# The fast protocol: the whole grid as one batched probe on cached features
# --------------------------------------------------------------------------------------------------
@dataclass
class GridProbe:
    """H linear heads on standardised features: weight (H, F, C), bias (H, C); ``mean``/``std`` (F,)
    from the training rows; ``diverged`` (H,) bool (a non-finite loss stops that head only)."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    lrs: list[float | None]  # None: a solver without an lr (L-BFGS)
    wds: list[float]
    diverged: Tensor
    iters_run: list[int] | None = None  # L-BFGS: the iterations each cell took (< the cap: converged)

    def logits(self, x: Tensor) -> Tensor:
        """x (B, F) raw features → (H, B, C)."""
        z = (x - self.mean) / self.std
        return torch.einsum("bf,hfc->hbc", z, self.weight) + self.bias[:, None, :]

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, *, batch: int = 4096) -> list[dict[str, float | bool | None]]:
        """Top-1 / top-5 % of every head on x (N, F), labels y (N,) — the shape HeadBank.evaluate gives."""
        H = self.weight.shape[0]
        c1 = torch.zeros(H, dtype=torch.long)
        c5 = torch.zeros(H, dtype=torch.long)
        for s in range(0, x.shape[0], batch):
            logits = self.logits(x[s:s + batch])  # (H, b, C)
            t = y[s:s + batch]
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, b, 5)
            c1 += (top[..., 0] == t).sum(dim=1)
            c5 += (top == t[None, :, None]).any(-1).sum(dim=1)
        n = max(1, x.shape[0])
        out = [{"lr": lr, "wd": wd, "top1": None, "top5": None, "diverged": True} if dead else
               {"lr": lr, "wd": wd, "top1": 100.0 * int(a) / n, "top5": 100.0 * int(b) / n, "diverged": False}
               for lr, wd, dead, a, b in zip(self.lrs, self.wds, self.diverged.tolist(), c1, c5)]
        for h, it in zip(out, self.iters_run or []):
            h["iters"] = it
        return out


def standardise(feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """feats (N, F) → (mean (F,), std (F,), standardised (N, F)) over the training rows."""
    n, dim = feats.shape
    mean = feats.mean(dim=0)
    std = feats.std(dim=0).clamp_min(1e-6) if n > 1 else torch.ones(dim)
    return mean, std, (feats - mean) / std


def lbfgs_grid(feats: Tensor, labels: Tensor, num_classes: int, wds: list[float], *, max_iters: int) -> GridProbe:
    """Every weight decay of the grid solved, one after another: multinomial logistic
    regression on the standardised feats (N, F), labels (N,), minimising mean cross-entropy + wd/2 ‖W‖²
    (the bias not decayed: SGD's weight decay, and scikit-learn's ``C = 1 / (wd · N)``) by full-batch
    L-BFGS from zero weights, until the gradient or the step vanishes or ``max_iters`` iterations
    (:attr:`GridProbe.iters_run`; a weak decay on separable rows can reach the cap). Each cell is its own optimizer, so
    no cell changes another; a non-finite loss marks its cell diverged."""
    mean, std, z = standardise(feats)
    cells = [_lbfgs_cell(z, labels, num_classes, wd, max_iters) for wd in wds]
    return GridProbe(torch.stack([c[0] for c in cells]), torch.stack([c[1] for c in cells]), mean, std,
                     [None] * len(wds), list(wds), torch.tensor([c[2] for c in cells], dtype=torch.bool),
                     [c[3] for c in cells])


def _lbfgs_cell(z: Tensor, labels: Tensor, num_classes: int, wd: float, max_iters: int) -> tuple[Tensor, Tensor, bool, int]:
    """One weight decay: (weight (F, C), bias (C,), diverged, iterations run)."""
    w = torch.zeros(z.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iters, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, labels) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    loss = opt.step(objective)
    w, b = w.detach(), b.detach()
    dead = not (bool(torch.isfinite(loss)) and bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all()))
    return w, b, dead, int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))


def resolve_solver(solver: str, *, lr_flags: bool, n_rows: int, lbfgs_max_rows: int) -> str:
    """``auto`` → ``sgd`` when an lr flag was given (an lr grid is SGD's), else ``lbfgs`` up to
    ``lbfgs_max_rows`` training rows, else ``sgd``; an explicit solver is kept."""
    if solver != "auto":
        return solver
    if lr_flags:
        return "sgd"
    return "lbfgs" if n_rows <= lbfgs_max_rows else "sgd"


def train_grid(feats: Tensor, labels: Tensor, num_classes: int, lrs: list[float], wds: list[float], *,
               iters: int, batch_size: int, momentum: float, seed: int) -> GridProbe:
    """Every (lr, wd) head of the grid on feats (N, F), labels (N,) at once: ``iters`` SGD steps (momentum,
    weight decay added to the gradient as torch's SGD) of a batch of ``batch_size`` rows drawn by seeded
    epochs of permutations, lr cosine to 0 over the iterations. Softmax cross-entropy's gradient is
    written out (``(softmax − one-hot)ᵀ x / B``), so each head's update reads only its own weights."""
    n, dim = feats.shape
    H = len(lrs)
    mean, std, z = standardise(feats)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(H, dim, num_classes)
    weight += torch.randn(dim, num_classes, generator=gen) * 0.01  # DINO's N(0, 0.01), the same for every head
    bias = torch.zeros(H, num_classes)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lr0 = torch.tensor(lrs, dtype=torch.float32)
    wd = torch.tensor(wds, dtype=torch.float32)
    dead = torch.zeros(H, dtype=torch.bool)
    batch = min(batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    for it in range(iters):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        x, y = z[idx], labels[idx]
        logits = torch.einsum("bf,hfc->hbc", x, weight) + bias[:, None, :]  # (H, B, C)
        logp = logits.log_softmax(dim=-1)
        loss = -logp.gather(-1, y[None, :, None].expand(H, -1, 1)).mean(dim=(1, 2))  # (H,)
        dead |= ~torch.isfinite(loss)
        g = logp.exp()
        g[:, torch.arange(len(y)), y] -= 1.0
        g /= len(y)
        grad_w = torch.einsum("bf,hbc->hfc", x, g) + wd[:, None, None] * weight
        grad_b = g.sum(dim=1)
        buf_w.mul_(momentum).add_(grad_w)
        buf_b.mul_(momentum).add_(grad_b)
        lr = torch.where(dead, 0.0, lr0 * 0.5 * (1.0 + math.cos(math.pi * it / iters)))
        # a dead head's NaN weights stay its own; torch.where keeps them out of every other head
        weight = torch.where(dead[:, None, None], weight, weight - lr[:, None, None] * buf_w)
        bias = torch.where(dead[:, None], bias, bias - lr[:, None] * buf_b)
    return GridProbe(weight, bias, mean, std, list(lrs), list(wds), dead)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def feature_batches(feats: Tensor, labels: Tensor, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled per-rank batches of cached features: one seeded permutation per epoch (same on every
    rank), rank r takes every world_size-th sample, all ranks the same number of batches."""
    n = feats.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, 0)))
    per_rank = n // world_size
    mine = perm[rank::world_size][:per_rank]
    for s in range(0, per_rank, batch_size):
        idx = mine[s:s + batch_size]
        yield feats[idx], labels[idx]


def train_on_features(bank: HeadBank, feats: Tensor, labels: Tensor, *, epochs: int, batch_size: int, seed: int,
                      start_epoch: int = 0, rank: int = 0, world_size: int = 1, on_epoch_end=None) -> HeadBank:
    """The ``--no-augment`` loop (and the unit-test loop): ``epochs`` epochs on cached features."""
    dev = bank.heads[0].linear.weight.device
    for epoch in range(start_epoch, epochs):
        bank.set_epoch(epoch, epochs)
        for x, y in feature_batches(feats, labels, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size):
            bank.train_step(x.to(dev), y.to(dev), world_size > 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return bank


# --------------------------------------------------------------------------------------------------
# Augmented training data (RandomResizedCrop + flip), read every epoch
# --------------------------------------------------------------------------------------------------
def augmented_loader(source: str, cfg, *, batch_size: int, num_workers: int, epoch: int, rank: int,
                     world_size: int):
    """Per-rank loader of (images, labels, keys) with linear_train_transform for one epoch.

    ImageFolder: shuffled with DistributedSampler (seed, epoch; padded so every rank has the same
    number of batches). Shards: ``make_eval_loader`` (its fixed order; shards were shuffled when written).
    Augmentation randomness is seeded from (seed, epoch, rank) — the main process RNG and the workers'
    base seed — so an epoch is the same after a resume.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from mst_ds.data.augment import linear_train_transform
    from mst_ds.data.reader import _collate_folder, _FolderDataset, _is_imagefolder
    from mst_ds.eval.features import open_eval_data

    transform = linear_train_transform(cfg.eval.image_size, mean=cfg.augment.mean, std=cfg.augment.std)
    seed = epoch_seed(cfg.run.seed, epoch, rank)
    torch.manual_seed(seed)
    if _is_imagefolder(source):
        from torchvision.datasets import ImageFolder

        ds = _FolderDataset(Path(source), list(range(len(ImageFolder(source).samples))), transform)
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.run.seed)
        sampler.set_epoch(epoch)
        dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=_collate_folder, generator=torch.Generator().manual_seed(seed), drop_last=False)
        return ((x, y, k) for x, y, k, _ in dl)
    loader, _ = open_eval_data(source, transform=transform, batch_size=batch_size, num_workers=num_workers,
                               rank=rank, world_size=world_size)
    return iter(loader)


def synced(loader, dist_active: bool, device: torch.device) -> Iterator:
    """Stop every rank as soon as one rank runs out of batches (uneven shard splits never hang)."""
    it = iter(loader)
    while True:
        item = next(it, None)
        if dist_active:
            import torch.distributed as dist

            flag = torch.tensor([0 if item is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag) == 0:
                return
        elif item is None:
            return
        yield item


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------
def parse_lrs(text: str | None, default: list[float], flag: str = "--lr-sweep") -> list[float]:
    return parse_positive_list(text, default, float, flag)


def parse_wds(text: str | None, default: list[float]) -> list[float]:
    """``--wd-grid 0,1e-4`` → floats ≥ 0 (0 is a weight decay)."""
    return parse_positive_list(text, default, float, "--wd-grid", allow_zero=True)


def head_grid(args, cfg, solver: str = "sgd") -> tuple[list[float | None], list[float], float]:
    """(base lr at batch 1024, weight decay) of every cell of ``solver``'s grid, and the held-out fraction.

    SGD's grid is ``linear_lr`` + ``--lr-sweep`` + the lr grid (``--lr-grid`` replaces
    ``eval.linear_lr_grid`` and, given, also drops ``linear_lr``) × the weight-decay grid
    (``--wd-grid`` or ``eval.linear_wd_grid``). L-BFGS's is its weight decays alone (``--wd-grid`` or
    ``eval.linear_lbfgs_wd_grid``; the lr is None)."""
    holdout = holdout_fraction(args, cfg)
    if solver == "lbfgs":
        pairs: list[tuple[float | None, float]] = [(None, wd) for wd in lbfgs_wds(args, cfg)]
        single = "a single weight decay"
    else:
        pairs = list(itertools.product(sgd_lrs(args, cfg), sorted(set(parse_wds(args.wd_grid, cfg.eval.linear_wd_grid)))))
        single = "a single lr and weight decay"
    if holdout == 0 and len(pairs) > 1:
        raise UsageError(f"{len(pairs)} heads and no held-out training data to choose among them "
                         f"(the val set is never used to choose); give --holdout > 0 or {single}")
    return [p[0] for p in pairs], [p[1] for p in pairs], holdout


def holdout_fraction(args, cfg) -> float:
    holdout = cfg.eval.linear_holdout if args.holdout is None else args.holdout
    if not 0 <= holdout < 0.5:
        raise UsageError(f"--holdout {holdout:g}: expected a fraction in [0, 0.5)")
    return holdout


def sgd_lrs(args, cfg) -> list[float]:
    ev = cfg.eval
    if args.lr_grid is not None:
        lrs = parse_lrs(args.lr_grid, [], "--lr-grid") + parse_lrs(args.lr_sweep, [], "--lr-sweep")
    else:
        lrs = [ev.linear_lr] + parse_lrs(args.lr_sweep, ev.linear_lr_sweep) + list(ev.linear_lr_grid)
    return sorted(set(lrs))


def lbfgs_wds(args, cfg) -> list[float]:
    """Strongest decay first: with a tie on the held-out rows the simpler model is chosen."""
    return sorted(set(parse_wds(args.wd_grid, cfg.eval.linear_lbfgs_wd_grid)), reverse=True)


def solver_flag(args, cfg, fast: bool) -> str:
    """The asked solver (``--solver`` or ``eval.linear_solver``), refusing flags it would ignore."""
    asked = getattr(args, "solver", None)
    if not fast:
        if asked is not None:
            raise UsageError("--solver picks the solver of --protocol fast; --protocol dino trains SGD heads")
        return "sgd"
    solver = asked or cfg.eval.linear_solver
    if solver == "lbfgs":
        for flag, value in (("--lr-grid", args.lr_grid), ("--lr-sweep", args.lr_sweep),
                            ("--iters", getattr(args, "iters", None))):
            if value is not None:
                raise UsageError(f"{flag} sets the SGD solver's grid or budget; L-BFGS has none "
                                 "(drop it, or give --solver sgd)")
    return solver


def _settings(args, cfg, dim: int, num_classes: int, lrs: list[float], wds: list[float], holdout: float,
              global_batch: int, epochs: int) -> dict:
    return {"probe": args.probe, "dim": dim, "num_classes": num_classes, "lrs": lrs, "wds": wds,
            "holdout": holdout, "global_batch": global_batch, "epochs": epochs, "augment": not args.no_augment,
            "seed": cfg.run.seed, "train": str(args.train), "momentum": cfg.eval.linear_momentum}


# --------------------------------------------------------------------------------------------------
# What a probe state and a result were computed from; which files this command may replace
# --------------------------------------------------------------------------------------------------
def probe_identity(ctx) -> dict:
    """The network and the training data a probe was trained on: the evaluation's own identities
    (:mod:`mst_ds.eval.identity`, the reuse rule every cached result follows)."""
    return {"network": ctx.network, "train": ctx.data["train"]}


def _ours(path: Path) -> bool:
    """A result or state this command wrote (results of earlier versions carry ``command: linear``)."""
    if path.suffix == ".json":
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(rec, dict) and (rec.get("writer") == WRITER or rec.get("command") == "linear")
    from mst_ds.checkpoint import safe_load

    try:
        saved = safe_load(path)
    except Exception:  # noqa: BLE001 — any unreadable file is not ours
        return False
    return isinstance(saved, dict) and {"settings", "bank"} <= set(saved)


def run(args) -> int:
    from mst_ds.eval import features as fx

    with fx.EvalContext.from_args(args) as ctx:  # holds --out for the command's life
        return _linear(args, ctx)


def _linear(args, ctx) -> int:
    from mst_ds.eval import features as fx

    cfg = ctx.cfg
    protocol = getattr(args, "protocol", None) or "fast"
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    fast = protocol == "fast"
    if fast and args.epochs:
        raise UsageError("--epochs sets --protocol dino's budget; the default protocol's is --iters")
    result_path = Path(ctx.out_dir) / f"linear_{args.probe}.json"
    state_path = Path(ctx.out_dir) / f"linear_{args.probe}_state.pt"
    # every rank reads the same files: all refuse together, none waits for a rank that left
    for path in [result_path] if fast else [result_path, state_path]:
        refuse_foreign(path, _ours, "mst-ds linear", bool(getattr(args, "force", False)))
    avgpool = cfg.eval.avgpool_patch_tokens if args.avgpool is None else bool(args.avgpool)
    spec = fx.FeatureSpec(n_last_blocks=cfg.eval.n_last_blocks if args.probe == "dino" else 1, avgpool=avgpool)
    epochs = args.epochs or cfg.eval.linear_epochs
    iters = getattr(args, "iters", None) or cfg.eval.linear_iters
    world = ctx.dist.world_size
    global_batch = cfg.eval.linear_batch_size
    if global_batch % world:
        raise UsageError(f"eval.linear_batch_size={global_batch} is not divisible by the {world} ranks")
    solver = solver_flag(args, cfg, fast)
    # auto's choice needs the training rows: its grid is checked once it is resolved
    if solver == "auto":
        base_lrs, wds, holdout = [], [], holdout_fraction(args, cfg)
    else:
        base_lrs, wds, holdout = head_grid(args, cfg, solver)
    backbone = ctx.backbone()
    val = ctx.features(backbone, args.val, spec, split="val")
    # Center-crop train features: the training data of the fast protocol and --no-augment, and the held-out rows.
    need_train = fast or args.no_augment or holdout > 0
    train_cached = ctx.features(backbone, args.train, spec, split="train") if need_train else None
    from mst_ds.data.reader import class_names

    # The head predicts the training data's classes; val labels are matched to them by name.
    train_classes = train_cached.classes if train_cached is not None else class_names(args.train)
    val, matched = ctx.match(train_classes, val, train_source=args.train, val_source=args.val)
    num_classes = len(train_classes)
    dim = spec.dim(backbone.embed_dim)
    hold = held_out(train_cached.keys, holdout, cfg.run.seed) if train_cached is not None else None
    if hold is not None and holdout > 0 and (bool(hold.all()) or not bool(hold.any())):
        raise UsageError(f"{args.train}: {int(hold.sum())} of {len(hold)} training samples held out at "
                         f"--holdout {holdout:g}; too few samples to both train and choose")
    if fast:
        fit = ~hold
        n_fit = int(fit.sum())
        batch = min(global_batch, n_fit)
        if solver == "auto":
            solver = resolve_solver("auto", lr_flags=args.lr_grid is not None or args.lr_sweep is not None,
                                    n_rows=n_fit, lbfgs_max_rows=cfg.eval.linear_lbfgs_max_rows)
            base_lrs, wds, holdout = head_grid(args, cfg, solver)
        bank = _fit_fast(solver, train_cached.feats[fit], train_cached.labels[fit], num_classes, base_lrs, wds,
                         cfg=cfg, iters=iters, batch=batch)
    else:
        bank = _train_dino(args, ctx, cfg, spec, backbone, train_cached, hold, state_path, dim=dim,
                           num_classes=num_classes, base_lrs=base_lrs, wds=wds, holdout=holdout,
                           global_batch=global_batch, epochs=epochs)
    ctx.barrier()
    if not ctx.is_main:
        ctx.finish()
        return 0
    heads = bank.evaluate(val.feats, val.labels)
    if holdout > 0:
        on_holdout = bank.evaluate(train_cached.feats[hold], train_cached.labels[hold])
        for h, s in zip(heads, on_holdout):
            h["holdout_top1"] = s["top1"]
        pick = choose(on_holdout)
    else:
        pick = choose(heads)  # a single head (head_grid refuses more): nothing is chosen on val
    for i, (h, base) in enumerate(zip(heads, base_lrs)):
        h["base_lr"] = base
        h["chosen"] = i == pick
    best = None if pick is None else heads[pick]
    if fast and best is not None and holdout > 0:
        best = _refit(best, solver, train_cached, val, num_classes, lr=base_lrs[pick], wd=wds[pick], cfg=cfg,
                      iters=iters, global_batch=global_batch)
    if not fast:
        budget: dict = {"epochs": epochs}
    elif solver == "lbfgs":
        budget = {"solver": "lbfgs", "max_iters": cfg.eval.linear_lbfgs_iters, "standardised": True}
    else:
        budget = {"solver": "sgd", "iters": iters, "batch": batch, "standardised": True}
    record = {
        "command": "linear",
        "writer": WRITER,
        **ctx.describe(),
        "identity": probe_identity(ctx),
        "protocol": protocol,
        **budget,
        "probe": args.probe,
        "n_last_blocks": spec.n_last_blocks,
        "avgpool": spec.avgpool,
        "feature_dim": dim,
        "global_batch": global_batch,
        "augment": not fast and not args.no_augment,
        "n_val": int(val.feats.shape[0]),
        "num_classes": num_classes,
        **matched.describe(),
        "selection": {"on": "held-out training samples" if holdout > 0 else "single head",
                      "refit": bool(best and best.get("refit")),
                      "holdout_fraction": holdout, "n_holdout": 0 if hold is None else int(hold.sum()),
                      "n_train": None if train_cached is None else int(len(train_cached.labels) - int(hold.sum()))},
        "heads": heads,
        "best": best,
        "metrics": {} if best is None else {f"linear_{args.probe}_top1": best["top1"], f"linear_{args.probe}_top5": best["top5"]},
    }
    fx.write_json(result_path, record)
    if not fast:
        how = f"{epochs} epochs"
    elif solver == "lbfgs":
        how = f"full-batch L-BFGS per weight decay, at most {cfg.eval.linear_lbfgs_iters} iterations, on cached features"
    else:
        how = f"{iters} SGD iterations on cached features"
    _print_table(heads, f"linear probe ({args.probe}, {protocol}: {how}) — {ctx.model_label}")
    if best is not None:
        refit = " (retrained on all training samples)" if best.get("refit") else ""
        lr = "" if best["base_lr"] is None else f"lr {best['base_lr']:g} @1024, "
        print(f"chosen on {record['selection']['on']}: {lr}wd {best['wd']:g}{refit} → val top-1 {best['top1']:.2f} %")
    print(f"results: {result_path}")
    ctx.finish()
    return 0


def _fit_fast(solver: str, feats: Tensor, labels: Tensor, num_classes: int, base_lrs: list, wds: list[float], *,
              cfg, iters: int, batch: int) -> GridProbe:
    """The fast protocol's grid on feats (N, F), labels (N,) with ``solver`` (``lbfgs`` or ``sgd``)."""
    if solver == "lbfgs":
        return lbfgs_grid(feats, labels, num_classes, wds, max_iters=cfg.eval.linear_lbfgs_iters)
    return train_grid(feats, labels, num_classes, [scaled_lr(lr, batch) for lr in base_lrs], wds, iters=iters,
                      batch_size=batch, momentum=cfg.eval.linear_momentum, seed=cfg.run.seed)


def _refit(chosen: dict, solver: str, train, val, num_classes: int, *, lr: float | None, wd: float, cfg, iters: int,
           global_batch: int) -> dict:
    """The chosen cell retrained on every training row, the held-out ones too (scikit-learn's
    ``GridSearchCV(refit=True)``): the held-out rows only choose, and at small scale they are a tenth of
    the data. Measured on the digits (tiny, 30 steps, SGD): +0.8 point on val. ``chosen`` keeps the grid's
    numbers as ``grid_top1``/``grid_top5``; a refit that diverges leaves the grid's head."""
    batch = min(global_batch, len(train.labels))
    head = _fit_fast(solver, train.feats, train.labels, num_classes, [lr], [wd], cfg=cfg, iters=iters, batch=batch)
    score = head.evaluate(val.feats, val.labels)[0]
    if score["diverged"]:
        return chosen
    refit = {"refit": True} if solver == "lbfgs" else {"refit": True, "refit_batch": batch}
    return {**chosen, "grid_top1": chosen["top1"], "grid_top5": chosen["top5"], "top1": score["top1"],
            "top5": score["top5"], **refit, **({"refit_iters": score["iters"]} if "iters" in score else {})}


def _train_dino(args, ctx, cfg, spec, backbone, train_cached, hold, state_path: Path, *, dim: int, num_classes: int,
                base_lrs: list[float], wds: list[float], holdout: float, global_batch: int, epochs: int) -> HeadBank:
    """``--protocol dino``: every head an SGD optimizer over ``epochs`` epochs (augmented unless
    --no-augment), resumable from ``state_path`` — only when the state was trained with the same settings
    *and* on the same network and training data (:func:`probe_identity`); another one starts over."""
    from mst_ds.eval import features as fx

    world = ctx.dist.world_size
    dev = ctx.dist.device
    bank = HeadBank(dim, num_classes, [scaled_lr(lr, global_batch) for lr in base_lrs], wds=wds,
                    momentum=cfg.eval.linear_momentum, seed=cfg.run.seed, device=dev)
    settings = _settings(args, cfg, dim, num_classes, base_lrs, wds, holdout, global_batch, epochs)
    identity = probe_identity(ctx)
    start_epoch = 0
    if state_path.exists():
        from mst_ds.checkpoint import safe_load

        saved = safe_load(state_path, map_location=dev)  # weights only: never runs what the file holds
        if saved.get("settings") != settings:
            raise UsageError(f"{state_path}: saved for other settings; delete it or use another --out")
        if saved.get("identity") != identity:
            if ctx.is_main:
                print(f"{state_path}: trained on another network or training data; starting the probe over")
        else:
            bank.load_state_dict(saved["bank"])
            start_epoch = saved["epoch"] + 1
            if ctx.is_main:
                print(f"resuming the linear probe after epoch {saved['epoch'] + 1}/{epochs} from {state_path}")

    def save(epoch: int) -> None:
        if ctx.is_main:
            with atomic.atomic_path(state_path) as tmp:
                torch.save({"settings": settings, "identity": identity, "bank": bank.state_dict(), "epoch": epoch}, tmp)

    per_rank = global_batch // world
    if args.no_augment:
        fit = ~hold
        train_on_features(bank, train_cached.feats[fit], train_cached.labels[fit], epochs=epochs,
                          batch_size=per_rank, seed=cfg.run.seed, start_epoch=start_epoch, rank=ctx.dist.rank,
                          world_size=world, on_epoch_end=save)
        return bank
    with fx.progress_bar(ctx.is_main) as bar:
        task = bar.add_task("linear probe epochs", total=epochs, completed=start_epoch)
        for epoch in range(start_epoch, epochs):
            bank.set_epoch(epoch, epochs)
            loader = augmented_loader(args.train, cfg, batch_size=per_rank, num_workers=ctx.num_workers,
                                      epoch=epoch, rank=ctx.dist.rank, world_size=world)
            for images, labels, keys in synced(loader, ctx.dist.active, dev):
                if bool((labels < 0).any()):
                    raise UsageError(f"{args.train}: data without labels (samples with no class)")
                keep = ~held_out(list(keys), holdout, cfg.run.seed)
                x = fx.backbone_features(backbone, images[keep].to(dev, non_blocking=True), spec)
                bank.train_step(x, labels[keep].to(dev), ctx.dist.active)
            save(epoch)
            bar.advance(task)
    return bank


def _print_table(heads: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(title)
    table = Table()
    with_holdout = any("holdout_top1" in h for h in heads)
    lbfgs = any(h["base_lr"] is None for h in heads)
    first = ["wd", "L-BFGS iterations"] if lbfgs else ["lr @1024", "wd", "lr used"]
    cols = first + (["held-out top-1 %"] if with_holdout else []) + ["val top-1 %", "val top-5 %", ""]
    for col in cols:
        table.add_column(col, justify="right")
    for h in heads:
        cells = [f"{h['wd']:g}", str(h.get("iters"))] if lbfgs else [f"{h['base_lr']:g}", f"{h['wd']:g}", f"{h['lr']:g}"]
        if h["diverged"]:
            cells += ["diverged"] * (3 if with_holdout else 2)
        else:
            cells += ([f"{h['holdout_top1']:.2f}"] if with_holdout else []) + [f"{h['top1']:.2f}", f"{h['top5']:.2f}"]
        table.add_row(*cells, "← chosen" if h.get("chosen") else "")
    console.print(table)
