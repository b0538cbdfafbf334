"""The DeepSpeed engine of a run: distributed start, precision choice, the JSON config, named groups.

The DeepSpeed JSON = a template from ``ds_configs/`` (engine settings only) + what the pydantic config
decides: batch sizes from :func:`mst_ds.config.derive`, the precision block, the ZeRO stage and an
explicit ``gradient_clipping`` (DeepSpeed ≥ 0.19.3 silently clips at 1.0 when the key is absent,
SPEC §7). The optimizer is torch's AdamW (no compiled DeepSpeed ops: works on ROCm and CPU), run
block by block on CPU (:class:`BlockwiseAdamW`, same bits); there is no DeepSpeed scheduler — the loop
writes lr / weight decay into the groups, which it addresses by their ``"name"`` (DeepSpeed drops empty
groups, so indices shift).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam as adam_update  # torch's functional Adam/AdamW update

from mst_ds import cluster
from mst_ds.config import ConfigError, Derived, MSTConfig, UsageError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Keys the pydantic config owns; a template that sets them is refused (one source of truth).
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16", "torch_autocast", "optimizer", "scheduler",
               "communication_data_type")

# Group names; the loop sets lr / weight decay per name (schedules) and 0 lr on the frozen ones.
REGULARIZED = "regularized"
NOT_REGULARIZED = "not_regularized"
LAST_LAYER = "last_layer"
LAST_LAYER_NOT_REGULARIZED = "last_layer_not_regularized"
FROZEN_GROUPS = (LAST_LAYER, LAST_LAYER_NOT_REGULARIZED)
DECAYED_GROUPS = (REGULARIZED, LAST_LAYER)


# --------------------------------------------------------------------------------------------------
# Distributed start
# --------------------------------------------------------------------------------------------------
def accelerator_name() -> str:
    """'cpu' or 'cuda' (ROCm runs the CUDA path), as DeepSpeed's accelerator reports it."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(platform: Platform | None = None) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL/RCCL on GPUs) → (rank, world).

    A plain ``python`` start (no launcher) becomes a world of one on a free local port, so the same
    code runs under ``deepspeed``, ``torchrun``, ``srun`` (one task per GPU: ranks from SLURM's
    variables, :mod:`mst_ds.cluster`) and bare. This rank's GPU is bound (:func:`bind_device`) before
    the process group starts: NCCL places every collective's tensors on the current device, so a
    collective issued before ``set_device`` lands every rank of a node on ``cuda:0``.
    """
    import deepspeed
    import torch.distributed as dist

    platform = platform or Platform.current()
    if cluster.is_srun_task(os.environ):
        os.environ.update(cluster.torch_env_from_slurm(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    bind_device(platform, os.environ)
    if not dist.is_initialized():
        _check_rendezvous_port()
        cpu = platform.kind == "cpu"
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
        if cpu:
            dist.barrier()  # every rank has now mapped every rank's all-reduce segment
            release_shm_name(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def _check_rendezvous_port() -> None:
    """Rank 0 hosts the rendezvous store on MASTER_PORT: if something already listens there (another job
    whose port came out the same, a leftover process), stop in one line instead of an EADDRINUSE
    traceback. torchrun's agent hosts the store itself (TORCHELASTIC_USE_AGENT_STORE): nothing to check."""
    if os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    port = int(os.environ.get("MASTER_PORT") or 0)
    if port and cluster.port_in_use(port):
        raise UsageError(f"MASTER_PORT {port} is in use on this node (another job's rendezvous, or a leftover "
                         f"process): set MASTER_PORT to a free port")


SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_shm_name(rank: int) -> bool:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce segment; the mappings stay. → unlinked?

    DeepSpeed's CPU comm op maps one 67 MB ``/dev/shm`` segment per rank and never unlinks it (its
    ``shared_close`` has no caller in 0.19.8), so every CPU run would leave 67 MB per rank in RAM until
    reboot. Once all ranks have opened all segments the names are not needed. Only the segment this
    process has mapped, at the same inode, is unlinked: never another job's file."""
    path = SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                              port=os.environ.get("MASTER_PORT", ""), rank=rank)
    try:
        ino = os.stat(path).st_ino
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False  # not created (ranks on several nodes use no segment) or no /proc
    if not any(line.split()[4:] == [str(ino), path] for line in maps.splitlines()):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def local_device_index(platform: Platform, env: Mapping[str, str]) -> int | None:
    """This rank's GPU ordinal (None on CPU): ``LOCAL_RANK`` among the visible GPUs.

    A task that sees a single GPU (``srun --gpus-per-task=1`` / ``--gpu-bind``: SLURM narrows
    ``CUDA_VISIBLE_DEVICES`` per task) uses it whatever its local rank. More local ranks than visible
    GPUs otherwise is refused in one line (two ranks on one GPU would run, slowly and wrongly sized)."""
    if platform.kind == "cpu":
        return None
    local, count = int(env.get("LOCAL_RANK", 0)), platform.device_count
    if count == 0:
        raise UsageError("no GPU visible to torch on this node (CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES empty?)")
    if local < count:
        return local
    if count == 1:
        return 0
    raise UsageError(f"local rank {local} but {count} GPUs visible on this node: start one task per GPU "
                     f"(--ntasks-per-node={count}, or srun --gpus-per-task=1 so each task sees one)")


def bind_device(platform: Platform, env: MutableMapping[str, str]) -> torch.device:
    """Make this rank's GPU the current device, before any collective → the device (cpu: nothing to bind).

    One GPU per task: DeepSpeed binds ``cuda:LOCAL_RANK`` itself (``deepspeed.initialize``), an invalid
    ordinal when the task sees one GPU at a local rank > 0, so ``LOCAL_RANK`` is rewritten to 0 — that
    task's only GPU (NCCL tells GPUs apart by bus id, not by ordinal)."""
    index = local_device_index(platform, env)
    if index is None:
        return torch.device("cpu")
    if int(env.get("LOCAL_RANK", 0)) != index:
        env["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device(platform: Platform | None = None) -> torch.device:
    """This rank's device (``cuda:LOCAL_RANK`` or cpu), as :func:`bind_device` chose it."""
    platform = platform or Platform.current()
    index = local_device_index(platform, os.environ)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------
# ROCm architectures whose matrix units (MFMA) run bf16 at full rate: MI200 (gfx90a), MI300 (gfx94x),
# MI350 (gfx95x). Others (gfx906/gfx908 and the DCUs built on them) get fp16 with a loss scale.
ROCM_BF16_ARCHS = ("gfx90a", "gfx94", "gfx95")


def gpu_visible() -> bool:
    """Whether this process sees a CUDA / ROCm GPU: the question the commands ask before DeepSpeed picks
    its accelerator (``train.default_accelerator``, ``study.default_launch``), where :meth:`Platform.current`
    cannot be asked yet. Everything after that takes the :class:`Platform`."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Platform:
    """What this process's accelerator offers, asked once (:meth:`current`) and passed in, so every
    accelerator-only branch can be reached with a platform built by hand (tests on CPU)."""

    kind: str  # "cpu" | "cuda" (ROCm runs the CUDA path)
    capability: tuple[int, int] | None = None  # CUDA compute capability of device 0
    rocm: bool = False
    arch: str = ""  # ROCm: gcnArchName of device 0, e.g. "gfx90a:sramecc+:xnack-"
    device_count: int = 0  # GPUs visible to this process

    @classmethod
    def current(cls) -> Platform:
        if accelerator_name() == "cpu":
            return cls("cpu")
        rocm = torch.version.hip is not None
        arch = torch.cuda.get_device_properties(0).gcnArchName if rocm else ""
        return cls("cuda", torch.cuda.get_device_capability(0), rocm, arch, torch.cuda.device_count())

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix units: CPU (bf16 on CPU is exact enough and fast where AMX/AVX512-BF16 exist),
        CUDA capability ≥ 8.0, ROCm by architecture (:data:`ROCM_BF16_ARCHS`)."""
        if self.kind == "cpu":
            return True
        if self.rocm:
            return self.arch.startswith(ROCM_BF16_ARCHS)
        return self.capability is not None and self.capability >= (8, 0)


def resolve_precision(requested: str, dev: Platform) -> str:
    """engine.precision → "bf16" | "fp16" | "fp32" | "autocast_bf16" for this device.

    auto: bf16 where the matrix units have it (:attr:`Platform.native_bf16`), fp16 (dynamic loss scale)
    elsewhere (V100: torch reports bf16 as supported there, by slow emulation — SPEC §7), bf16 on CPU.
    """
    if requested == "auto":
        return "bf16" if dev.native_bf16 else "fp16"
    if requested == "fp16" and dev.kind == "cpu":
        raise ConfigError("engine.precision: fp16 is not supported on CPU (use bf16, autocast_bf16 or fp32)")
    if requested in ("bf16", "autocast_bf16") and not dev.native_bf16:
        what = f"ROCm {dev.arch or '(unknown architecture)'}" if dev.rocm else (
            f"compute capability {dev.capability[0]}.{dev.capability[1]}" if dev.capability else "this GPU")
        raise ConfigError(f"engine.precision: {requested} needs bf16 matrix units (compute capability ≥ 8.0, or "
                          f"ROCm {'/'.join(a + '*' for a in ROCM_BF16_ARCHS)}); this is {what}: use fp16 or auto")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The low-precision compute dtype of a precision mode (None for fp32)."""
    return {"bf16": torch.bfloat16, "autocast_bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _precision_block(precision: str) -> dict[str, Any]:
    """The DeepSpeed keys of a precision mode; the fp16 loss-scaler settings are engine settings and
    live in ``ds_configs/precision/fp16.json``."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        fp16 = json.loads((DS_CONFIG_DIR / "precision" / "fp16.json").read_text())
        return {"fp16": {"enabled": True, **fp16}}
    if precision == "autocast_bf16":
        # fp32 weights and optimizer; matmuls in bf16 (exact fp32 teacher EMA source).
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    return {}


# --------------------------------------------------------------------------------------------------
# The DeepSpeed JSON
# --------------------------------------------------------------------------------------------------
def load_template(name: str) -> dict[str, Any]:
    path = Path(name) if Path(name).is_absolute() else DS_CONFIG_DIR / name
    if not path.exists():
        names = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"engine.template: no DeepSpeed template {name!r} (in ds_configs/: {names})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.template: {path} is not valid JSON ({err})") from None
    owned = [k for k in _OWNED_KEYS if k in data]
    if owned or "stage" in data.get("zero_optimization", {}):
        raise ConfigError(
            f"engine.template: {path.name} sets {', '.join(owned) or 'zero_optimization.stage'}; "
            "templates hold engine settings only (batch, precision, clipping, stage come from the config)"
        )
    return data


def build_ds_config(cfg: MSTConfig, derived: Derived, precision: str, *, load_universal: bool = False) -> dict[str, Any]:
    """Template + batch sizes + precision + clipping + ZeRO stage → the dict given to DeepSpeed."""
    ds = copy.deepcopy(load_template(cfg.engine.template))
    micro, accum, world = derived.micro_batch, derived.grad_accum_steps, derived.world_size
    if micro * accum * world != derived.global_batch:
        raise ConfigError(
            f"optim.batch_size: {derived.global_batch} ≠ micro-batch {micro} × accumulation {accum} × world {world}"
        )
    ds.update(
        train_batch_size=derived.global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        # Always explicit: absent means 1.0 since DeepSpeed 0.19.3. DeepSpeed's is the global norm;
        # per_param clipping is done by clip_per_param before the step, so DeepSpeed's is off then.
        gradient_clipping=float(cfg.optim.clip_grad) if cfg.optim.clip_mode == "global" else 0.0,
    )
    ds.setdefault("zero_optimization", {})["stage"] = cfg.engine.zero_stage
    ds.update(_precision_block(precision))
    ds["communication_data_type"] = cfg.engine.communication_data_type  # bench/comm_dtype.py
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


# --------------------------------------------------------------------------------------------------
# Named parameter groups
# --------------------------------------------------------------------------------------------------
def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters timm's models list in ``no_weight_decay()`` (tokens, position
    embedding), collected from every submodule that defines it, plus any ``*token`` parameter."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    names |= {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].endswith("token")}
    return names


def is_decayed(name: str, p: nn.Parameter, rule: str, timm_skip: set[str] = frozenset()) -> bool:
    """Whether weight decay applies to parameter ``name`` under ``optim.no_decay_rule``.

    dino (DINO's ``get_params_groups``, SPEC §9): everything except names ending in ``.bias`` and 1-D
    parameters — cls token, position embedding and MST's mask token (3-D) are decayed. timm
    (``param_groups_weight_decay``): additionally not the ``no_weight_decay()`` names (``timm_skip``).
    """
    if p.ndim <= 1 or name.endswith(".bias"):
        return False
    return rule == "dino" or name not in timm_skip


def param_groups(model: nn.Module, frozen_prefix: str = "head.last_layer", rule: str = "dino") -> list[dict[str, Any]]:
    """Trainable parameters in named groups: regularised / not regularised / head last layer.

    Regularised or not follows :func:`is_decayed` under ``rule`` (``optim.no_decay_rule``). The head's
    last layer gets groups of its own so it can be frozen by lr 0 (SPEC §7: ``p.grad = None`` does
    nothing under ZeRO) and its Adam state restarted when the freeze ends. Empty groups are left out.
    """
    if rule not in ("dino", "timm"):
        raise ConfigError(f"optim.no_decay_rule: {rule!r} is not dino or timm")
    skip = no_weight_decay_names(model) if rule == "timm" else set()
    buckets: dict[str, list[nn.Parameter]] = {
        REGULARIZED: [], NOT_REGULARIZED: [], LAST_LAYER: [], LAST_LAYER_NOT_REGULARIZED: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = is_decayed(name, p, rule, skip)
        frozen = name.startswith(frozen_prefix + ".")
        key = (LAST_LAYER if decay else LAST_LAYER_NOT_REGULARIZED) if frozen else (
            REGULARIZED if decay else NOT_REGULARIZED)
        buckets[key].append(p)
    return [{"name": k, "params": v, "weight_decay": 0.0} for k, v in buckets.items() if v]


class BlockwiseAdamW(torch.optim.AdamW):
    """torch's AdamW, applied to CPU tensors block by block: the same bits, a fraction of the memory traffic.

    ZeRO-1/2 hand AdamW one flat fp32 partition per group (DeiT-S: ~22 M elements in one tensor). torch's
    single-tensor AdamW (its CPU default) makes about ten passes over such a tensor per step, each an
    in-place op streaming it through memory, where the same update per parameter stays in cache. Every
    AdamW op is elementwise, so running torch's own update on :data:`BLOCK`-element slices gives the
    same bits (tests/test_engine.py); on the DeiT-S shape of bench/engine_overhead.py the ZeRO-1 step
    went from 0.57 s to 0.26 s (plain PyTorch per parameter: 0.16 s). torch's fused CPU AdamW is as fast
    but rounds differently; DeepSpeed's CPU Adam needs a compiled op (not on ROCm, SPEC §7). Accelerator
    tensors, closures and torch's foreach / fused / capturable / differentiable modes take torch's step.
    """

    BLOCK = 1 << 16  # elements: the update's four fp32 tensors (1 MiB) stay in a core's L2

    def _blockwise(self) -> bool:
        return all(not (g["foreach"] or g["fused"] or g["capturable"] or g["differentiable"])
                   and all(p.device.type == "cpu" and p.is_contiguous() for p in g["params"])
                   for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._blockwise():
            return super().step(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            for i, p in enumerate(params):
                tensors = [params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]]
                if group["amsgrad"]:
                    tensors.append(max_exp_avg_sqs[i])
                flat = [t.view(-1) for t in tensors]
                for start in range(0, p.numel(), self.BLOCK):
                    b = [t[start:start + self.BLOCK] for t in flat]
                    count = steps[i].clone()  # torch's update advances the count it is given: every block starts from it
                    adam_update(
                        [b[0]], [b[1]], [b[2]], [b[3]], b[4:], [count], foreach=False, capturable=False,
                        differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=has_complex,
                        amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                        decoupled_weight_decay=group["decoupled_weight_decay"])
                steps[i] += 1
        return None


def set_group_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, *, frozen: bool) -> None:
    """Write this step's lr and weight decay into every named group (before ``engine.step``)."""
    for group in optimizer.param_groups:
        name = group.get("name")
        group["lr"] = 0.0 if (frozen and name in FROZEN_GROUPS) else lr
        group["weight_decay"] = weight_decay if name in DECAYED_GROUPS else 0.0


def apply_schedule(optimizer: Any, gate: GradientGate, s: Any) -> None:
    """Before a step's forwards: lr / weight decay per group, the gradient gate, and the restart of the
    last layer's AdamW state at the first step after the freeze (``s``: ScheduleValues of the step)."""
    set_group_values(optimizer, s.lr, s.weight_decay, frozen=s.last_layer_frozen)
    gate.closed = s.last_layer_frozen
    if s.last_layer_released:  # DINO's frozen layer has no AdamW state: restart its step count
        restart_optimizer_state(optimizer)


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO-1/2/3, bf16 and fp16 optimizers keep it
    as ``.optimizer``; at ZeRO-0 fp32 the engine holds it directly)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    return optimizer


def _group_states(optimizer: Any):
    """(group name, AdamW state dict or None) for every state entry of this rank.

    ZeRO-0: one entry per parameter. ZeRO-1/2, bf16 / fp16 optimizers: one per flat fp32 partition of
    each group (the groups' "params"). ZeRO-3 empties the groups' "params" between steps and keeps its
    flat partitions (sub-groups) aside, mapped to their group by ``sub_group_to_group_id``."""
    opt = base_optimizer(optimizer)
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        for sub, p in enumerate(flat):
            yield opt.param_groups[optimizer.sub_group_to_group_id[sub]].get("name"), opt.state.get(p)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            yield group.get("name"), opt.state.get(p)


def restart_optimizer_state(optimizer: Any, names: tuple[str, ...] = FROZEN_GROUPS) -> int:
    """Reset the AdamW state (step count and moments) of the named groups to "never stepped" →
    number of state entries reset.

    Called once, at the first step after the last-layer freeze (SPEC §9): DINO's ``p.grad = None``
    makes AdamW skip the layer during the freeze, so its first free step runs with step count 1 and
    fresh moments. Here the layer's gradients were zeros during the freeze (:class:`GradientGate`), so
    its moments are already exactly zero; only the step count ran on, and bias correction would
    otherwise distort the first free updates. Works on the state as DeepSpeed stores it (see
    :func:`_group_states`): the last layer's groups are groups of their own, so their flat partitions
    hold nothing else. The reset state is what the next checkpoint saves.
    """
    count = 0
    for name, state in _group_states(optimizer):
        if name not in names or not state:
            continue  # never stepped: already DINO's state
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
        count += 1
    return count


def optimizer_step_counts(optimizer: Any) -> dict[str, list[float]]:
    """{group name: [AdamW step count of each state entry of this rank]} (diagnostics and tests)."""
    out: dict[str, list[float]] = {}
    for name, state in _group_states(optimizer):
        if state and "step" in state:
            out.setdefault(name or "?", []).append(float(state["step"]))
    return out


class GradientGate:
    """Zeroes the gradients of given parameters while closed (tensor hooks, before ZeRO sees them).

    Together with lr 0 and :func:`restart_optimizer_state` at the end of the freeze this is DINO's
    ``p.grad = None`` at every ZeRO stage: without the gate AdamW would accumulate the frozen layer's
    moments and its gradients would count in the clipping norm; without the restart its step count
    would keep running (wrong bias correction after the freeze). DINO has none of these effects.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.closed = False
        self._handles = [p.register_hook(self._hook) for p in params]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(grad) if self.closed else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def frozen_params(model: nn.Module, frozen_prefix: str = "head.last_layer") -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(frozen_prefix + ".")]


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
def convert_sync_bn(model: nn.Module, world_size: int, enabled: bool, dev: torch.device) -> tuple[nn.Module, bool]:
    """BN → SyncBN when distributed [S §3]. torch's SyncBN refuses CPU tensors, so CPU ranks keep
    per-rank BN statistics (returned flag False) — a CPU-only limitation, not a GPU one."""
    if not enabled or world_size <= 1 or dev.type == "cpu":
        return model, False
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), True


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Make ZeRO-3 gather the parameters the backbone uses outside a tensor-returning module forward.

    ZeRO-3 gathers a module's parameters around that module's ``forward`` and re-gathers them for its
    backward through hooks on the forward's tensor outputs. The backbone returns a dataclass (no hook
    attaches) and calls ViT internals (``vit._pos_embed``) instead of ``vit.forward``, so the mask token,
    cls token and position embedding would be released before their gradients arrive. They are
    declared external parameters of ``vit.patch_embed`` (runs first, returns a tensor) and kept
    resident (``ds_persist``: they are tiny next to the blocks) → number registered.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from timm.models.vision_transformer import VisionTransformer

    count = 0
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, VisionTransformer):
                for p in [*child.parameters(recurse=False), *parent.parameters(recurse=False)]:
                    register_external_parameter(child.patch_embed, p)
                    p.ds_persist = True
                    count += 1
    return count


def match_bn_buffers_to_weights(model: nn.Module) -> None:
    """Cast BN running statistics to their layer's weight dtype (bf16/fp16 engines).

    DeepSpeed casts parameters, not buffers, to bf16/fp16; CPU batch_norm refuses bf16 weights with
    fp32 running statistics. The student's running statistics are never used for evaluation (the
    fp32 teacher keeps its own), so their precision does not matter.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != m.weight.dtype:
                    setattr(m, name, buf.to(m.weight.dtype))


def build_engine(model: nn.Module, cfg: MSTConfig, derived: Derived, precision: str, *,
                 load_universal: bool = False):
    """deepspeed.initialize with named AdamW groups → (engine, ds_config dict)."""
    import deepspeed

    ds_config = build_ds_config(cfg, derived, precision, load_universal=load_universal)
    groups = param_groups(model, rule=cfg.optim.no_decay_rule)
    optimizer = BlockwiseAdamW(groups, lr=derived.peak_lr, betas=tuple(cfg.optim.betas), weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # DeepSpeed's bf16 wrapper (ZeRO-0) steps AdamW once on zero gradients at init to create its state:
    # every step count would start at 1 and the first update would be bias-corrected as a second one.
    restart_optimizer_state(engine.optimizer, names=tuple(g.get("name") for g in groups))
    if cfg.engine.zero_stage == 3:
        register_zero3_external_parameters(engine.module)
    if precision in ("bf16", "fp16"):
        match_bn_buffers_to_weights(engine.module)
    if cfg.engine.compile:
        engine.compile()  # compiles engine.module in place: the EMA and checkpoints see the same parameters
    return engine, ds_config


def clip_per_param(engine, max_norm: float) -> int:
    """DINO's ``clip_gradients``: scale each parameter's gradient by max_norm / (‖g‖ + 1e-6) where that
    is < 1 → number of parameters clipped. Call at the accumulation boundary, after backward and before
    ``engine.step()`` (gradients are then averaged over ranks, SPEC §7).

    ZeRO-0 (fp32 or autocast): ``p.grad``. bf16 / fp16 wrappers and ZeRO-1/2 keep the gradient in their
    own (partitioned) buffers: DeepSpeed's ``safe_get_full_grad`` assembles it (an all-reduce per
    parameter at ZeRO-1/2, on every rank in the same order) and ``safe_set_full_grad`` writes this
    rank's part back. Under fp16 the buffers hold loss-scaled gradients: the norm is taken in fp32 and
    unscaled (an fp16 norm of a scaled gradient overflows to inf, which would zero the gradient with no
    overflow flagged). A non-finite gradient is left as it is: DeepSpeed's overflow check skips the step.
    """
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    scale = loss_scale(engine)
    clipped = 0
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        grad = safe_get_full_grad(p)
        if grad is None:
            continue
        norm = float(torch.linalg.vector_norm(grad, dtype=torch.float32)) / scale  # unscaled, fp32
        coef = max_norm / (norm + 1e-6)
        if coef < 1:  # False for a non-finite norm
            safe_set_full_grad(p, (grad.float() * coef).to(grad.dtype))
            clipped += 1
    return clipped


def grad_norm_stage0(engine) -> float | None:
    """Global gradient norm before the step where DeepSpeed does not report one (ZeRO-0 fp32 /
    autocast: ``get_global_grad_norm`` stays None). Call at the accumulation boundary, after backward
    (gradients are already averaged over ranks)."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def loss_scale(engine) -> float:
    """Current loss scale of the engine's optimizer (fp16: dynamic), 1.0 where there is none.

    Read through DeepSpeed's public ``loss_scale`` property of its optimizer wrappers (FP16_Optimizer,
    FP16_UnfusedOptimizer, ZeRO-1/2, ZeRO-3; None where no scaling is used). ``engine.loss_scale()`` is
    the configured static scale, not the current one; ``cur_scale`` exists at ZeRO-1/2/3 only (ZeRO-0
    fp16 would read 1.0). BF16_Optimizer and torch's optimizers have no scale."""
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else 1.0
