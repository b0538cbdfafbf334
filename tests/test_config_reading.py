"""Config files are read defensively: a file that is not UTF-8, a directory, an oversized or value-heavy YAML
gives one line and exit 2 from every command that reads one (issue 33, defect 10 and the YAML guard)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mst_ds.cli import main
from mst_ds.config import MAX_CONFIG_BYTES, MAX_YAML_VALUES, ConfigError, config_from_file, read_yaml
from mst_ds.run_dir import RunDir

LATIN1_COMMENT = "# réglage de café\n".encode("latin-1")  # é is 0xe9: one byte that is not UTF-8


def one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_latin1_recipe_is_one_line_for_plan(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_bytes(LATIN1_COMMENT + b"parent: tiny\n")
    assert main(["plan", "--preset", str(recipe), "--no-model"]) == 2
    assert "not UTF-8" in one_line(capsys)


def test_directory_as_preset_is_one_line(tmp_path, capsys):
    (tmp_path / "recipe.yaml").mkdir()
    assert main(["plan", "--preset", str(tmp_path / "recipe.yaml"), "--no-model"]) == 2
    assert "a directory" in one_line(capsys)


@pytest.fixture
def latin1_run(tmp_path, trained_run) -> Path:
    """A copy of the trained run whose config.yaml carries one Latin-1 comment byte."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = RunDir(run).config
    cfg.write_bytes(LATIN1_COMMENT + cfg.read_bytes())
    return run


def test_latin1_run_config_is_one_line_for_knn_export_report(latin1_run, digits_shards, tmp_path, capsys):
    assert main(["knn", "--ckpt", str(latin1_run), "--train", str(digits_shards), "--val", str(digits_shards),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "not UTF-8" in one_line(capsys)
    assert main(["export", str(latin1_run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not UTF-8" in one_line(capsys)
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["report", str(latin1_run), "--out", str(tmp_path / "report")]) == 2
    assert "not UTF-8" in one_line(capsys)


def test_run_config_json_that_is_not_an_object_or_not_json(tmp_path):
    for text, why in (("[1, 2]", "JSON object"), ("{nope", "not valid JSON"), ("[" * 100_000, "not valid JSON")):
        path = tmp_path / "config.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=why):
            config_from_file(path)


def test_oversized_recipe_is_refused_by_its_size_before_parsing(tmp_path, capsys):
    """A 4 MB recipe without aliases: refused by its byte count (it used to be parsed for 46 s and 1.4 GB,
    then refused as an alias bomb)."""
    recipe = tmp_path / "big.yaml"
    with open(recipe, "w") as fh:
        fh.write("parent: tiny\nextra:\n")
        for i in range(4 * 2**20 // 16):
            fh.write(f"  k{i:010d}: 1\n")
    assert recipe.stat().st_size > 4 * 2**20
    assert main(["plan", "--preset", str(recipe), "--no-model"]) == 2
    line = one_line(capsys)
    assert f"{MAX_CONFIG_BYTES:,} bytes" in line and "alias" not in line.split("big.yaml: ", 1)[1]


def test_many_values_without_aliases_are_counted_as_such(tmp_path):
    """Under the byte limit but over the value limit: the message names values, not aliases."""
    path = tmp_path / "many.yaml"
    path.write_text("parent: tiny\nextra: [" + ",".join(["1"] * (MAX_YAML_VALUES + 10)) + "]\n")
    assert path.stat().st_size < MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_VALUES:,} values in one YAML document") as err:
        read_yaml(path)
    assert "alias" not in str(err.value).split(": ", 1)[1]  # (after the path, which names this test)


def test_alias_bomb_still_named_as_one(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases expand"):
        read_yaml(path)


def test_oversized_set_value_is_one_line(capsys):
    assert main(["plan", "--preset", "tiny", "--no-model", "--set", "run.name=" + "x" * (MAX_CONFIG_BYTES + 1)]) == 2
    assert "bytes of YAML" in one_line(capsys)
