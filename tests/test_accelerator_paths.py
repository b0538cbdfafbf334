"""Accelerator-only paths, forced on CPU (issue 29): the device bound before the first collective, one
GPU per task, the loss scale of every DeepSpeed optimizer class, per-parameter clipping of loss-scaled
fp16 gradients, the EMA's fp32 source at every stage and precision, the GPU RNG restore, the precision
check on resume, SyncBN, the evaluation's device without a launcher.

What is faked, and only that (each test says which): ``torch.cuda.set_device`` / ``torch.cuda.set_rng_state``
/ ``device_count`` (no GPU here), DeepSpeed's CPU accelerator's ``is_fp16_supported`` (DeepSpeed refuses fp16
on a CPU without AVX512-FP16 before building the optimizer; everything after it is the real fp16 engine on
CPU), and a :class:`mst_ds.engine.Platform` built by hand for a GPU. ARCHITECTURE.md "Accelerator paths"
maps each path to its test here.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mst_ds import checkpoint as ckpt
from mst_ds import engine as eng
from mst_ds.config import ConfigError, UsageError

V100 = eng.Platform("cuda", (7, 0), device_count=4)
ONE_GPU_TASK = eng.Platform("cuda", (8, 0), device_count=1)


@pytest.fixture
def set_device_calls(monkeypatch) -> list:
    """Faked: torch.cuda.set_device (no GPU here) records its ordinal."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    return calls


# --------------------------------------------------------------------------------------------------
# Device selection: LOCAL_RANK, one GPU per task, the order set_device → first collective
# --------------------------------------------------------------------------------------------------
def test_local_rank_selects_its_gpu(set_device_calls):
    env = {"LOCAL_RANK": "3"}
    assert eng.bind_device(V100, env) == torch.device("cuda", 3)
    assert set_device_calls == [("set_device", 3)] and env["LOCAL_RANK"] == "3"
    assert eng.bind_device(eng.Platform("cpu"), env) == torch.device("cpu")  # CPU: nothing bound
    assert set_device_calls == [("set_device", 3)]


def test_one_gpu_per_task_binds_its_only_gpu_and_tells_deepspeed(set_device_calls):
    """srun --gpus-per-task=1: local rank 3 sees one GPU. DeepSpeed's engine calls set_device(LOCAL_RANK)
    itself, so LOCAL_RANK must name a visible ordinal (before: it stayed 3, an invalid ordinal)."""
    env = {"LOCAL_RANK": "3"}
    assert eng.bind_device(ONE_GPU_TASK, env) == torch.device("cuda", 0)
    assert set_device_calls == [("set_device", 0)]
    assert int(env["LOCAL_RANK"]) < ONE_GPU_TASK.device_count


def test_more_local_ranks_than_gpus_is_refused_in_one_line(set_device_calls):
    with pytest.raises(UsageError) as err:
        eng.bind_device(eng.Platform("cuda", (8, 0), device_count=2), {"LOCAL_RANK": "3"})
    assert "\n" not in str(err.value) and "--gpus-per-task=1" in str(err.value)
    with pytest.raises(UsageError, match="no GPU visible"):
        eng.bind_device(eng.Platform("cuda", (8, 0), device_count=0), {"LOCAL_RANK": "0"})
    assert set_device_calls == []


def test_platform_is_read_from_the_device(monkeypatch):
    """Platform.current on a ROCm GPU. Faked: DeepSpeed's accelerator name, torch.version.hip and the
    three torch.cuda queries it makes."""
    monkeypatch.setattr(eng, "accelerator_name", lambda: "cuda")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(gcnArchName="gfx90a:sramecc+:xnack-"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    p = eng.Platform.current()
    assert p == eng.Platform("cuda", (9, 0), True, "gfx90a:sramecc+:xnack-", 8) and p.native_bf16
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 0))
    assert eng.Platform.current() == eng.Platform("cuda", (7, 0), False, "", 8)  # a V100 node


def test_gpu_start_binds_then_starts_nccl(monkeypatch, set_device_calls, deepspeed_cpu):
    """init_distributed on a GPU platform: set_device, then DeepSpeed's NCCL start. Faked: set_device,
    torch.distributed.is_initialized (False once: a fresh process) and deepspeed.init_distributed (records)."""
    import deepspeed

    if not torch.distributed.is_initialized():
        eng.init_distributed(eng.Platform("cpu"))  # the real group answers get_rank / get_world_size
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: set_device_calls.append(("init", dist_backend)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # the port check is another test's
    eng.init_distributed(V100)
    assert set_device_calls == [("set_device", 1), ("init", "nccl")]


def test_setup_binds_the_device_before_its_first_collective(monkeypatch, tmp_path, digits_shards, deepspeed_cpu,
                                                            set_device_calls):
    """Trainer.setup on a (hand-built) 4-GPU platform at local rank 2: set_device(2) comes before the
    broadcast of the resume decision (with NCCL an object collective runs on the current device: before
    the fix every rank of a node broadcast on cuda:0). Faked: set_device; the broadcast records and
    stops setup there (the rest is the CPU run the other tests cover)."""
    from mst_ds import job, trainer
    from mst_ds.config import load_config

    class Stop(Exception):
        pass

    def broadcast(obj):
        set_device_calls.append(("broadcast",))
        raise Stop

    if not torch.distributed.is_initialized():
        eng.init_distributed(eng.Platform("cpu"))  # the real CPU start; setup then finds the group started
    monkeypatch.setattr(trainer, "broadcast", broadcast)
    monkeypatch.setenv("LOCAL_RANK", "2")
    cfg = load_config("tiny", ["optim.batch_size=8", "data.num_workers=0", f"data.train={digits_shards}",
                               "engine.precision=fp32"]).config
    lock = job.RunLock(tmp_path / "run")
    try:
        with pytest.raises(Stop):
            trainer.setup(cfg, tmp_path / "run", lock, platform=V100)
    finally:
        lock.release()
    assert set_device_calls == [("set_device", 2), ("broadcast",)]


def test_evaluation_without_a_launcher_uses_local_rank(monkeypatch, set_device_calls):
    """`mst-ds knn/linear` bare: the GPU LOCAL_RANK names (before: always cuda:0), else the first visible."""
    from mst_ds.eval.features import init_dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # a bare process: no group
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_dist(V100).device == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert init_dist(V100).device == torch.device("cuda", 0)
    assert init_dist(eng.Platform("cpu")).device == torch.device("cpu")
    assert os.environ.get("LOCAL_RANK") is None  # the environment is not rewritten by a bare start


# --------------------------------------------------------------------------------------------------
# Real DeepSpeed engines on CPU: ZeRO 0–3 × fp16 / bf16
# --------------------------------------------------------------------------------------------------
SCALE_POWER = 16


def _tiny_engine(stage: int, precision: str, lr: float = 1e-2):
    """A real DeepSpeed engine over two Linear layers (student) + its fp32 teacher copied before
    ``deepspeed.initialize`` → (engine, teacher)."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    teacher = copy.deepcopy(model)
    block = ({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": SCALE_POWER}} if precision == "fp16"
             else {"bf16": {"enabled": True}})
    config = {"train_batch_size": 2, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}, **block}
    engine, *_ = deepspeed.initialize(model=model, optimizer=eng.BlockwiseAdamW(model.parameters(), lr=lr),
                                      config=config)
    return engine, teacher


def _train(engine, steps: int = 2) -> None:
    """``steps`` applied optimizer steps (a small loss: no fp16 overflow at the initial scale)."""
    g = torch.Generator().manual_seed(1)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(2, 16, generator=g).to(dtype)
        engine.backward(engine(x).float().pow(2).mean() * 1e-3)
        engine.step()
        assert engine.was_step_applied()


@pytest.fixture(scope="module")
def engines(deepspeed_cpu):
    """{(stage, precision): (engine, teacher)} for ZeRO 0–3 × fp16 / bf16. Faked: DeepSpeed's CPU
    accelerator says fp16 is supported (it refuses before building the optimizer otherwise)."""
    from deepspeed.accelerator import get_accelerator

    eng.init_distributed(eng.Platform("cpu"))
    acc = type(get_accelerator())
    real = acc.is_fp16_supported
    acc.is_fp16_supported = lambda self: True
    try:
        return {(stage, p): _tiny_engine(stage, p) for stage in range(4) for p in ("fp16", "bf16")}
    finally:
        acc.is_fp16_supported = real


# ZeRO-0 bf16 with a torch optimizer is DeepSpeed's FP16_UnfusedOptimizer too (bf16 groups, no scaling).
EXPECTED_CLASS = {(0, "fp16"): "FP16_UnfusedOptimizer", (0, "bf16"): "FP16_UnfusedOptimizer",
                  (1, "fp16"): "DeepSpeedZeroOptimizer", (1, "bf16"): "DeepSpeedZeroOptimizer",
                  (2, "fp16"): "DeepSpeedZeroOptimizer", (2, "bf16"): "DeepSpeedZeroOptimizer",
                  (3, "fp16"): "DeepSpeedZeroOptimizer_Stage3", (3, "bf16"): "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.parametrize("stage,precision", sorted(EXPECTED_CLASS))
def test_loss_scale_is_read_for_every_optimizer_class(engines, stage, precision):
    """fp16: the dynamic scale the optimizer's own scaler holds, at every stage — before the fix ZeRO-0
    read 1.0 (FP16_UnfusedOptimizer has no ``cur_scale``); bf16: 1.0."""
    engine, _ = engines[(stage, precision)]
    opt = engine.optimizer
    assert type(opt).__name__ == EXPECTED_CLASS[(stage, precision)]
    if precision == "fp16":
        own = opt.loss_scale_config.cur_scale if stage == 0 else opt.loss_scaler.cur_scale
        assert own >= 2.0 ** (SCALE_POWER - 4) and eng.loss_scale(engine) == own
    else:
        assert eng.loss_scale(engine) == 1.0


def test_loss_scale_of_the_fused_fp16_optimizer_and_of_a_torch_optimizer():
    """FP16_Optimizer (ZeRO-0 fp16 with DeepSpeed's FusedAdam, which needs a GPU build): an instance
    with its real attribute layout (``loss_scale_config``, ``custom_loss_scaler``), read through its
    real ``loss_scale`` property. A torch optimizer (ZeRO-0 fp32): 1.0."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    fused = FP16_Optimizer.__new__(FP16_Optimizer)
    fused.loss_scale_config = SimpleNamespace(use_grad_scaling=True, cur_scale=1024.0)
    fused.custom_loss_scaler = False
    assert eng.loss_scale(SimpleNamespace(optimizer=fused)) == 1024.0
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert eng.loss_scale(SimpleNamespace(optimizer=torch_opt)) == 1.0


def test_loss_scale_follows_an_overflow_at_zero0_fp16(deepspeed_cpu, monkeypatch):
    """An inf gradient at ZeRO-0 fp16: DeepSpeed skips the step and halves the scale; the logged scale follows."""
    from deepspeed.accelerator import get_accelerator

    eng.init_distributed(eng.Platform("cpu"))
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # faked, as above
    engine, _ = _tiny_engine(0, "fp16")
    x = torch.full((2, 16), 1e4, dtype=torch.float16)
    engine.backward(engine(x).float().pow(2).sum() * 1e30)
    engine.step()
    assert not engine.was_step_applied()
    assert eng.loss_scale(engine) == 2.0 ** (SCALE_POWER - 1)


def test_per_param_clipping_unscales_an_fp16_norm_that_overflows(deepspeed_cpu, monkeypatch):
    """ZeRO-0 fp16: a loss-scaled gradient whose elements are finite but whose fp16 norm is inf (256 ×
    5000 → 80,000 > 65,504). Before: the fp16 norm was inf (and the scale read as 1.0), so the coefficient
    was 0 and the gradient was zeroed with no overflow flagged. After: clipped on the unscaled fp32 norm."""
    from deepspeed.accelerator import get_accelerator

    eng.init_distributed(eng.Platform("cpu"))
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # faked, as above
    engine, _ = _tiny_engine(0, "fp16")
    x = torch.randn(2, 16).half()
    engine.backward(engine(x).float().pow(2).sum())  # real backward: every gradient exists
    weight, bias = engine.module[0].weight, engine.module[0].bias
    assert torch.isinf(torch.full((256,), 5000.0, dtype=torch.float16).norm(2))  # what the old code met
    weight.grad.copy_(torch.full_like(weight.grad, 5000.0))
    bias.grad.copy_(torch.full_like(bias.grad, 1.0))  # unscaled norm 4/65536: not clipped
    bias0 = bias.grad.clone()
    scale = eng.loss_scale(engine)
    assert scale == 2.0 ** SCALE_POWER
    clipped = eng.clip_per_param(engine, max_norm=1.0)
    unscaled = float(weight.grad.float().norm(2)) / scale
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().min() > 0
    assert unscaled == pytest.approx(1.0, rel=1e-3)  # clipped to max_norm, fp16 rounding of the elements
    assert torch.equal(bias.grad, bias0)
    assert clipped >= 1


@pytest.mark.parametrize("stage,precision", sorted(EXPECTED_CLASS))
def test_ema_reads_the_fp32_masters_at_every_stage_and_precision(engines, stage, precision, monkeypatch):
    """teacher = m·t + (1 − m)·(fp32 master), exactly. ZeRO-0 fp16 and bf16 keep their masters in
    FP16_UnfusedOptimizer.fp32_groups, which safe_get_full_fp32_param does not see (before: the EMA
    silently followed the fp16/bf16-rounded weights)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    from mst_ds.ema import EMATeacher, fp16_optimizer_masters

    # faked, as in the fixture: DeepSpeed's gradient all-reduce checks the dtype against the accelerator's
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    engine, teacher = engines[(stage, precision)]
    teacher = copy.deepcopy(teacher)
    _train(engine)
    masters = fp16_optimizer_masters(engine.optimizer)
    assert bool(masters) == (stage == 0)
    ema = EMATeacher(teacher, engine.module, zero_stage=stage, low_precision=True, optimizer=engine.optimizer)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema.update(0.5)
    rounded = 0
    for (n, p), s in zip(teacher.named_parameters(), engine.module.parameters()):
        master = safe_get_full_fp32_param(s)
        master = masters[id(s)] if master is None else master
        assert master.dtype == torch.float32 and p.dtype == torch.float32
        torch.testing.assert_close(p, before[n] * 0.5 + master * 0.5, rtol=0, atol=0)
        if stage != 3:  # ZeRO-3 holds no full module copy to compare with
            rounded += not torch.equal(master, s.detach().float())
    assert stage == 3 or rounded > 0  # the masters are not the low-precision copies: the test can tell


def test_blockwise_adamw_leaves_accelerator_tensors_to_torch():
    """Accelerator tensors take torch's own AdamW step (a meta tensor stands for a GPU one: not CPU)."""
    assert not eng.BlockwiseAdamW([nn.Parameter(torch.zeros(4, device="meta"))])._blockwise()


# --------------------------------------------------------------------------------------------------
# GPU RNG restore with fewer and more devices
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved,visible,restored", [(4, 1, [0]), (2, 2, [0, 1]), (2, 4, [0, 1])])
def test_gpu_rng_restore_sets_only_the_devices_this_task_has(monkeypatch, saved, visible, restored):
    """The GPU count comes from the platform, passed in. Faked: torch.cuda.get_rng_state, and
    set_rng_state, which raises IndexError for an ordinal the process does not have (as torch's does:
    ``default_generators[idx]``). Before: the saver's every device was restored → IndexError in a task
    that sees fewer."""
    calls = []

    def set_rng_state(state, device=0):
        if device >= visible:
            raise IndexError(f"tuple index out of range ({device})")
        calls.append(device)

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: torch.full((8,), device, dtype=torch.uint8))
    state = ckpt.rng_state(saved)  # the saver's: one state per GPU its platform counted
    assert len(state["cuda"]) == saved
    ckpt.set_rng_state(state, visible)  # the restoring task's platform count
    assert calls == restored
    calls.clear()
    ckpt.set_rng_state(state, gpus=0)  # a CPU process given the platform's count
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Precision on resume
# --------------------------------------------------------------------------------------------------
def test_resume_under_another_precision_is_refused_unless_allowed(trained_run):
    """A checkpoint trained in fp32 (meta "precision") resumed by a run that would train in bf16 (the
    same config: ``precision: auto`` is fp16 on a V100, bf16 on an A100). Before: never compared."""
    from mst_ds.checkpoint_manager import find_resume
    from mst_ds.config import config_from_file
    from mst_ds.run_dir import RunDir

    run = RunDir(trained_run)
    cfg = config_from_file(run.config)
    tag, meta = find_resume(cfg, run.checkpoints, check_files=False, precision="fp32")
    assert meta["precision"] == "fp32"
    with pytest.raises(ConfigError) as err:
        find_resume(cfg, run.checkpoints, check_files=False, precision="bf16")
    assert "\n" not in str(err.value) and "trained in fp32" in str(err.value) and "allow_config_change" in str(err.value)
    allowed = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"allow_config_change": True})})
    assert find_resume(allowed, run.checkpoints, check_files=False, precision="bf16")[0] == tag


# --------------------------------------------------------------------------------------------------
# SyncBN
# --------------------------------------------------------------------------------------------------
def test_sync_bn_converts_on_gpu_ranks_only():
    """torch's SyncBN refuses CPU tensors: converted for a GPU device in a world > 1 (the module is
    built on CPU either way), kept per-rank BN on CPU and in a world of one."""
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    converted, on = eng.convert_sync_bn(model(), 2, True, torch.device("cuda", 0))
    assert on and isinstance(converted[1], nn.SyncBatchNorm)
    for world, enabled, dev in ((2, True, torch.device("cpu")), (1, True, torch.device("cuda", 0)),
                                (2, False, torch.device("cuda", 0))):
        kept, on = eng.convert_sync_bn(model(), world, enabled, dev)
        assert not on and not isinstance(kept[1], nn.SyncBatchNorm)


# --------------------------------------------------------------------------------------------------
# The photometric stage, the loader, metrics, and the commands' defaults
# --------------------------------------------------------------------------------------------------
def test_photometric_accelerator_branches_equal_the_cpu_branches(monkeypatch):
    """An accelerator's tensors take the plain branches (NCHW blur, ``index_copy_``, one batch per local
    view, no fused kernels). Faked: ``augment.cpu_branches`` answers False for these CPU tensors, so those
    branches run here; their output equals the CPU-tuned branches' bit for bit (the same draws)."""
    from mst_ds.config import AugmentConfig
    from mst_ds.data import augment

    # fuse_cpu off: the compiled kernels (CPU-only, bit-identical to eager) are tests/test_augment.py's
    cfg = AugmentConfig(blur_p=(1.0, 0.5), local_blur_p=1.0, solarize_p=(0.5, 0.5), fuse_cpu=False)
    ph = augment.Photometric.from_config(cfg)
    u8 = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = [u8[:8], u8[8:16], u8[16:24, :, :12, :12], u8[24:32, :, :12, :12], u8[32:40, :, :12, :12]]
    tuned = ph(views, torch.Generator().manual_seed(3))
    monkeypatch.setattr(augment, "cpu_branches", lambda x: False)
    assert not ph._batch_locals(views[2:])
    plain = ph(views, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(tuned, plain))
    rows = torch.tensor([3, 0])
    y = torch.rand(2, 3, 4, 4)
    monkeypatch.setattr(augment, "cpu_branches", lambda x: True)
    by_row = augment.put_rows(torch.zeros(5, 3, 4, 4), rows, y)
    monkeypatch.setattr(augment, "cpu_branches", lambda x: False)
    assert torch.equal(augment.put_rows(torch.zeros(5, 3, 4, 4), rows, y), by_row)


def test_a_gpu_rank_pins_its_loader_memory(digits_shards):
    """The trainer asks for pinned memory on a GPU platform (``pin_memory=t.platform.kind != "cpu"``); the
    loader hands it to its DataLoader. Only the flag is checked: pinning itself needs an accelerator."""
    from mst_ds.config import load_config
    from mst_ds.data.reader import make_train_loader

    cfg = load_config("tiny", ["data.num_workers=2"]).config
    for pin in (False, True):
        loader = make_train_loader(str(digits_shards), cfg, rank=0, world_size=1, micro_batch=8, epoch=0, pin_memory=pin)
        assert loader.worker_loader().pin_memory is pin


def test_peak_memory_of_a_gpu_rank_is_its_allocator_peak(monkeypatch):
    """On a GPU the peak is torch's allocator peak of this rank's device, in GiB (faked:
    ``torch.cuda.max_memory_allocated``); on CPU the process's peak RSS."""
    from mst_ds import metrics

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: asked.append(d) or 3 * 2**30)
    assert metrics.peak_memory_gb(torch.device("cuda", 1)) == 3.0 and asked == [torch.device("cuda", 1)]
    assert 0 < metrics.peak_memory_gb(torch.device("cpu")) < 1024 and len(asked) == 1


def test_train_names_deepspeeds_cpu_accelerator_only_without_a_gpu():
    from mst_ds.train import default_accelerator

    for gpu, env, want in ((False, {}, "cpu"), (True, {}, None), (False, {"DS_ACCELERATOR": "cuda"}, "cuda")):
        default_accelerator(env, gpu_visible=gpu)
        assert env.get("DS_ACCELERATOR") == want


def test_study_runs_on_one_cpu_process_only_without_a_gpu():
    from mst_ds.study import default_launch

    def args(cpu=None, launcher=None):
        return SimpleNamespace(cpu=cpu, launcher=launcher)

    a = args()
    default_launch(a, gpu_visible=False)
    assert a.cpu == 1
    a = args()
    default_launch(a, gpu_visible=True)
    assert a.cpu is None and a.launcher is None  # launch.sh's default: every local GPU
    for given in (args(cpu=4), args(launcher="--nodes 2")):
        before = dict(vars(given))
        default_launch(given, gpu_visible=False)
        assert vars(given) == before
