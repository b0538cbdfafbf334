"""Weighted k-NN evaluation (Wu et al. 2018, as DINO's ``eval_knn.py`` runs it) [S §4, SPEC §4].

Protocol (DINO ``knn_classifier``): L2-normalised features; for each val sample the k train samples
of highest cosine similarity; each neighbour votes for its label with weight ``exp(sim / T)``; classes
ranked by summed weight; top-1 and top-5 (top-min(5, k)).

What differs from DINO's code, and why:

* **Bounded memory.** DINO multiplies 1/100 of the val rows by *all* train features (500 × 1.28 M
  floats = 2.5 GB on ImageNet) and builds a (rows · k × classes) one-hot. Here similarities exist only
  as (``query_rows`` × cols) blocks of at most ``max_chunk_elements`` (default 4 M floats = 16 MB): each
  block's top-k is merged into a running top-k per val row, and the vote uses a (rows × classes)
  table, so memory does not grow with the train set.
* **One pass for every k.** The neighbours of the largest k are found once; smaller k use a prefix
  (exact, because the neighbour order below is a total order). DINO recomputes everything per k.
* **Deterministic ties.** ``torch.topk`` leaves the choice among equal similarities unspecified, so
  a chunked run could disagree with an unchunked one. Neighbours are ordered by (similarity
  descending, train index ascending); classes by (summed weight descending, class index ascending);
  weights (float64) are added to the class table one neighbour rank at a time, so two classes with
  the same multiset of similarities tie exactly and the lower class index wins. As in DINO, classes
  with no votes still fill the top-5 ranking (in class order) when fewer than five classes got votes.
  The block shape does not change the result; BLAS may still round a similarity's last bit
  differently for different block shapes, which can matter only for near-exact ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mst_ds.config import UsageError, parse_positive_list

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # similarity-block budget: 4 M elements (16 MB in float32)
RESULT = "knn.json"  # in --out; replaced only when it records "command": "knn" (else --force)
QUERY_ROWS = 256  # val rows per block when the budget allows: one pass over the train tiles serves them all
TIE_FIX_ELEMENTS = 1 << 21  # similarities re-examined at once for rows with a tie at the k-th place


# --------------------------------------------------------------------------------------------------
# Neighbour search
# --------------------------------------------------------------------------------------------------
def topk_ordered(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row under the total order (value desc, column index asc).

    sim: (R, N) → (values (R, k), indices (R, k) long), each row sorted by that order.
    ``torch.topk`` of k+1 tells whether the k-th value has an equal outside the selection (the only
    case where topk's unspecified tie choice matters); those rare rows are redone by taking the
    lowest-index equals. No (R, N)-sized temporary is created except for such rows.
    """
    n = sim.shape[1]
    values, indices = sim.topk(min(k + 1, n), dim=1, largest=True, sorted=True)
    if k < n:
        tie_rows = (values[:, k] == values[:, k - 1]).nonzero().flatten()
        values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
        group = max(1, TIE_FIX_ELEMENTS // n)
        for g in range(0, tie_rows.numel(), group):
            rows = tie_rows[g:g + group]
            s, t = sim[rows], values[rows, k - 1:k]
            above = s > t
            equal = s == t
            need = k - above.sum(1, keepdim=True, dtype=torch.int32)
            chosen = above | (equal & (equal.cumsum(1, dtype=torch.int32) <= need))  # exactly k per row
            idx = chosen.nonzero()[:, 1].view(-1, k)  # nonzero is row-major: ascending columns
            indices[rows] = idx
            values[rows] = s.gather(1, idx)
    # Canonical order inside the selection: by index, then a stable sort by value (descending).
    by_index = indices.argsort(dim=1)
    indices, values = indices.gather(1, by_index), values.gather(1, by_index)
    by_value = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), indices.gather(1, by_value)


def _rows_per_chunk(cols: int, max_chunk_elements: int) -> int:
    return max(1, max_chunk_elements // max(1, cols))


def block_shape(n_train: int, max_chunk_elements: int, query_rows: int = QUERY_ROWS) -> tuple[int, int]:
    """(val rows, train columns) of one similarity block: about ``max_chunk_elements`` in all, with
    ``query_rows`` val rows per block where possible so each pass over the train features serves many."""
    cols = min(n_train, max(1, max_chunk_elements // query_rows))
    return _rows_per_chunk(cols, max_chunk_elements), cols


def merge_candidates(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of per-tile candidates under (value desc, train index asc).

    values / indices: (R, M) candidates, indices global and distinct per row → (R, k) each.
    Sorting the candidates by index first makes the column order of :func:`topk_ordered` the
    train-index order, so its tie rule carries over.
    """
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    top_values, pos = topk_ordered(values, k)
    return top_values, indices.gather(1, pos)


def nearest_neighbours(train: Tensor, val: Tensor, k: int, *,
                       max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                       query_rows: int = QUERY_ROWS) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours of every val row among the train rows.

    train (Nt, D), val (Nv, D): L2-normalised → (sims (Nv, k), train indices (Nv, k)), ordered as
    :func:`topk_ordered`. Only a (rows × cols) block of similarities exists at a time: the top-k
    of each train tile is kept and the tiles' candidates merged, so the result is the same as the
    top-k of full rows.
    """
    n_train = train.shape[0]
    rows, cols = block_shape(n_train, max_chunk_elements, query_rows)
    sims, idxs = [], []
    for start in range(0, val.shape[0], rows):
        query = val[start:start + rows]
        best_v = best_i = None
        for t0 in range(0, n_train, cols):
            block = query @ train[t0:t0 + cols].t()  # (rows, cols)
            v, i = topk_ordered(block, min(k, block.shape[1]))
            del block
            i += t0
            if best_v is None:
                best_v, best_i = v, i
            else:  # running top-k: memory stays (rows, 2k) however many tiles
                best_v, best_i = merge_candidates(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1),
                                                  min(k, best_v.shape[1] + v.shape[1]))
        sims.append(best_v)
        idxs.append(best_i)
    return torch.cat(sims), torch.cat(idxs)


# --------------------------------------------------------------------------------------------------
# Weighted vote
# --------------------------------------------------------------------------------------------------
def vote(neighbour_sims: Tensor, neighbour_labels: Tensor, ks: list[int], temperature: float,
         num_classes: int, *, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[int, Tensor]:
    """Classes ranked by weighted vote, for each k.

    neighbour_sims / neighbour_labels: (Nv, kmax) in neighbour order → {k: (Nv, min(5, C)) class
    indices, best first}. Weights exp(sim / T) in float64 are added to a (rows, C) score table one
    neighbour rank at a time (so each class's weights are summed in neighbour order, and the table
    after rank k is the k-NN vote: one pass serves every k). Rows per pass keep the table, and the
    sort that ranks it, within ``max_chunk_elements`` float32-equivalents.
    """
    kmax = max(ks)
    n_val = neighbour_sims.shape[0]
    top = min(5, num_classes)
    # The float64 table and its sort (values, int64 indices, scratch): ~8 float32 slots per class.
    rows = _rows_per_chunk(8 * num_classes, max_chunk_elements)
    wanted = set(ks)
    ranked: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, n_val, rows):
        labels = neighbour_labels[start:start + rows, :kmax]
        weights = (neighbour_sims[start:start + rows, :kmax].double() / temperature).exp()
        scores = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=weights.device)
        for r in range(kmax):
            scores.scatter_add_(1, labels[:, r:r + 1], weights[:, r:r + 1])
            if r + 1 in wanted:
                order = scores.sort(dim=1, descending=True, stable=True).indices
                ranked[r + 1].append(order[:, :top].clone())  # a view would keep all (rows, C) alive
    return {k: torch.cat(v) for k, v in ranked.items()}


@dataclass
class KNNResult:
    top1: dict[int, float]  # k → percent
    top5: dict[int, float]
    predictions: dict[int, Tensor] = field(repr=False)  # k → (Nv, min(5, C)) ranked classes

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.top1:
            out[f"knn_k{k}_top1"] = self.top1[k]
            out[f"knn_k{k}_top5"] = self.top5[k]
        return out


def normalize_(feats: Tensor) -> Tensor:
    """L2-normalise rows in place (no second copy of 1.28 M × D features), as F.normalize does."""
    return feats.div_(feats.norm(p=2, dim=1, keepdim=True).clamp_min_(1e-12))


def check_features(name: str, feats: Tensor) -> None:
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise UsageError(f"{name}: expected a non-empty (N, D) feature matrix, got shape {tuple(feats.shape)}")
    rows = _rows_per_chunk(feats.shape[1], DEFAULT_CHUNK_ELEMENTS)  # isfinite makes full-size temporaries
    for s in range(0, feats.shape[0], rows):
        if not bool(torch.isfinite(feats[s:s + rows]).all()):
            raise UsageError(f"{name}: features contain NaN/inf (a diverged checkpoint?)")


@torch.no_grad()
def weighted_knn(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 ks: list[int], temperature: float = 0.07, num_classes: int | None = None, *,
                 max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, query_rows: int = QUERY_ROWS,
                 normalized: bool = False) -> KNNResult:
    """Weighted k-NN top-1/top-5 (percent) for every k.

    train_feats (Nt, D), train_labels (Nt,) long, val_feats (Nv, D), val_labels (Nv,) long. Features
    are L2-normalised here (into copies) unless ``normalized`` says they already are (see
    :func:`normalize_`); computation runs in the features' dtype on their device.
    """
    check_features("train features", train_feats)
    check_features("val features", val_feats)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise UsageError(f"k must be positive integers (got {ks})")
    if ks[-1] > train_feats.shape[0]:
        raise UsageError(f"k={ks[-1]} exceeds the {train_feats.shape[0]} training samples")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    train = train_feats if normalized else F.normalize(train_feats, dim=1, p=2)
    val = val_feats if normalized else F.normalize(val_feats, dim=1, p=2)
    train_labels = train_labels.to(train.device).long()
    val_labels = val_labels.to(val.device).long()
    sims, idx = nearest_neighbours(train, val, ks[-1], max_chunk_elements=max_chunk_elements, query_rows=query_rows)
    ranked = vote(sims, train_labels[idx], ks, temperature, num_classes, max_chunk_elements=max_chunk_elements)
    top1, top5 = {}, {}
    n = val_labels.shape[0]
    for k in ks:
        correct = ranked[k] == val_labels[:, None]
        top1[k] = 100.0 * float(correct[:, 0].sum()) / n
        top5[k] = 100.0 * float(correct[:, : min(5, k)].any(1).sum()) / n
    return KNNResult(top1=top1, top5=top5, predictions=ranked)


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------
def parse_ks(text: str | None, default: list[int]) -> list[int]:
    return parse_positive_list(text, default, int, "--k")


def print_table(result: KNNResult, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title)
    table = Table()
    table.add_column("k", justify="right")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    for k in result.top1:
        table.add_row(str(k), f"{result.top1[k]:.2f}", f"{result.top5[k]:.2f}")
    console.print(table)


def run(args) -> int:
    from mst_ds.eval import features as fx

    with fx.EvalContext.from_args(args, results={RESULT: "knn"}) as ctx:  # holds --out for the command's life
        return _knn(args, ctx)


def _knn(args, ctx) -> int:
    from mst_ds.eval import features as fx

    ks = parse_ks(args.k, ctx.cfg.eval.knn_k)
    temperature = args.temperature if args.temperature is not None else ctx.cfg.eval.knn_temperature
    if temperature <= 0 or not math.isfinite(temperature):
        raise UsageError(f"--temperature must be positive (got {temperature})")
    backbone = ctx.backbone()
    spec = fx.FeatureSpec(n_last_blocks=1, avgpool=False)
    train = ctx.features(backbone, args.train, spec, split="train")
    val = ctx.features(backbone, args.val, spec, split="val")
    if not ctx.is_main:
        ctx.finish()
        return 0
    val, matched = ctx.match(train.classes, val, train_source=args.train, val_source=args.val)
    num_classes = train.num_classes
    check_features("train features", train.feats)
    check_features("val features", val.feats)
    dev = ctx.dist.device  # the similarity search runs where the backbone ran (a GPU when there is one)
    result = weighted_knn(normalize_(train.feats.to(dev)), train.labels, normalize_(val.feats.to(dev)), val.labels,
                          ks, temperature, num_classes, normalized=True)
    record = {
        "command": "knn",
        **ctx.describe(),
        "temperature": temperature,
        "n_train": int(train.feats.shape[0]),
        "n_val": int(val.feats.shape[0]),
        "feature_dim": int(train.feats.shape[1]),
        "num_classes": num_classes,
        "val_classes": sorted({train.classes[c] for c in val.labels.tolist()}),
        **matched.describe(),
        "corrupt_samples": {"train": train.corrupt, "val": val.corrupt},
        "results": {str(k): {"top1": result.top1[k], "top5": result.top5[k]} for k in result.top1},
        "metrics": result.metrics(),
    }
    path = Path(ctx.out_dir) / RESULT
    fx.write_json(path, record)
    print_table(result, f"weighted k-NN (T={temperature}) — {ctx.model_label}")
    print(f"results: {path}")
    ctx.finish()
    return 0
