"""What training costs, without building anything (torch-free): FLOPs per image, device peaks, GPU-hours.

``flops_per_image(cfg)`` is the model FLOPs of one training image in one MST step, counted analytically
from the config (``tests/test_plan_cost.py`` checks it against torch's ``FlopCounterMode`` on the real
step): the teacher's forward of the 2 global views, the student's forward and backward of every view
(2 global + n local), the DINO head on each view's CLS, and the decoder on the 2 global views. As in
PaLM's MFU (Chowdhury et al. 2022, app. B) only matrix multiplications and convolutions count, 2 FLOPs per
multiply-add; a backward costs twice its forward (input and weight gradients), except the patch
embedding's, whose input needs no gradient (once); attention's recomputation in a fused kernel's
backward is not model work and is not counted. Masks, losses, norms and the position-embedding resampling
add no matrix multiplications, so every row of a study that changes only those shares one count.

``gpu_hours`` turns images × FLOPs into device-hours at a peak and a model-FLOPs utilisation (MFU).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mst_ds.config import ConfigError, MSTConfig

# Dense 16-bit tensor-core peak per device, TFLOP/s (without structured sparsity), SXM parts: the
# precision the device trains in (engine.precision=auto: bf16, fp16 on V100).
PEAKS: dict[str, tuple[float | None, str]] = {
    "h200": (989.0, "NVIDIA H200 SXM, dense BF16 (H200 datasheet: the H100 SXM5's tensor cores)"),
    "h100": (989.0, "NVIDIA H100 SXM5, dense BF16 (H100 Tensor Core GPU datasheet: 1,979 with sparsity)"),
    "h100-pcie": (756.0, "NVIDIA H100 PCIe, dense BF16 (H100 Tensor Core GPU datasheet: 1,513 with sparsity)"),
    "a100": (312.0, "NVIDIA A100 SXM4, dense BF16 (A100 Tensor Core GPU datasheet: 624 with sparsity)"),
    "v100": (125.0, "NVIDIA V100 SXM2, FP16 tensor cores (V100 datasheet; no BF16: the V100 path is fp16)"),
    "mi300x": (1307.4, "AMD Instinct MI300X, dense BF16 (MI300X datasheet)"),
    "mi250x": (383.0, "AMD Instinct MI250X, dense BF16 (MI250X datasheet)"),
    # Hygon/Sugon DCUs differ by model (Z100, K100, K100_AI) and this table has no datasheet figure it can
    # cite for them: a DCU plan needs --peak-tflops.
    "dcu": (None, "Hygon DCU (Sugon): model-dependent, no cited figure here"),
}
# torch.cuda.get_device_name() → a PEAKS entry: the first listed substring found in the name wins.
DEVICE_NAMES = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100"), ("H800", "h100"), ("A100", "a100"), ("A800", "a100"),
                ("V100", "v100"), ("MI300X", "mi300x"), ("MI250X", "mi250x"))
# The MFU assumed when no measurement is given: gpu_check's target for the paper preset's bf16 step.
ASSUMED_MFU = 0.30
# gpu_check's MFU line: `BENCH {"name": "MFU, <preset> bf16 step, batch N", "ratio": 0.41, ...}`.
MFU_BENCH_PREFIX = "MFU,"
# gpu_check's first line names the device: `gpu_check: torch …, 1 × NVIDIA H100 80GB HBM3; preset …`.
_GPU_CHECK_DEVICE = re.compile(r"^gpu_check: .*?, \d+ × (?P<device>[^;]+);")

# timm's plain ViT names → (embed_dim, depth, num_heads); mlp_ratio 4 (timm's default for all of them).
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
              "huge": (1280, 32, 16)}
_VIT_NAME = re.compile(r"^(?:vit|deit)_(?P<size>tiny|small|base|large|huge)_patch(?P<patch>\d+)_(?P<res>\d+)$")
# timm_kwargs that this count models (the shape) or that add no matrix multiplication; any other key
# (register tokens, SwiGLU, patch dropout, …) could change the count, so the count refuses it.
_SHAPE_KWARGS = {"embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"}
_NEUTRAL_KWARGS = {"img_size", "qkv_bias", "qk_norm", "init_values", "drop_rate", "pos_drop_rate", "proj_drop_rate",
                   "attn_drop_rate", "drop_path_rate"}


@dataclass(frozen=True)
class VitShape:
    dim: int
    depth: int
    heads: int
    mlp_hidden: int  # timm: int(dim × mlp_ratio)
    patch: int


def vit_shape(cfg: MSTConfig) -> VitShape:
    """The configured ViT's shape from timm's name and ``model.timm_kwargs``; ConfigError (one line) for an
    architecture whose matrix multiplications this module does not know."""
    m = cfg.model
    found = _VIT_NAME.match(m.arch)
    if found is None:
        raise ConfigError(f"model.arch {m.arch!r}: FLOPs are counted for timm's plain ViTs "
                          "(vit_|deit_{tiny,small,base,large,huge}_patchP_R) only")
    unknown = sorted(set(m.timm_kwargs) - _SHAPE_KWARGS - _NEUTRAL_KWARGS)
    if unknown:
        raise ConfigError(f"model.timm_kwargs {', '.join(unknown)}: not modelled by the FLOP count (mst_ds.cost)")
    dim, depth, heads = _VIT_SIZES[found["size"]]
    kw = m.timm_kwargs
    dim, depth, heads = int(kw.get("embed_dim", dim)), int(kw.get("depth", depth)), int(kw.get("num_heads", heads))
    return VitShape(dim=dim, depth=depth, heads=heads, mlp_hidden=int(dim * float(kw.get("mlp_ratio", 4.0))),
                    patch=int(kw.get("patch_size", found["patch"])))


def flops_key(cfg: MSTConfig) -> tuple:
    """What the FLOPs of a training image depend on: the network, the decoder and the crop set."""
    a, h, d = cfg.augment, cfg.model.head, cfg.decoder
    return (vit_shape(cfg), (h.nlayers, h.hidden_dim, h.bottleneck_dim, h.out_dim),
            (d.enabled, d.kind, tuple(d.channels)), (a.global_crop_size, a.local_crop_size, a.n_local_crops))


def flops_per_image(cfg: MSTConfig) -> float:
    """Model FLOPs of one training image in one MST step (teacher forward, student forward + backward,
    head, decoder; see the module doc). Pure arithmetic on the config, cached per ``flops_key``."""
    return _flops(*flops_key(cfg))


def _block(T: int, s: VitShape) -> int:
    """One transformer block's forward on T tokens: qkv, q·kᵀ, attention·v, projection, MLP."""
    return 2 * T * s.dim * 3 * s.dim + 2 * 2 * T * T * s.dim + 2 * T * s.dim * s.dim + 2 * 2 * T * s.dim * s.mlp_hidden


def _backbone(crop: int, s: VitShape) -> tuple[int, int]:
    """(patch embedding, transformer blocks) forward FLOPs of one view of ``crop`` pixels."""
    n = (crop // s.patch) ** 2
    return 2 * n * 3 * s.patch * s.patch * s.dim, s.depth * _block(n + 1, s)


def _head(s: VitShape, nlayers: int, hidden: int, bottleneck: int, out_dim: int) -> int:
    """The DINO head's forward on one CLS: MLP, then the weight-normalised last layer."""
    dims = [s.dim, bottleneck] if nlayers == 1 else [s.dim] + [hidden] * (nlayers - 1) + [bottleneck]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * bottleneck * out_dim


def _decoder(s: VitShape, kind: str, channels: tuple[int, ...], crop: int) -> int:
    """The decoder's forward on one global view (mst_ds.model.decoder: stages, then to_pixels)."""
    side = crop // s.patch
    widths = [s.dim, *channels]
    total = 0
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        if kind == "pixel_shuffle":
            up = i < len(channels) - 1  # the last stage stays at half resolution (sub-pixel output)
            total += 2 * side * side * c_in * 9 + 2 * side * side * c_in * c_out * (4 if up else 1)
            side *= 2 if up else 1
        else:  # transposed conv, kernel 4, stride 2
            total += 2 * side * side * 16 * c_in * c_out
            side *= 2
    last = channels[-1]
    return total + (2 * side * side * last * 12 if kind == "pixel_shuffle" else 2 * side * side * 9 * last * 3)


@functools.cache
def _flops(s: VitShape, head: tuple[int, int, int, int], decoder: tuple[bool, str, tuple[int, ...]],
           crops: tuple[int, int, int]) -> float:
    g, local, n_local = crops
    patch_g, blocks_g = _backbone(g, s)
    patch_l, blocks_l = _backbone(local, s)
    h = _head(s, *head)
    teacher = 2 * (patch_g + blocks_g + h)
    # Student: forward + backward (patch embedding: weight gradient only) of every view and its head.
    student = 2 * (2 * patch_g + 3 * blocks_g + 3 * h) + n_local * (2 * patch_l + 3 * blocks_l + 3 * h)
    enabled, kind, channels = decoder
    dec = 3 * 2 * _decoder(s, kind, channels, g) if enabled else 0
    return float(teacher + student + dec)


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------
def peak_tflops(device: str, override: float | None = None) -> tuple[float, str]:
    """(dense 16-bit peak TFLOP/s, its source) of ``device``; ``override`` (--peak-tflops) wins."""
    if override is not None:
        if not override > 0:
            raise ConfigError(f"--peak-tflops must be positive (got {override})")
        return float(override), "given by --peak-tflops"
    if device not in PEAKS:
        raise ConfigError(f"--device {device!r}: one of {', '.join(PEAKS)}")
    peak, source = PEAKS[device]
    if peak is None:
        raise ConfigError(f"--device {device}: no peak to cite ({source}); give --peak-tflops")
    return peak, source


def peak_of_device_name(name: str) -> float | None:
    """The dense 16-bit peak TFLOP/s of the device torch names ``name`` (e.g. "NVIDIA H100 80GB HBM3"),
    None where the table has no cited figure (DCUs, CPUs, devices not listed)."""
    key = next((key for part, key in DEVICE_NAMES if part in name), None)
    return PEAKS[key][0] if key else None


def measured_mfu(path: Path) -> tuple[float, str | None]:
    """(MFU, device name or None) from gpu_check's results: its JSONL file (``--out``; the last row whose
    check is ``MFU``, the device from the ``device`` row) or its saved output (``… | tee FILE``: the last
    ``BENCH`` record named ``MFU, …``, the device from its first line). ConfigError (one line) for a file
    without one."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"--gpu-check {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--gpu-check {path}: not UTF-8 text") from None
    mfu, device = None, None
    for line in lines:
        head = _GPU_CHECK_DEVICE.match(line)
        if head:
            device = head["device"].strip()
        text = line[len("BENCH "):] if line.startswith("BENCH ") else line
        if not text.startswith("{"):
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            raise ConfigError(f"--gpu-check {path}: a record is not JSON: {text[:60]!r}") from None
        if not isinstance(rec, dict):
            continue
        if rec.get("check") == "device" and isinstance(rec.get("value"), str):  # gpu_check.jsonl's env row
            device = rec["value"].split(" × ", 1)[-1].strip()
        if str(rec.get("name", "")).startswith(MFU_BENCH_PREFIX) or rec.get("check") == "MFU":
            value = rec.get("ratio") if "ratio" in rec else rec.get("value")
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ConfigError(f"--gpu-check {path}: MFU {value!r} is not a fraction in (0, 1]")
            mfu = float(value)
    if mfu is None:
        raise ConfigError(f"--gpu-check {path}: no MFU record (gpu_check's 'MFU' row, or a 'BENCH {{\"name\": \"MFU, …\"}}' line)")
    return mfu, device


def gpu_hours(images: int, flops: float, peak_tflops: float, mfu: float) -> float:
    """Device-hours to train ``images`` images of ``flops`` FLOPs each at ``mfu`` × ``peak_tflops``."""
    return images * flops / (peak_tflops * 1e12 * mfu) / 3600


# --------------------------------------------------------------------------------------------------
# What a plan prices with
# --------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
# Where `mst-ds plan` looks for gpu_check's numbers when --gpu-check is not given: gpu_check's own
# results file when $OUT is not set (bench/gpu_check.py --out).
DEFAULT_GPU_CHECK = REPO / "runs" / "gpu_check.jsonl"


@dataclass(frozen=True)
class Pricing:
    device: str
    peak_tflops: float
    peak_source: str
    mfu: float
    mfu_source: str

    def describe(self) -> str:
        """The assumptions of every GPU-hour figure, in one line."""
        return (f"{self.device.upper()} at {self.peak_tflops:g} TFLOP/s peak ({self.peak_source}) × "
                f"MFU {self.mfu:.2f} ({self.mfu_source})")

    def hours(self, images: int, flops: float) -> float:
        return gpu_hours(images, flops, self.peak_tflops, self.mfu)


def _same_device(device: str, measured_on: str) -> bool:
    return device.lower() in measured_on.lower()


def pricing(device: str, *, peak_override: float | None = None, mfu: float | None = None,
            gpu_check: Path | None = None) -> Pricing:
    """The peak and MFU a plan prices ``device`` with: ``mfu`` (--mfu) if given, else gpu_check's measured
    MFU (``gpu_check``, else DEFAULT_GPU_CHECK when it exists), else ASSUMED_MFU — each stated as such.
    A file named by --gpu-check that was measured on another device is refused (one line); the default
    file, then, is passed over with a note."""
    peak, source = peak_tflops(device, peak_override)
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu must be a fraction in (0, 1] (got {mfu})")
        return Pricing(device, peak, source, mfu, "given by --mfu")
    path = gpu_check if gpu_check is not None else DEFAULT_GPU_CHECK
    if gpu_check is None and not path.is_file():
        return Pricing(device, peak, source, ASSUMED_MFU, "assumed: gpu_check's target; no gpu_check results, "
                                                          "give --gpu-check FILE or --mfu")
    try:
        measured, on = measured_mfu(path)
    except ConfigError:
        if gpu_check is not None:
            raise
        return Pricing(device, peak, source, ASSUMED_MFU, f"assumed: {path} holds no MFU row")
    if on is not None and not _same_device(device, on):
        if gpu_check is not None:
            raise ConfigError(f"--gpu-check {path}: measured on {on}, not a {device.upper()}; give --mfu for {device}")
        return Pricing(device, peak, source, ASSUMED_MFU, f"assumed: {path} was measured on {on}")
    return Pricing(device, peak, source, measured, f"measured by gpu_check on {on or 'an unnamed device'}, {path.name}")


def run_steps(cfg: MSTConfig, total_steps: int) -> int:
    """Optimizer steps a run trains: its schedule, cut at run.max_steps (as train.Loop ends it)."""
    return min(total_steps, cfg.run.max_steps or total_steps)


# --------------------------------------------------------------------------------------------------
# Parameters and the communication of one optimizer step (torch-free, from the config)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    """Parameters with ``requires_grad`` when the engine is built (what DeepSpeed partitions and
    communicates): ``student`` = backbone + mask token + head + decoder; ``teacher`` = the student's
    backbone + mask token + head (the EMA reads their fp32 masters)."""

    student: int
    teacher: int


def _img_size(cfg: MSTConfig) -> int:
    found = _VIT_NAME.match(cfg.model.arch)
    return int(cfg.model.timm_kwargs.get("img_size", found["res"] if found else 224))


def parameter_count(cfg: MSTConfig) -> ParamCount:
    """The trained parameters of the configured model, counted as timm / mst_ds.model build them
    (tests/test_plan_cost.py checks the count against the built model for several configs)."""
    s, kw = vit_shape(cfg), cfg.model.timm_kwargs
    D, H = s.dim, s.mlp_hidden
    qkv_bias = 3 * D if kw.get("qkv_bias", True) else 0
    qk_norm = 2 * 2 * (D // s.heads) if kw.get("qk_norm", False) else 0
    layer_scale = 2 * D if kw.get("init_values") is not None else 0
    block = 2 * D + 3 * D * D + qkv_bias + qk_norm + D * D + D + 2 * D + D * H + H + H * D + D + layer_scale
    tokens = (_img_size(cfg) // s.patch) ** 2 + 1
    backbone = 3 * s.patch * s.patch * D + D + D + tokens * D + s.depth * block + 2 * D  # … + cls, pos, final norm
    h = cfg.model.head
    dims = [D, h.bottleneck_dim] if h.nlayers == 1 else [D] + [h.hidden_dim] * (h.nlayers - 1) + [h.bottleneck_dim]
    head = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    head += 2 * h.hidden_dim * (h.nlayers - 1) if h.use_bn and h.nlayers > 1 else 0
    head += h.bottleneck_dim * h.out_dim + (0 if h.norm_last_layer else h.out_dim)  # weight-norm direction, gain
    teacher = backbone + D + head  # + the mask token
    return ParamCount(student=teacher + (_decoder_params(cfg, s) if cfg.decoder.enabled else 0), teacher=teacher)


def _decoder_params(cfg: MSTConfig, s: VitShape) -> int:
    """mst_ds.model.decoder.GlobalImageDecoder's parameters."""
    d = cfg.decoder
    widths = [s.dim, *d.channels]
    total = 0
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        if d.kind == "pixel_shuffle":
            out = (4 if i < len(d.channels) - 1 else 1) * c_out
            total += c_in * 9 + c_in * out + (0 if d.use_bn else out)  # depthwise 3×3, then 1×1
        else:
            total += 16 * c_in * c_out + (0 if d.use_bn else c_out)  # transposed 4×4
        total += 2 * c_out if d.use_bn else 0
    last = d.channels[-1]
    return total + (last * 12 + 12 if d.kind == "pixel_shuffle" else 27 * last + 3)


# Bytes of a parameter / gradient as the engine holds and communicates it (DeepSpeed's
# communication_data_type defaults to the engine's dtype; torch autocast keeps fp32 parameters;
# `auto` resolves to bf16 on every device but a V100, where it is fp16: 2 bytes either way).
PARAM_BYTES = {"fp32": 4, "autocast_bf16": 4, "bf16": 2, "fp16": 2, "auto": 2}
COMM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # engine.communication_data_type


@dataclass(frozen=True)
class CommRow:
    what: str
    collective: str
    bytes: float  # one rank sends (and receives as much) per optimizer step


def comm_per_step(cfg: MSTConfig, world: int, grad_accum: int, params: ParamCount | None = None) -> list[CommRow]:
    """An ESTIMATE of the bytes one rank sends per optimizer step (it receives as much), as DeepSpeed
    0.19 moves them with this project's templates (``reduce_scatter: true``, DeepSpeed's default
    ``use_multi_rank_bucket_allreduce: true``), each collective priced as a ring: all-reduce
    2(W−1)/W × size, all-gather and reduce-scatter (W−1)/W × the full tensor.

    ZeRO-0/1: one all-reduce of the gradients at the accumulation boundary. ZeRO-2: the gradients of
    every micro-batch's backward, bucket by bucket — its multi-rank buckets are all-reduced, not
    reduce-scattered — then an all-gather of the updated parameters. ZeRO-3: a reduce-scatter of the
    gradients per micro-batch and the parameters all-gathered for each forward and backward. On top, with
    bf16/fp16 at ZeRO-1/2, the EMA all-gathers every rank's fp32 master partition (one all-gather per
    parameter group: :class:`mst_ds.ema.ZeroPartitionMasters`, the decoder's included), and ``optim.clip_mode: per_param`` reads each
    gradient through ``safe_get_full_grad`` (an fp32 all-reduce each). Not counted: scalars (the gradient
    norm, overflow flags), SyncBN's statistics (torch.distributed, per BN layer and forward), the online
    monitor, checkpoints, and DeepSpeed's padding of the flat partitions to a multiple of W."""
    p = params or parameter_count(cfg)
    if world <= 1:
        return []
    b, stage, W = PARAM_BYTES[cfg.engine.precision], cfg.engine.zero_stage, world
    g = COMM_BYTES[cfg.engine.communication_data_type]  # gradients are cast to it before they are summed
    ring, gather = 2 * (W - 1) / W, (W - 1) / W
    rows: list[CommRow] = []
    if stage <= 1:
        rows.append(CommRow("gradients (once per optimizer step)", "all-reduce", ring * p.student * g))
    elif stage == 2:
        rows.append(CommRow(f"gradients (every micro-batch: × {grad_accum})", "all-reduce", grad_accum * ring * p.student * g))
    else:
        rows.append(CommRow(f"gradients (every micro-batch: × {grad_accum})", "reduce-scatter", grad_accum * gather * p.student * g))
    if stage == 1 or stage == 2:
        rows.append(CommRow("updated parameters", "all-gather", gather * p.student * b))
    elif stage == 3:
        rows.append(CommRow(f"parameters for forward and backward (× 2 × {grad_accum})", "all-gather",
                            2 * grad_accum * gather * p.student * b))
    if stage in (1, 2) and b == 2:
        rows.append(CommRow("EMA: the fp32 master partitions (one per parameter group)", "all-gather", gather * p.student * 4))
    if cfg.optim.clip_mode == "per_param" and stage in (1, 2):
        rows.append(CommRow("per-parameter clipping: full gradients", "all-reduce", ring * p.student * 4))
    return rows
