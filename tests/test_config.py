"""Presets load; bad input to `mst-ds plan` is one line naming the field, exit 2, nothing written."""

from __future__ import annotations

import pytest

from mst_ds import cli
from mst_ds.config import ConfigError, config_from_file, derive, list_presets, load_config


def test_every_preset_loads_and_derives():
    names = list_presets()
    assert {"mst_deit_s_100ep", "mst_deit_s_300ep", "dino_deit_s_100ep", "tiny"} <= set(names)
    assert len(names) >= 15
    for name in names:
        cfg = load_config(name).config
        d = derive(cfg, world_size=1)
        assert d.total_steps > 0 and d.peak_lr > 0


def test_paper_numbers_in_presets():
    cfg = load_config("mst_deit_s_100ep").config
    assert derive(cfg, world_size=16).peak_lr == pytest.approx(2e-3)
    assert (cfg.loss.dino_weight, cfg.loss.restore_weight) == (1.0, 0.6)
    assert cfg.mask.enabled and cfg.decoder.enabled and cfg.model.head.out_dim == 65536
    dino = load_config("dino_deit_s_100ep").config
    assert not dino.mask.enabled and not dino.decoder.enabled and dino.loss.restore_weight == 0
    row1 = load_config("ablation_t4_random_bert_masked_nodino").config
    assert (row1.mask.strategy, row1.mask.replacement, row1.loss.restore_target, row1.loss.dino_weight) == (
        "random", "bert", "masked_patches", 0.0)
    assert load_config("mst_deit_s_300ep").config.schedule.epochs == 300


def test_issue19_presets_loss_balance_and_small_scale():
    """MST presets restore with mean_ln_k (§10's balance); `mean` is its own ablation row; `small` has 64
    tokens per global view; the study's extra rows change exactly what they name."""
    for name in ("mst_deit_s_100ep", "mst_deit_s_300ep", "small", "tiny"):
        assert load_config(name).config.loss.restore_reduction == "mean_ln_k", name
    assert load_config("ablation_restore_mean").config.loss.restore_reduction == "mean"
    small = load_config("small").config
    grid = small.augment.global_crop_size // small.model.timm_kwargs["patch_size"]
    assert grid * grid >= 64 and 2 ** len(small.decoder.channels) == small.model.timm_kwargs["patch_size"]
    rnd = load_config("ablation_random_masking").config
    mst = load_config("mst_deit_s_100ep").config
    assert rnd.mask.strategy == "random" and rnd.mask.prob == pytest.approx(mst.mask.ratio * mst.mask.prob)
    assert (rnd.mask.replacement, rnd.loss.restore_target, rnd.decoder.enabled) == ("mask_token", "image", True)
    lam0 = load_config("ablation_lambda2_0").config
    assert lam0.mask.enabled and lam0.mask.strategy == "attention" and not lam0.decoder.enabled
    assert lam0.loss.restore_weight == 0


def test_dino_official_preset_is_dinos_own_vit_s16_recipe():
    """main_dino.py defaults / its README's vanilla ViT-S/16 run (SPEC §9), beside the controlled ablation."""
    cfg = load_config("dino_official_vits16_100ep").config
    assert not cfg.mask.enabled and not cfg.decoder.enabled and cfg.loss.restore_weight == 0
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp) == (0.04, 0.04)
    assert cfg.model.head.norm_last_layer and not cfg.model.head.use_bn and cfg.model.head.out_dim == 65536
    assert (cfg.augment.n_local_crops, cfg.augment.local_crop_size, cfg.augment.local_crop_scale) == (8, 96, (0.05, 0.4))
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.no_decay_rule == "dino"
    d = derive(cfg, world_size=8, dataset_size=1_281_167)
    assert (d.global_batch, d.micro_batch, d.peak_lr, d.freeze_last_layer_steps) == (512, 64, pytest.approx(1e-3), 2502)
    assert (cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (1e-6, 0.04, 0.4)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.momentum_teacher) == (100, 10, 0.996)
    assert cfg.model.drop_path_rate == 0.1 and cfg.loss.student_temp == 0.1
    ablation = load_config("dino_deit_s_100ep").config
    assert ablation.model.head.use_bn and ablation.loss.teacher_temp == 0.07  # MST's recipe minus MST's parts


def test_sources_and_yaml_round_trip(tmp_path):
    loaded = load_config("tiny", ["mask.ratio=0.4"])
    assert loaded.sources["mask.ratio"] == "--set"
    assert loaded.sources["augment.global_crop_size"] == "preset:tiny"
    assert loaded.sources["loss.student_temp"] == "default"
    path = tmp_path / "config.yaml"
    path.write_text(loaded.config.to_yaml())
    assert config_from_file(path) == loaded.config


def test_plan_prints_tables(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", "--preset", "tiny", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("Resolved config", "preset:tiny", "Parameters", "mask token", "decoder", "steps per epoch",
                   "end of warm-up", "last step", "ESTIMATE", "Loss balance", "mean_ln_k", "(configured)"):
        assert needle in out, needle
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["presets"]) == 0
    assert "dino_deit_s_100ep" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["--set", "mask.bogus=1"], "mask.bogus"),
    (["--set", "mask.prob=1.5"], "mask.prob"),
    (["--world-size", "3"], "optim.batch_size"),
    (["--set", "decoder.channels=[32, 16]"], "decoder.channels"),
    (["--preset", "no_such_preset"], "no_such_preset"),
])
def test_plan_bad_input_is_one_line_exit_2_nothing_written(argv, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["plan", "--preset", "tiny", *argv] if "--preset" not in argv else ["plan", *argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_plan_exit_code_through_the_console_script(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mst_ds.cli", "plan", "--preset", "tiny", "--set", "mask.prob=2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "mask.prob" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_error_is_a_value_error_with_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["optim.batch_size=-1"])
    assert "\n" not in str(err.value) and "optim.batch_size" in str(err.value)


# Issue 20, defect 5: a YAML alias bomb (each level 9 references to the one before: 9^7 ≈ 4.8 M leaves once
# expanded by deepcopy, validation or the hash; a few more levels exhaust memory) must be one line, at
# once, wherever a config can come from.
_BOMB_LEVELS = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(6)]
_BOMB_FLOW = "{" + ", ".join(_BOMB_LEVELS) + "}"


def _run_limited(argv: list[str], cwd) -> tuple[int, str]:
    """`python -m mst_ds.cli ARGV`, stopped after 60 s (the unfixed code expanded the bomb)."""
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-m", "mst_ds.cli", *argv], cwd=cwd, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return r.returncode, r.stderr


@pytest.mark.parametrize("where", ["recipe", "set", "run_config"])
def test_a_yaml_alias_bomb_is_refused_in_one_line(where, tmp_path):
    bomb = "\n".join(f"    {line}" for line in _BOMB_LEVELS)
    if where == "recipe":
        (tmp_path / "bomb.yaml").write_text(f"parent: tiny\nmodel:\n  timm_kwargs:\n{bomb}\n")
        argv = ["plan", "--no-model", "--preset", str(tmp_path / "bomb.yaml")]
    elif where == "set":
        argv = ["plan", "--no-model", "--preset", "tiny", "--set", f"model.timm_kwargs={_BOMB_FLOW}"]
    else:  # a handed-over run directory's config.yaml (read as the evaluators and export read it)
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text(load_config("tiny").config.to_yaml().replace(
            "  timm_kwargs:\n", f"  timm_kwargs:\n{bomb}\n", 1))
        assert "*a" in (run / "config.yaml").read_text()
        argv = ["plan", "--no-model", "--preset", str(run / "config.yaml")]
    rc, err = _run_limited(argv, tmp_path)
    assert rc == 2, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "YAML aliases expand" in err, err[-2000:]


def test_yaml_aliases_within_the_bound_still_work(tmp_path):
    (tmp_path / "r.yaml").write_text("parent: tiny\nloss: &l {student_temp: 0.2}\n")
    assert load_config(str(tmp_path / "r.yaml")).config.loss.student_temp == 0.2
