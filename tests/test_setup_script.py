"""scripts/setup.sh per platform (issue 29, item 4): its --dry-run for every platform, checked line by line.

Only the default (no --torch) has installed anything on this machine (CI runs it); the others are
checked here by what they would install. ``keep`` reads the environment's versions through $PYTHON: a
stub interpreter stands in for a vendor (DTK) stack, so no torch of another platform is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"

# platform → (torch, torchvision, wheel index or None). cu126 and cu118 builds ship sm_70 (V100) kernels;
# PyPI's default build and cu130 start at sm_75 (README, "On a cluster" → "Install").
EXPECTED = {
    None: ("2.14.1", "0.29.1", None),
    "cu126": ("2.14.1", "0.29.1", "https://download.pytorch.org/whl/cu126"),
    "cu130": ("2.14.1", "0.29.1", "https://download.pytorch.org/whl/cu130"),
    "cu118": ("2.7.1", "0.22.1", "https://download.pytorch.org/whl/cu118"),
    "rocm6.x": ("2.9.1", "0.24.1", "https://download.pytorch.org/whl/rocm6.4"),
}


def run_setup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MST_TORCH", "PYTHON")}
    return subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def release(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split("."))


def pyproject_range(name: str) -> tuple[str, str]:
    low, high = re.search(rf'"{name}>=([0-9.]+),<=?([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).groups()
    return low, high


@pytest.mark.parametrize("platform", list(EXPECTED))
def test_dry_run_names_the_platforms_pair_and_installs_nothing(platform, tmp_path):
    torch, vision, index = EXPECTED[platform]
    res = run_setup(*(["--torch", platform] if platform else []), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"setup: platform {platform or 'default'} (dry run: nothing installed)"
    assert lines[1] == "venv: .venv from python3"
    assert lines[2] == f"install: torch=={torch} torchvision=={vision}" + (f" --index-url {index}" if index else "")
    assert lines[3:] == ["install: -e .[test]"]
    # The pair satisfies pyproject's range (else `pip install -e .` would replace it) and pairs correctly.
    low, high = pyproject_range("torch")
    assert release(low) <= release(torch) <= release(high)
    assert vision.rsplit(".", 1)[0] == f"0.{release(torch)[1] + 15}"


def test_the_default_is_todays_install():
    """CI runs `bash scripts/setup.sh`: still PyPI's torch 2.14.1 / torchvision 0.29.1, no index."""
    text = SETUP.read_text()
    assert 'default) torch=2.14.1 vision=0.29.1 ;;' in text
    assert run_setup("--dry-run").stdout == run_setup("--dry-run", env={"MST_TORCH": "default"}).stdout


def test_environment_variable_selects_the_platform_and_the_flag_wins():
    assert "whl/cu118" in run_setup("--dry-run", env={"MST_TORCH": "cu118"}).stdout
    res = run_setup("--torch", "cu126", "--dry-run", env={"MST_TORCH": "cu118"})
    assert "whl/cu126" in res.stdout and "cu118" not in res.stdout


def test_unknown_platform_is_one_line():
    res = run_setup("--torch", "cu999", "--dry-run")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "setup: error: --torch cu999: expected one of cu118, cu126, cu130, rocm6.x, keep (or none for PyPI's build)"]


def fake_python(tmp_path: Path, versions: dict[str, str]) -> Path:
    """An interpreter whose environment holds ``versions`` (a vendor stack): the real python with a
    sitecustomize that answers importlib.metadata.version for those names and nothing else."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n"
        f"_V = {versions!r}\n"
        "def _version(name):\n"
        "    if name in _V:\n"
        "        return _V[name]\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = _version\n")
    exe = tmp_path / "vendor-python"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec /usr/bin/env python3 \"$@\"\n")
    exe.chmod(0o755)
    return exe


def test_keep_pins_the_environments_builds(tmp_path):
    py = fake_python(tmp_path, {"torch": "2.7.0+das.opt1.dtk2504", "torchvision": "0.22.0+das.opt1.dtk2504",
                                "deepspeed": "0.16.3+das.opt1.dtk2504"})
    res = run_setup("--torch", "keep", "--dry-run", env={"PYTHON": str(py)})
    assert res.returncode == 0, res.stderr
    pins = "torch==2.7.0+das.opt1.dtk2504 torchvision==0.22.0+das.opt1.dtk2504 deepspeed==0.16.3+das.opt1.dtk2504"
    assert res.stdout.splitlines() == [
        "setup: platform keep (dry run: nothing installed)",
        f"venv: .venv from {py} --system-site-packages",
        f"keep: {pins} (from the environment)",
        f"install: -e .[test] (constrained to {pins})",
    ]


def test_keep_without_deepspeed_lets_pip_add_it(tmp_path):
    py = fake_python(tmp_path, {"torch": "2.9.0", "torchvision": "0.24.0"})
    res = run_setup("--torch", "keep", "--dry-run", env={"PYTHON": str(py)})
    assert res.returncode == 0, res.stderr
    assert "keep: torch==2.9.0 torchvision==0.24.0 (from the environment)" in res.stdout


@pytest.mark.parametrize("versions, message", [
    ({"torch": "2.4.1+das1", "torchvision": "0.19.1"},
     "setup: error: --torch keep: torch 2.4.1+das1 is below the floor {torch} (pyproject.toml); this code calls APIs it lacks"),
    ({"torch": "2.9.0", "torchvision": "0.24.0", "deepspeed": "0.14.2"},
     "setup: error: --torch keep: deepspeed 0.14.2 is below the floor {deepspeed} (pyproject.toml); this code calls APIs it lacks"),
    ({"torch": "2.9.0"}, "setup: error: --torch keep: no torchvision in "),
    ({}, "setup: error: --torch keep: no torch in "),
])
def test_keep_refuses_what_cannot_run_in_one_line(tmp_path, versions, message):
    py = fake_python(tmp_path, versions)
    res = run_setup("--torch", "keep", "--dry-run", env={"PYTHON": str(py)})
    floors = {n: pyproject_range(n)[0] for n in ("torch", "deepspeed")}
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**floors)), res.stderr
