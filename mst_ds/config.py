"""Typed configuration of an MST run.

One pydantic section per component; each component builds itself from its section. The defaults
*are* the paper's DeiT-S / 100-epoch recipe (``../shared/SPEC.md`` §1–§3): every field says where its
number comes from — ``[S]`` the MST supplement, ``[P]`` the paper, ``[D]`` a DINO/iBOT default where the
paper is silent. Recipes in ``mst_ds/configs/*.yaml`` list only what differs from their ``parent``.

Numbers derived from others (peak lr from the global batch, per-rank micro-batch, steps per epoch) are
computed in :func:`derive` and nowhere else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "mst_deit_s_100ep"
EXIT_USAGE = 2
# YAML aliases may repeat a section or two; a document whose aliases expand to more values than this is
# refused (an "alias bomb": 9 references per level for 9 levels is 387 M values from 1 kB of text), and so
# is one that holds more values itself (counted while it is parsed, before anything is built from it).
MAX_YAML_VALUES = 100_000
# A recipe is a few kB and a run's resolved config.yaml ~10 kB; a config file or --set value larger than
# this is refused before it is parsed (pure-Python YAML parses ~0.1 MB/s: a 4 MB file took 46 s).
MAX_CONFIG_BYTES = 256 * 1024


class ConfigError(ValueError):
    """A config that cannot be used; ``str(err)`` is one line naming the field."""


class UsageError(ConfigError):
    """Bad input found after parsing (missing path, wrong checkpoint): one line, exit 2."""


class RunFailure(RuntimeError):
    """A failure found while running (corrupt data under policy 'error', a failed demo step): one
    line, exit 1."""


# The command line's conventions, here so that every layer can keep them without importing the CLI.
def parse_positive_list(text: str | None, default: list, kind: type, flag: str, *, allow_zero: bool = False) -> list:
    """``--flag 1,2,3`` → [kind(x) ...], all positive (or ≥ 0 with ``allow_zero``); None → ``default``.
    Bad text: one line, exit 2."""
    if text is None:
        return list(default)
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values or any(not (v >= 0 if allow_zero else v > 0) for v in values):
        raise UsageError(f"{flag} {text!r}: expected {'values ≥ 0' if allow_zero else 'positive values'}")
    return values


def error_exit(message: str, code: int = EXIT_USAGE) -> int:
    print(f"mst-ds: error: {message}", file=sys.stderr)
    return code


class Section(BaseModel):
    # No NaN or infinity anywhere: an infinite lr, temperature or warm-up length is never meant, and
    # would fail only after every rank has started (or train on NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
class DataConfig(Section):
    train: str | None = Field(None, description="Training shards: a manifest index.json, its directory, a brace pattern or pipe:/http URL list. None = synthetic/unset (plan only).")
    val: str | None = Field(None, description="Held-out shards for evaluation.")
    num_samples: int = Field(1_281_167, gt=0, description="Training-set size used when no manifest is given (ImageNet-1k train). The manifest's count wins when present.")
    num_workers: int = Field(8, ge=0, description="Loader worker processes per rank (decode + crop on CPU).")
    shuffle_buffer: int = Field(2000, ge=0, description="Samples in the seeded shuffle buffer of each worker [D].")
    corrupt_policy: Literal["count", "error"] = Field("count", description="A sample that fails to decode: count it and continue, or stop.")


class AugmentConfig(Section):
    """Multi-crop with BYOL's photometric parameters [S §2] (SwAV/DINO multi-crop)."""

    global_crop_size: int = Field(224, gt=0, description="[S §2] global views 224×224.")
    global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description="[D] DINO ViT-S RandomResizedCrop scale of global views.")
    local_crop_size: int = Field(96, gt=0, description="[D] SwAV/DINO local views 96×96.")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.4), description="[D] DINO local crop scale.")
    n_local_crops: int = Field(6, ge=0, description="[D] number of local views (DINO code uses 8; 6 keeps the step cheaper).")
    flip_p: float = Field(0.5, ge=0, le=1, description="[S] BYOL horizontal flip.")
    color_jitter: tuple[float, float, float, float] = Field((0.4, 0.4, 0.2, 0.1), description="[S] BYOL brightness, contrast, saturation, hue.")
    color_jitter_p: float = Field(0.8, ge=0, le=1, description="[S] BYOL.")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="[S] BYOL.")
    blur_p: tuple[float, float] = Field((1.0, 0.1), description="[S] BYOL Gaussian blur probability of global view 1 and 2.")
    local_blur_p: float = Field(0.5, ge=0, le=1, description="[D] DINO local-view blur probability.")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="[S] BYOL blur sigma range.")
    solarize_p: tuple[float, float] = Field((0.0, 0.2), description="[S] BYOL solarization probability of global view 1 and 2.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="ImageNet normalisation mean.")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="ImageNet normalisation std.")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="[D] DINO resize interpolation.")
    fuse_cpu: bool = Field(True, description="When the photometric stage runs on CPU, compile its element-wise steps into fused loops (torch.compile, inductor C++): bit-identical to eager, ~⅓ less photometric time at 224/96-px views (3.1 → 2.0 ms per image, one thread). The one-off compile costs ~3 s per process (~14 s on a fresh machine), so the small CPU presets turn it off. Without a C++ compiler: eager, with one warning.")


class HeadConfig(Section):
    """DINO projection head [D] (DINO ViT-S recipe, 'setting follows [2]' S §7)."""

    out_dim: int = Field(65536, gt=0, description="[D] prototypes K.")
    hidden_dim: int = Field(2048, gt=0, description="[D] MLP hidden width.")
    bottleneck_dim: int = Field(256, gt=0, description="[D] bottleneck before the weight-normalised last layer.")
    nlayers: int = Field(3, ge=1, description="[D] MLP depth.")
    use_bn: bool = Field(True, description="[S §3] BN in the head's hidden layers (SyncBN when distributed). SPEC §8: needed by small CPU models.")
    norm_last_layer: bool = Field(False, description="[D] DINO ViT-S: False (weight-norm gain trainable).")


class ModelConfig(Section):
    arch: str = Field("deit_small_patch16_224", description="[P] timm ViT name; DeiT-S = ViT-S/16.")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra kwargs for timm.create_model (e.g. img_size, patch_size, embed_dim, depth, num_heads).")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="[D] stochastic depth of the student.")
    fused_attn: bool = Field(True, description="Fused SDPA in blocks other than the last (the last always runs the explicit path to return its attention). SPEC §8: off is faster on small CPU models.")
    pos_embed_interp: Literal["dino", "timm"] = Field("dino", description="[D] how the position embedding is resampled for a view whose token grid differs from the model's (local crops; eval at another size). dino (DINO's interpolate_pos_encoding, SPEC §9): plain bicubic with scale_factor = (new + 0.1) / old, no antialias. timm (dynamic_img_size's resample_abs_pos_embed): bicubic to the exact size with antialias — 0.82 relative difference from dino on a 6 × 6 grid at init.")
    cls_token_init: Literal["dino", "timm"] = Field("dino", description="[D] dino: the class token starts as DINO's, truncated normal std 0.02 (SPEC §9). timm: timm's own init (std 1e-6), kept so runs made before the DINO-parity defaults (issue 19) reproduce bit for bit with pos_embed_interp: timm.")
    head: HeadConfig = Field(default_factory=HeadConfig)
    init_from: str | None = Field(None, description="Warm start (a fresh run only; a resume loads its checkpoint): initial weights from a timm model folder (config.json + model.safetensors), this project's .safetensors export, or a DINO-format checkpoint (.pth, read with torch.load(weights_only=True)). Optimizer and schedules start fresh; the teacher starts equal to the student. Its path and sha256 go to run_info.json and the export's model card.")
    init_from_parts: Literal["backbone", "backbone+head"] = Field("backbone", description="What init_from loads: the backbone, or the backbone and the DINO projection head (a DINO checkpoint holds one; timm exports do not).")


class MaskConfig(Section):
    """Attention-guided masking [P]; knobs and defaults [D] (SPEC §1.3)."""

    enabled: bool = Field(True, description="False = DINO baseline (no masking).")
    policy: Literal["low", "high", "hint", "random"] = Field("low", description=(
        "Which patches are candidates. low [P] = MST: the lowest-attention r·N; high = AttMask-High (Kakogeorgiou et "
        "al. 2022): the highest-attention r·N, masked at the same rate; hint = AttMask-Hint: high, then ⌊0.1·r·N⌋ "
        "patches drawn among the 10 % most attended revealed again (AttMask's show_max 0.1); random = the Table 4 "
        "ablation, every patch with probability p. The old key mask.strategy is still read (attention = low)."))
    ratio: float = Field(0.3, ge=0, le=1, description="[D] r: the lowest r·N attention patches are candidates. Unconfirmed by the paper.")
    prob: float = Field(0.5, ge=0, le=1, description="[D] p: each candidate masked with probability p (r·p ≈ 15 %, BERT's rate). For 'random', the per-patch mask probability.")
    mode: Literal["per_token", "per_image"] = Field("per_token", description="[D] per_token: each candidate independently; per_image: exactly round(r·p·N) lowest-attention candidates chosen at random.")
    heads: Literal["mean", "max"] = Field("mean", description="[D] how the last block's heads are combined.")
    replacement: Literal["mask_token", "bert"] = Field("mask_token", description="[S Table 4] mask_token = ours; bert = 80 % mask token, 10 % random token, 10 % unchanged.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_strategy(cls, data: Any) -> Any:
        """``strategy: attention | random`` (configs and run directories written before ``policy``) →
        ``policy: low | random``; both given must agree."""
        if not isinstance(data, dict) or "strategy" not in data:
            return data
        data = dict(data)
        old = data.pop("strategy")
        if old not in LEGACY_STRATEGY:
            raise ValueError(f"mask.strategy: expected attention or random (got {old!r}); the key is now mask.policy")
        if data.setdefault("policy", LEGACY_STRATEGY[old]) != LEGACY_STRATEGY[old]:
            raise ValueError(f"mask.strategy {old} and mask.policy {data['policy']} disagree "
                             "(mask.strategy is the old name of mask.policy: attention = low)")
        return data

    @property
    def attention_guided(self) -> bool:
        """True when the teacher's attention chooses the patches (every policy but random)."""
        return self.policy != "random"

    @property
    def strategy(self) -> str:
        """The pre-``policy`` name, for readers of it: attention (any attention-guided policy) or random."""
        return "attention" if self.attention_guided else "random"


# mask.strategy (before mask.policy) → mask.policy; and back for the hash of the configs it could express.
LEGACY_STRATEGY = {"attention": "low", "random": "random"}


class DecoderConfig(Section):
    """Global image decoder g [P] (SPEC §1.5): all student patch tokens → the image."""

    enabled: bool = Field(True, description="False = no restoration branch (DINO baseline).")
    kind: Literal["pixel_shuffle", "transposed_conv"] = Field("pixel_shuffle", description="[D] conv+PixelShuffle ×2 stages (cheap) or transposed convs.")
    channels: list[int] = Field(default_factory=lambda: [128, 64, 32, 16], description="[D] width of each ×2 upsampling stage; 2^len(channels) must equal the patch size. [128,64,32,16] keeps the DeiT-S MST step ≤ 1.15× the DINO step (bench/step_cost.py: 1.07–1.08×; [256,128,64,32] measured 1.17×).")
    use_bn: bool = Field(True, description="[S §3] BN + ReLU in the stages (SyncBN when distributed).")


class LossConfig(Section):
    dino_weight: float = Field(1.0, ge=0, description="[S §7] λ1, weight of the DINO self-distillation loss (v_2 in Algorithm 1).")
    restore_weight: float = Field(0.6, ge=0, description="[S §7, §10] λ2, weight of the L1 restoration loss (v_1 in Algorithm 1).")
    restore_reduction: Literal["mean", "sum_per_image", "mean_ln_k"] = Field("mean_ln_k", description=(
        "[D, chosen by measurement] L1 reduction; it fixes the balance of the two losses, which §10 calls 'roughly equally "
        "weighted' at λ2 = 0.6 (the paper's reduction is unstated; Algorithm 1's abs(p-q).sum().mean() is ambiguous). "
        "mean: mean absolute error over the pixels counted. sum_per_image: sum over each image's pixels, averaged over "
        "images (Algorithm 1 read literally; .sum() without a dim would even sum the batch). mean_ln_k (default): mean × "
        "ln K (K = model.head.out_dim). Derivation: at initialisation the student's distribution is near-uniform over the "
        "K prototypes (L2-normalised features through a weight-normalised layer: logits ≤ 1 / 0.1), so the DINO loss ≈ "
        "ln K (11.09 at K = 65536); the restoration target is a normalised image (unit variance per channel), so the mean "
        "L1 of an untrained decoder is O(1) (√(2/π) ≈ 0.80 for a zero prediction of Gaussian pixels, 0.87 measured); × ln K "
        "puts both unweighted terms at ≈ ln K. Measured shares λ2·L1 ÷ loss: at initialisation on DeiT-S (mst-ds plan "
        "--preset mst_deit_s_100ep) mean 4.5 %, sum_per_image ≈ 100 %, mean_ln_k 34 %; over a 600-step `small` run on the "
        "digits (first logged step / mean over the run / last) mean 13 / 4.6 / 1.8 % (300 steps), mean_ln_k 46 / 13 / 9 %. "
        "Only mean_ln_k keeps the two terms within an order of magnitude over a run; on digits the share still falls "
        "because black-background digits become easy to restore (L1 falls ~5×) while the DINO term falls less. mean "
        "remains as the ablation preset ablation_restore_mean; the others are rescalings of λ2 (mean_ln_k = mean with "
        "λ2 × ln K; sum_per_image = mean with λ2 × 3·H·W)."))
    restore_target: Literal["image", "masked_patches"] = Field("image", description="[S Table 4] restore the whole original image, or only masked patches (BERT-style ablation).")
    student_temp: float = Field(0.1, gt=0, description="[D] student temperature.")
    teacher_temp: float = Field(0.07, gt=0, description="[D] final teacher temperature.")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="[D] initial teacher temperature.")
    warmup_teacher_temp_epochs: float = Field(30, ge=0, description="[D] linear teacher-temperature warm-up length.")
    teacher_temp_schedule: Literal["per_epoch", "per_step"] = Field("per_epoch", description="[D] per_epoch (DINO, SPEC §9): one value per epoch, linspace(warmup_teacher_temp, teacher_temp, W) over epochs 0 … W−1 (W = warmup_teacher_temp_epochs, whole epochs), so the final value is reached at the start of epoch W−1; with run.schedule_steps an epoch is total_steps / schedule.epochs steps. per_step: linear over the warm-up steps, final value at the first step of epoch W (≤ 1e-3 apart from per_epoch at DINO's 0.04 → 0.07 over 30).")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="[D] EMA of the teacher-output center.")


class OptimConfig(Section):
    batch_size: int = Field(1024, gt=0, description="[S §7] global batch (images per optimizer step, all ranks and accumulation).")
    base_lr: float = Field(5e-4, gt=0, description="[S §7] lr per 256 images; peak lr = base_lr × batch_size / 256 (2e-3 at 1024).")
    min_lr: float = Field(1e-6, ge=0, description="[D] end of the cosine.")
    weight_decay: float = Field(0.04, ge=0, description="[S §7] initial weight decay.")
    weight_decay_end: float = Field(0.4, ge=0, description="[D] final weight decay (cosine).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (torch defaults, as DINO).")
    clip_grad: float = Field(3.0, ge=0, description="[D] gradient clipping threshold, 3.0 as DINO; how it applies: clip_mode. 0 = off.")
    clip_mode: Literal["global", "per_param"] = Field("global", description=(
        "[D] global: DeepSpeed's gradient_clipping on the norm of all gradients together. per_param: DINO's clip_gradients "
        "(SPEC §9), each parameter's gradient scaled by clip_grad / (‖g‖ + 1e-6) when that is < 1, on the rank-averaged "
        "gradient before the step, at ZeRO 0–2 (DeepSpeed's gradient_clipping is then 0); refused at ZeRO-3. Costs one "
        "all-reduce per parameter at ZeRO-1/2 (the full gradient of each parameter is assembled to take its norm). "
        "dino_official_vits16_100ep uses per_param. The MST presets keep global: the paper does not say which, and no "
        "run here measured a difference (at init on ViT-S/16 the global norm is 6.94, the largest per-parameter norm 2.16: "
        "global clips every step early on, per_param clips nothing)."))
    no_decay_rule: Literal["dino", "timm"] = Field("dino", description="[S §7 'follows [2]', D] which parameters get no weight decay. dino (DINO's get_params_groups): biases and 1-D parameters (norms) only — cls_token and pos_embed (76,032 parameters on DeiT-S) and MST's mask token (384; 76,416 with the two) are decayed. The mask token is decayed like the cls token it resembles: iBOT, which adds a mask token to DINO's code, decays it by the same rule. timm (param_groups_weight_decay): also the no_weight_decay() names — cls_token, pos_embed — and the mask token.")


class ScheduleConfig(Section):
    epochs: int = Field(100, gt=0, description="[S] 100 or 300.")
    warmup_epochs: float = Field(10, ge=0, description="[S §7] linear lr warm-up.")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="[D] initial teacher EMA momentum, cosine to momentum_teacher_end per iteration.")
    momentum_teacher_end: float = Field(1.0, ge=0, le=1, description="[D]")
    freeze_last_layer_epochs: float = Field(1, ge=0, description="[D] head last layer frozen during the first epoch(s).")


class EngineConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "bf16", "fp16", "fp32", "autocast_bf16"] = Field("auto", description="auto: bf16 where the matrix units have it (compute capability ≥ 8.0; ROCm gfx90a / gfx94x / gfx95x), fp16 with a dynamic loss scale on other GPUs (V100, gfx906/gfx908 DCUs), bf16 on CPU. A resume under another resolved precision is refused unless checkpoint.allow_config_change.")
    grad_accum_steps: int = Field(1, gt=0, description="Gradient accumulation; micro-batch = batch / (world × accumulation).")
    template: str = Field("base.json", description="DeepSpeed JSON template in ds_configs/ (engine settings only).")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="A non-finite loss stops the run (last good checkpoint kept) or skips the step.")
    sync_bn: bool = Field(True, description="[S §3] convert BN to SyncBN when world size > 1.")
    compile: bool = Field(False, description="[D] torch.compile the student through DeepSpeed's engine.compile(); off until bench/gpu_check.py measures a gain on the GPUs in use.")
    communication_data_type: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="dtype the gradient all-reduce sums in (DeepSpeed's communication_data_type; its default is the weights' dtype). fp32 as DINO: measured by bench/comm_dtype.py over 128 simulated ranks (real tiny-model gradients in bf16), a bf16 ring sum is 1.2e-2 off the exact sum (relative L2; worst parameter 4.6e-2), 7× the 1.6e-3 of rounding the exact sum once to bf16; an fp32 sum is 8e-9 off. Costs 2× the gradient traffic of bf16.")


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, description="Save every N steps (0 = only at epoch ends).")
    every_epochs: int = Field(1, ge=0, description="Save every N epochs.")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept.")
    resume: bool = Field(True, description="Resume from the newest complete checkpoint of the run directory.")
    allow_config_change: bool = Field(False, description="Resume even if the config hash differs.")


class MonitorConfig(Section):
    """Online k-NN monitor during training (issue 10): the teacher's CLS features of a labelled held-out set,
    weighted k-NN exactly as ``mst-ds knn``. Off unless ``bank`` is given."""

    bank: str | None = Field(None, description="Labelled monitor data (shards or ImageFolder): the k-NN bank; None = monitor off.")
    query: str | None = Field(None, description="Labelled query data; None = cut `bank` deterministically (crc32 of the sample key) into bank and query.")
    query_fraction: float = Field(0.2, gt=0, lt=1, description="Share of `bank` used as queries when `query` is not given.")
    every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0 = off), besides the epoch ends.")
    every_epochs: int = Field(1, ge=0, description="Evaluate at the end of every N-th epoch (0 = off). Also always at step 0 and at the last step.")
    k: int = Field(20, gt=0, description="[S §4] k of the monitored weighted k-NN (DINO's headline k=20); temperature = eval.knn_temperature.")
    batch_size: int = Field(256, gt=0, description="Feature-extraction batch per rank.")
    num_workers: int = Field(2, ge=0, description="Loader workers of the monitor data (forked at each evaluation).")


class EvalConfig(Section):
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    knn_k: list[int] = Field(default_factory=lambda: [10, 20, 100, 200], description="[S §4] k values.")
    knn_temperature: float = Field(0.07, gt=0, description="[S §4] weights exp(sim / T).")
    linear_lr: float = Field(0.00024, gt=0, description="[S §5] lr at batch 1024 (scaled linearly with the batch).")
    linear_batch_size: int = Field(1024, gt=0, description="[S §5]")
    linear_epochs: int = Field(100, gt=0, description="[S §5] epochs of `mst-ds linear --protocol dino`.")
    linear_iters: int = Field(8000, gt=0, description="SGD iterations of the default probe's sgd solver (`--protocol fast`: the "
                              "grid on cached, standardised features, then the chosen cell retrained on all training "
                              "rows). Measured on the digits (README, Evaluation): tiny 30 steps, val top-1 86.6 at 4000, "
                              "87.7 at 8000 (scikit-learn 88.3); DINOv2 trains 12,500.")
    linear_solver: Literal["auto", "lbfgs", "sgd"] = Field(
        "auto", description="Solver of the default probe (`--protocol fast`): lbfgs solves logistic regression to "
        "its optimum for every weight decay of linear_lbfgs_wd_grid (CLIP's protocol); sgd trains the lr × wd grid for "
        "linear_iters (DINOv2's); auto takes lbfgs up to linear_lbfgs_max_rows training rows, sgd above. Measured on "
        "the digits (README, Evaluation): small 60 steps, val top-1 SGD 86.4, L-BFGS 91.6, scikit-learn 90.3.")
    linear_lbfgs_max_rows: int = Field(60_000, ge=0, description="`linear_solver: auto` takes lbfgs up to this many "
                                       "training rows (the digits, MNIST, CIFAR), sgd above (IN-100, ImageNet).")
    linear_lbfgs_iters: int = Field(1000, gt=0, description="Most L-BFGS iterations (full passes) per weight decay.")
    linear_lbfgs_wd_grid: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7], min_length=1,
        description="Weight decays of the L-BFGS probe (mean cross-entropy + wd/2 |W|^2 on standardised features; "
                    "scikit-learn's C = 1 / (wd × rows)); the best is chosen on the held-out training rows.")
    linear_momentum: float = Field(0.9, ge=0, lt=1, description="[D] SGD momentum.")
    linear_lr_sweep: list[float] = Field(default_factory=list, description="Extra lrs trained in the same pass (one head each).")
    # DINOv2's linear-eval grid (eval/linear.py: 1e-5 … 0.1 at batch 256) expressed at batch 1024 (× 4),
    # extended to 8: a small data set gives a probe few steps (tiny on the demo's digits: ~6 per epoch),
    # and measured there the best head sat at the grid's top. A head that diverges only stops itself.
    linear_lr_grid: list[float] = Field(
        default_factory=lambda: [4e-5, 8e-5, 2e-4, 4e-4, 8e-4, 2e-3, 4e-3, 8e-3, 0.02, 0.04, 0.08, 0.2, 0.4,
                                 1.0, 2.0, 4.0, 8.0],
        description="DINOv2 linear-eval grid: lrs at batch 1024 trained together with linear_lr and linear_lr_sweep (one head each); "
                    "the best is chosen on the held-out part of the training data.")
    linear_wd_grid: list[float] = Field(default_factory=lambda: [0.0], description="Weight decays: every lr is "
                                        "trained with each (one head per pair).")
    linear_holdout: float = Field(0.1, ge=0, lt=0.5, description="Fraction of the training samples (chosen by "
                                  "a hash of the sample key) held out to pick the best head; 0 = train on all "
                                  "(then only a single head is allowed: nothing to pick on).")
    n_last_blocks: int = Field(4, ge=1, description="[D] DINO probe: class tokens of the last n blocks concatenated.")
    avgpool_patch_tokens: bool = Field(False, description="[D] DINO option: append average-pooled patch tokens.")
    image_size: int = Field(224, gt=0, description="[S §4] center crop size (resize to image_size·256/224 first).")


class RunConfig(Section):
    name: str = Field("mst", description="Run name (directory under output_dir).")
    output_dir: str = Field("runs", description="Where run directories go.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="[S §1] same seed for comparisons (torch's generators take 64 bits).")
    log_every: int = Field(10, gt=0, description="Metrics every N steps.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (CPU demo budget); schedules still span the full run unless schedule_steps is set.")
    schedule_steps: int | None = Field(None, gt=0, description="Stretch schedules over this many steps instead of epochs × steps_per_epoch (CPU budgets).")
    time_limit_min: float | None = Field(None, gt=0, description="Safety cap in minutes: stop (with a checkpoint) after this time.")
    on_alert: Literal["warn", "stop"] = Field("warn", description="A health alert (see `health`) only warns, or stops the run cleanly with a checkpoint.")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers of rank 0 (mst_ds.trackers); "
        "wandb / mlflow need pip install '.[wandb]' / '.[mlflow]'. metrics.jsonl is always written.")
    tracker_project: str = Field("mst_ds", min_length=1, description="W&B project / MLflow experiment name.")
    deterministic: bool = Field(False, description="GPU runs repeat bit for bit (mst_ds.determinism): torch's deterministic algorithms (strict), CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic without autotuning, no cuDNN attention and, on ROCm, only the math attention backend. CPU runs are bit-identical either way. Cost: README, On a cluster → Resume. Not part of the run's identity: it picks kernels, not the method, and a resumed run may switch it.")
    log_every_s: float = Field(30.0, ge=0, description="When stdout is not a terminal (a job's output file), one plain progress line per logged step, at most one every this many seconds (and the last step's).")
    peak_tflops: float | None = Field(None, gt=0, description="One device's peak TFLOPS at the training precision, for the logged MFU; default: the cited 16-bit GPU peaks of mst_ds.cost.PEAKS by device name; no MFU on CPU unless given.")


class HealthConfig(Section):
    """Run-health alert rules (issue 10) on the diagnostics logged every run.log_every steps. A rule is
    checked from `start_fraction` of the schedule on (the teacher is near-uniform and the attention flat
    at random init) and fires once per run. Thresholds are [D] choices of this project."""

    enabled: bool = Field(True, description="Check the rules (diagnostics are logged either way).")
    start_fraction: float = Field(0.1, ge=0, le=1, description="[D] rules apply from this fraction of the schedule (the paper's warm-up: 10 of 100 epochs).")
    uniform_collapse: float = Field(0.9, gt=0, le=1, description="[D] alert when the teacher's per-sample entropy ÷ ln K exceeds this (uniform collapse).")
    one_prototype: float = Field(0.2, ge=0, lt=1, description="[D] alert when the entropy of the batch-mean teacher distribution ÷ ln min(K, teacher outputs per micro-batch) is below this (every sample on the same prototypes).")
    dim_collapse: float = Field(0.05, ge=0, lt=1, description="[D] alert when the std over the batch of the L2-normalised teacher CLS × √D is below this (≈ 1 for isotropic features, → 0 on collapse). Trained ViT CLS features share a large common direction: healthy tiny runs measured 0.1–0.3 while k-NN rose; an lr far too high measured 0.03.")
    flat_attention: float = Field(0.99, gt=0, le=1, description="[D] alert when the teacher's last-block CLS attention entropy ÷ ln N exceeds this while attention-guided masking is on.")
    flat_attention_after_fraction: float = Field(0.3, ge=0, le=1, description="[D] the flat-attention rule applies from this fraction of the schedule (attention is flat at random init and specialises later than the output distribution settles; 0.3 = the end of DINO's 30-epoch teacher-temperature warm-up).")
    knn_after_fraction: float = Field(0.3, ge=0, le=1, description="[D] from this fraction of the schedule, alert when the online k-NN top-1 is at or below its step-0 value.")
    grad_probe_every: int = Field(1, ge=0, description="Measure the restoration share of the gradient at the last shared layer at every N-th log step (0 = off); backward hooks only, no extra backward.")


# Settings that do not change the training trajectory: left out of MSTConfig.hash().
HASH_IGNORE = ("run.name", "run.output_dir", "run.log_every", "run.max_steps", "run.time_limit_min", "run.on_alert",
               "run.loggers", "run.tracker_project", "run.deterministic", "run.log_every_s", "run.peak_tflops",
               "augment.fuse_cpu",
               "model.init_from", "model.init_from_parts",  # the initial weights: recorded in run_info.json
               "checkpoint", "eval", "health", "data.train", "data.val")


class MSTConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @model_validator(mode="after")
    def _consistent(self) -> MSTConfig:
        if self.optim.clip_mode == "per_param" and self.engine.zero_stage == 3:
            raise ValueError("optim.clip_mode: per_param needs engine.zero_stage ≤ 2 (ZeRO-3 partitions parameters; use global)")
        if self.loss.teacher_temp_schedule == "per_epoch" and not float(self.loss.warmup_teacher_temp_epochs).is_integer():
            raise ValueError("loss.warmup_teacher_temp_epochs: per_epoch teacher temperature needs whole epochs (or teacher_temp_schedule=per_step)")
        if self.optim.batch_size % self.engine.grad_accum_steps:
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} is not divisible by engine.grad_accum_steps={self.engine.grad_accum_steps}"
            )
        return self

    # -- identity ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, *, ignore: Iterable[str] = HASH_IGNORE) -> str:
        """Hash of what defines the training trajectory (resume refuses a different one).

        ``data.num_workers`` counts: each worker reads its own slice of the epoch, so the batches of a
        mid-epoch resume depend on it. ``data.train`` is left out because the path may change (shards
        moved); the data's identity is checked from its manifest instead (``checkpoint_manager.data_identity``)."""
        d = self.to_dict()
        # A config mask.strategy could express hashes as it did then: runs and studies saved before
        # mask.policy existed keep their hash (resume and study markers compare it).
        legacy = {v: k for k, v in LEGACY_STRATEGY.items()}
        if d["mask"]["policy"] in legacy:
            d["mask"]["strategy"] = legacy[d["mask"].pop("policy")]
        # Runs saved before engine.communication_data_type existed summed gradients in the weights'
        # dtype; fp32 ones keep their hash at the default (their trajectory is the same).
        if d["engine"]["communication_data_type"] == "fp32":
            d["engine"].pop("communication_data_type")
        for key in ignore:
            parts = key.split(".")
            node = d
            for p in parts[:-1]:
                node = node[p]
            node.pop(parts[-1], None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Loading: presets, files, --set overrides, with the source of every value
# --------------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """Values ``node`` stands for once every alias is expanded (aliased nodes are shared, so this visits
    each node once); a recursive alias raises."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise ConfigError("a YAML alias refers to its own anchor (a recursive structure)")
    open_.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else [])
    size = 1 + sum(_expanded_size(child, memo, open_) for child in children)
    open_.discard(key)
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"YAML aliases expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?); refusing it")
    memo[key] = size
    return size


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts the document's values while composing it and measures what its
    aliases expand to before building it (see MAX_YAML_VALUES)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._values += 1
        if self._values > MAX_YAML_VALUES:
            raise ConfigError(f"more than {MAX_YAML_VALUES:,} values in one YAML document; refusing it")
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` with its size bounded: ConfigError (one line) for text over MAX_CONFIG_BYTES, a
    document of more than MAX_YAML_VALUES values (with or without aliases), a recursive alias."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{size:,} bytes of YAML, more than the {MAX_CONFIG_BYTES:,} a config may have; refusing it")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  # trusted: _BoundedLoader is a yaml.SafeLoader subclass (no object construction)
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None


def read_config_text(path: Path) -> str:
    """A config file's text: ConfigError (one line) for a directory, a file over MAX_CONFIG_BYTES (checked
    before it is read), an unreadable file or one that is not UTF-8."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: a directory, not a config file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes, larger than a config file may be; refusing it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    text = read_config_text(path)
    try:
        data = safe_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1} (model.timm_kwargs stays one value: its keys are timm's, not ours)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key != "model.timm_kwargs":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = HASH_IGNORE) -> list[str]:
    """``["section.key old → new", ...]`` over the settings the hash covers (two ``to_dict()`` forms)."""
    skip = tuple(ignore)
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            out.append(f"{key} {a.get(key, '(unset)')} → {b.get(key, '(unset)')}")
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def recipe_chain(name_or_path: str) -> list[tuple[str, dict[str, Any]]]:
    """[(source label, overrides)] from the root parent down to the named recipe."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    current: str | None = name_or_path
    while current:
        path = Path(current)
        if not (path.suffix in (".yaml", ".yml") and path.exists()):
            path = PRESET_DIR / f"{current}.yaml"
            if not path.exists():
                raise ConfigError(f"unknown preset or config file '{current}' (presets: {', '.join(list_presets())})")
        if str(path) in seen:
            raise ConfigError(f"{path}: parent cycle")
        seen.add(str(path))
        data = read_yaml(path)
        current = data.pop("parent", None)
        chain.append((f"preset:{path.stem}" if path.parent == PRESET_DIR else f"file:{path}", data))
    return list(reversed(chain))


def parse_set(item: str) -> tuple[str, Any]:
    """``section.key=value`` → (dotted key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as err:
        raise ConfigError(f"--set {key}: {err}") from None
    return key, value


@dataclass
class LoadedConfig:
    config: MSTConfig
    sources: dict[str, str]  # dotted key → "default" | "preset:NAME" | "file:PATH" | "--set"


def format_validation_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    inp = e.get("input")
    shown = "" if isinstance(inp, dict) or e["type"] == "extra_forbidden" else f" (got {inp!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def build_config(raw: Mapping[str, Any]) -> MSTConfig:
    try:
        return MSTConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(preset: str = "mst_deit_s_100ep", sets: Iterable[str] = (), overrides: Mapping[str, Any] | None = None) -> LoadedConfig:
    """Resolve preset chain + ``--set`` items (+ programmatic ``overrides``) into a validated config."""
    raw: dict[str, Any] = {}
    sources = {k: "default" for k in flatten(MSTConfig().to_dict())}
    for label, data in recipe_chain(preset):
        for key, value in flatten(data).items():
            _set_dotted(raw, key, copy.deepcopy(value))
            sources[key] = label
    items = [parse_set(s) for s in sets] + list((overrides or {}).items())
    for key, value in items:
        _set_dotted(raw, key, value)
        sources[key] = "--set"
    return LoadedConfig(build_config(raw), sources)


def config_from_file(path: str | Path) -> MSTConfig:
    """A resolved config written next to a run (config.yaml or .json)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if path.suffix != ".json":
        return build_config(read_yaml(path))
    text = read_config_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON ({str(err).splitlines()[0] if str(err) else 'nested too deeply'})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return build_config(data)


# --------------------------------------------------------------------------------------------------
# Derived numbers: the one place they are computed
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Derived:
    world_size: int
    dataset_size: int
    global_batch: int
    micro_batch: int  # per rank, per forward
    grad_accum_steps: int
    steps_per_epoch: int  # optimizer steps; the last partial batch of an epoch is dropped
    total_steps: int  # schedule length in optimizer steps
    warmup_steps: int
    peak_lr: float
    freeze_last_layer_steps: int
    teacher_temp_warmup_steps: int
    n_views: int  # 2 global + local

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive(cfg: MSTConfig, world_size: int = 1, dataset_size: int | None = None,
           steps_per_epoch: int | None = None) -> Derived:
    """Everything computed from the config, the world size and the data set size.

    ``steps_per_epoch``: the optimizer steps the training loader really yields per epoch (its
    equal-per-rank plan drops a few samples); default ``dataset_size // batch``. Use
    :func:`mst_ds.data.reader.derive_for_training`, which passes the loader's number."""
    if world_size < 1:
        raise ConfigError(f"world size must be ≥ 1 (got {world_size})")
    accum = cfg.engine.grad_accum_steps
    per_step = world_size * accum
    if cfg.optim.batch_size % per_step:
        raise ConfigError(
            f"optim.batch_size: global batch {cfg.optim.batch_size} is not divisible by world size {world_size} × "
            f"grad_accum_steps {accum}"
        )
    n = dataset_size if dataset_size is not None else cfg.data.num_samples
    if steps_per_epoch is None:
        steps_per_epoch = n // cfg.optim.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"optim.batch_size: global batch {cfg.optim.batch_size} is larger than the data set ({n} samples)")
    total = cfg.run.schedule_steps or cfg.schedule.epochs * steps_per_epoch
    # Epoch-denominated knobs are converted with the same scale as the schedule length, so a
    # stretched CPU schedule keeps the paper's proportions.
    epoch_len = total / cfg.schedule.epochs

    def steps(epochs: float) -> int:
        return min(total, int(math.floor(epochs * epoch_len)))

    return Derived(
        world_size=world_size,
        dataset_size=n,
        global_batch=cfg.optim.batch_size,
        micro_batch=cfg.optim.batch_size // per_step,
        grad_accum_steps=accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=steps(cfg.schedule.warmup_epochs),
        peak_lr=cfg.optim.base_lr * cfg.optim.batch_size / 256,
        freeze_last_layer_steps=steps(cfg.schedule.freeze_last_layer_epochs),
        teacher_temp_warmup_steps=steps(cfg.loss.warmup_teacher_temp_epochs),
        n_views=2 + cfg.augment.n_local_crops,
    )
