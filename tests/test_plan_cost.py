"""``mst-ds plan`` prices runs and studies in GPU-hours from an analytic FLOP count (issue 34).

The count (mst_ds.cost.flops_per_image) is checked against torch's FlopCounterMode on the real training
step; the commands run through ``mst_ds.cli.main`` in-process, as a user types them.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils import flop_counter as fc

from mst_ds import cost, study
from mst_ds.cli import main
from mst_ds.config import ConfigError, load_config
from mst_ds.model.mst import MSTModel


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
                   _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's input and weight gradients each cost its forward. torch's own formula counts the
    weight gradient of a grouped convolution as if it were dense (the decoder's depthwise 3×3 C times
    over), so the check counts it from the forward instead."""
    forward = fc.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def counted_flops_per_image(cfg, batch: int = 2) -> float:
    """FLOPs of one real training forward + backward (teacher, student, head, decoder, losses) per image,
    as torch's FlopCounterMode counts matrix multiplications and convolutions. Explicit attention
    (model.fused_attn false): a fused kernel's backward would add its recomputation, which is not model work."""
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    a = cfg.augment
    views = [torch.randn(batch, 3, a.global_crop_size, a.global_crop_size) for _ in range(2)] + \
        [torch.randn(batch, 3, a.local_crop_size, a.local_crop_size) for _ in range(a.n_local_crops)]
    mapping = {torch.ops.aten.convolution_backward: _conv_backward}
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(views, teacher, 0.04, torch.Generator().manual_seed(0))["loss"].backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("sets", [
    [],
    ["decoder.kind=transposed_conv", "decoder.use_bn=false"],
    ["decoder.enabled=false", "mask.enabled=false", "model.head.nlayers=1"],
    ["augment.n_local_crops=0", "model.head.nlayers=2", "model.timm_kwargs={img_size: 32, patch_size: 4, embed_dim: 48, "
     "depth: 2, num_heads: 3, mlp_ratio: 3.0}", "decoder.channels=[16, 8]"],
    ["mask.strategy=random", "mask.replacement=bert", "loss.restore_target=masked_patches", "loss.dino_weight=0"],
])
def test_flops_per_image_equals_the_counter_on_the_real_step(sets):
    cfg = load_config("tiny", ["model.fused_attn=false", *sets]).config
    assert cost.flops_per_image(cfg) == counted_flops_per_image(cfg)


def test_rows_that_change_only_losses_or_masks_share_one_count():
    base = load_config("mst_deit_s_in100").config
    rows = [load_config("mst_deit_s_in100", s).config for s in (["mask.strategy=random", "loss.dino_weight=0"],
                                                                  ["loss.restore_target=masked_patches"])]
    assert {cost.flops_key(c) for c in rows} == {cost.flops_key(base)}
    assert cost.flops_key(load_config("mst_deit_s_in100", ["augment.n_local_crops=8"]).config) != cost.flops_key(base)
    # DeiT-S MST, 2 × 224 + 6 × 96: 104.8 GFLOP (gpu_check's counter: 108.0, with the fused attention
    # backward's recomputation and the depthwise weight gradients counted dense).
    assert 104e9 < cost.flops_per_image(base) < 105e9


@pytest.mark.slow  # DeiT-S forward + backward on CPU: ~30 s
def test_flops_per_image_equals_the_counter_on_deit_s():
    cfg = load_config("mst_deit_s_in100", ["model.fused_attn=false"]).config
    assert cost.flops_per_image(cfg) == counted_flops_per_image(cfg, batch=1)


def test_unknown_architecture_is_refused_not_guessed():
    cfg = load_config("tiny", ["model.arch=vit_small_patch16_reg4_dinov2"]).config
    with pytest.raises(ConfigError, match="plain ViTs"):
        cost.flops_per_image(cfg)
    cfg = load_config("tiny", ["model.timm_kwargs={reg_tokens: 4}"]).config
    with pytest.raises(ConfigError, match="reg_tokens"):
        cost.flops_per_image(cfg)


def test_gpu_hours_arithmetic():
    # 1e6 images × 1e11 FLOPs at 1000 TFLOP/s × 0.5 = 200 s.
    assert cost.gpu_hours(10**6, 1e11, 1000.0, 0.5) == pytest.approx(200 / 3600)


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_gpu_check_results(tmp_path, monkeypatch):
    """A developer's own bench/gpu_check.log must not change what these tests expect."""
    monkeypatch.setattr(cost, "DEFAULT_GPU_CHECK", tmp_path / "absent.log")


def test_plan_study_table4_on_in100_prints_the_gpu_hour_table(capsys):
    assert main(["plan", "--study", "--base", "mst_deit_s_in100", "--rows", "table4", "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "Cost per run (H100 GPU-hours" in out and "MFU 0.30 (assumed" in out
    images = 400 * (126689 // 1024) * 1024  # 400 epochs of 123 whole batches of 1,024
    assert f"{images:,}" in out
    hours = cost.gpu_hours(images, cost.flops_per_image(load_config("mst_deit_s_in100").config), 989.0, 0.30)
    assert out.count(f" {study.fmt_hours(hours)} ") == 4  # per run: the 4 rows share one FLOP count
    assert f"≈ {study.fmt_hours(12 * hours)} H100 GPU-hours" in out  # 4 rows × 3 seeds
    assert "CPU" not in out  # CPU time only with --measure-cpu


def test_plan_study_does_not_import_torch(tmp_path):
    import subprocess

    code = ("import sys; from mst_ds.cli import main; rc = main(['plan', '--study', '--base', 'mst_deit_s_in100', "
            "'--rows', 'table4']); print('torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_plan_study_with_an_unknown_base_prints_nothing_but_the_error(capsys):
    assert main(["plan", "--study", "--base", "nosuch", "--rows", "table4"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "nosuch" in err and len(err.strip().splitlines()) == 1


def test_device_peak_and_measured_mfu(tmp_path, capsys):
    log = tmp_path / "gpu_check.log"
    log.write_text("gpu_check: torch 2.9, deepspeed 0.18, CUDA 12.8, 1 × NVIDIA A100-SXM4-80GB; preset mst_deit_s_100ep\n"
                   'BENCH {"name": "MFU, mst_deit_s_100ep bf16 step, batch 256", "ratio": 0.412, "target": ">= 0.3", "met": true}\n')
    assert main(["plan", "--study", "--base", "mst_deit_s_in100", "--rows", "mst_vs_dino", "--seeds", "1",
                 "--device", "a100", "--gpu-check", str(log)]) == 0
    out = capsys.readouterr().out
    assert "A100" in out and "MFU 0.41 (measured" in out and "312" in out
    # A measurement on another device is not silently applied to this one.
    assert main(["plan", "--study", "--base", "mst_deit_s_in100", "--rows", "mst_vs_dino", "--device", "v100",
                 "--gpu-check", str(log)]) == 2
    assert "A100" in capsys.readouterr().err
    # No cited peak for a DCU: --peak-tflops, stated as given.
    assert main(["plan", "--study", "--rows", "mst_vs_dino", "--device", "dcu"]) == 2
    assert "--peak-tflops" in capsys.readouterr().err
    assert main(["plan", "--study", "--rows", "mst_vs_dino", "--device", "dcu", "--peak-tflops", "100",
                 "--mfu", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "given by --peak-tflops" in out and "MFU 0.25 (given" in out


@pytest.mark.parametrize("content", [b"", b"BENCH {not json\n", b'BENCH {"name": "MFU, x", "ratio": 3}\n',
                                     b'{"name": "MFU, x", "ratio": true}\n', b"\xff\xfe MFU"])
def test_malformed_gpu_check_file_is_one_line(tmp_path, capsys, content):
    log = tmp_path / "gpu_check.log"
    log.write_bytes(content)
    assert main(["plan", "--study", "--rows", "mst_vs_dino", "--gpu-check", str(log)]) == 2
    err = capsys.readouterr().err
    assert "--gpu-check" in err and len(err.strip().splitlines()) == 1


def test_plan_of_one_run_prints_its_cost(capsys):
    assert main(["plan", "--preset", "mst_deit_s_in100", "--no-model", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "PFLOP" in out


def test_measure_cpu_adds_the_measured_column(capsys):
    assert main(["plan", "--study", "--base", "tiny", "--rows", "mst_deit_s_100ep", "--seeds", "1", "--steps", "10",
                 "--measure-cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU h/run here" in out and "CPU-hours on this machine" in out


def test_plan_of_an_uncounted_architecture_says_so_and_prints_the_rest(capsys):
    assert main(["plan", "--preset", "tiny", "--no-model", "--set", "model.timm_kwargs={reg_tokens: 4}"]) == 0
    out = capsys.readouterr().out
    assert "training cost not shown" in out and "reg_tokens" in out and "GPU-hours" not in out
    assert "Batch and steps" in out


# --------------------------------------------------------------------------------------------------
# Communication per optimizer step (issue 30): a torch-free parameter count and DeepSpeed's collectives
# --------------------------------------------------------------------------------------------------
_VIT_KW = "model.timm_kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 4"


@pytest.mark.parametrize("preset,sets", [
    ("tiny", []), ("mst_deit_s_100ep", []),
    ("tiny", ["decoder.kind=transposed_conv", "decoder.use_bn=false", "model.head.use_bn=false",
              "model.head.norm_last_layer=true"]),
    ("tiny", ["model.head.nlayers=1", _VIT_KW + ", qk_norm: true, init_values: 0.1, qkv_bias: false}"]),
    ("tiny", ["decoder.enabled=false", "model.head.nlayers=4"]),
])
def test_parameter_count_from_the_config_equals_the_built_model(preset, sets):
    """What DeepSpeed partitions (the optimizer's parameters) and what the EMA reads (the teacher's
    trained parameters), counted without building anything."""
    from mst_ds.engine import param_groups

    cfg = load_config(preset, sets).config
    model = MSTModel.from_config(cfg)
    count = cost.parameter_count(cfg)
    assert count.student == sum(p.numel() for g in param_groups(model) for p in g["params"])
    assert count.teacher == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                                and not n.startswith("decoder."))


def test_comm_per_step_prices_deepspeeds_collectives_as_rings():
    cfg = load_config("tiny", ["engine.zero_stage=2", "engine.precision=fp32"]).config
    p = cost.parameter_count(cfg).student
    rows = cost.comm_per_step(cfg, 16, 1)
    # ZeRO-2 fp32: the gradients all-reduced (DeepSpeed's multi-rank buckets), the parameters all-gathered.
    assert [(r.collective, r.bytes) for r in rows] == [("all-reduce", 2 * 15 / 16 * p * 4), ("all-gather", 15 / 16 * p * 4)]
    assert cost.comm_per_step(cfg, 1, 1) == []
    # ZeRO-2 reduces every micro-batch's gradients; ZeRO-0 once per optimizer step, with no all-gather.
    assert cost.comm_per_step(cfg, 16, 3)[0].bytes == 3 * rows[0].bytes
    zero0 = load_config("tiny", ["engine.zero_stage=0", "engine.precision=fp32"]).config
    assert [(r.collective, r.bytes) for r in cost.comm_per_step(zero0, 16, 3)] == [("all-reduce", rows[0].bytes)]
    # bf16: the parameters all-gathered in half the bytes, the gradients summed in engine.communication_data_type
    # (fp32 by default), the EMA's fp32 master partitions all-gathered; per-parameter clipping adds full fp32 gradients.
    bf16 = load_config("tiny", ["engine.zero_stage=2", "engine.precision=bf16", "optim.clip_mode=per_param"]).config
    got = {r.what.split(":")[0]: r.bytes for r in cost.comm_per_step(bf16, 16, 1)}
    assert got == {"gradients (every micro-batch": 2 * 15 / 16 * p * 4, "updated parameters": 15 / 16 * p * 2,
                   "EMA": 15 / 16 * p * 4, "per-parameter clipping": 2 * 15 / 16 * p * 4}
    bf16_comm = load_config("tiny", ["engine.zero_stage=2", "engine.precision=bf16",
                                     "engine.communication_data_type=bf16"]).config
    assert cost.comm_per_step(bf16_comm, 16, 1)[0].bytes == 2 * 15 / 16 * p * 2


def test_plan_world_size_prints_the_communication_estimate(capsys):
    assert main(["plan", "--preset", "tiny", "--no-model", "--world-size", "16", "--set", "engine.zero_stage=2"]) == 0
    out = capsys.readouterr().out
    total = sum(r.bytes for r in cost.comm_per_step(load_config("tiny", ["engine.zero_stage=2"]).config, 16, 1))
    assert "Communication per rank and optimizer step" in out and f"{total / 2**20:,.2f}" in out
    assert main(["plan", "--preset", "tiny", "--no-model"]) == 0  # one rank: nothing to communicate
    assert "Communication per rank" not in capsys.readouterr().out


def test_comm_estimate_is_torch_free():
    import subprocess

    code = ("import sys; from mst_ds.config import load_config; from mst_ds.cost import comm_per_step; "
            "print(sum(r.bytes for r in comm_per_step(load_config('mst_deit_s_100ep').config, 128, 1)) > 0, "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
