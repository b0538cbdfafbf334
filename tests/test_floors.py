"""pyproject.toml's version floors = the first releases with the APIs this code calls (issue 29, item 4).

The table below is the source the floors were set from. How each first release was established:
- torch: release history (2.14.1 is the only torch that installs here: a floor wheel is ~0.8 GB and
  PyTorch's CPU/CUDA indexes are out of reach). ``get_total_norm``: pytorch/pytorch#139662, first in 2.6.0
  (also allenai/OLMo-core#186). Functional ``adam(decoupled_weight_decay=)``: #143710 (merged January 2025,
  after 2.6's branch cut), first in 2.7.0. ``torch.serialization.safe_globals``: 2.5.0.
- DeepSpeed: the sdists of 0.14.0, 0.15.0-0.15.4 and 0.16.0 read side by side (2026-12-06):
  ``safe_set_full_grad`` first appears in 0.15.3 (absent from 0.15.0-0.15.2); ``engine.compile`` and
  ``ds_to_universal --inject_missing_state`` in 0.15.0; everything else is in 0.14.0, the oldest read.
  The slow test below installs the floor DeepSpeed from PyPI and imports every entry with it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (dotted name, first release with it, file of this project that calls it). A dotted name ending in
# "(kw=)" names a keyword argument of the callable before it.
TORCH_APIS = [
    ("torch.nn.utils.get_total_norm", "2.6", "mst_ds/engine.py"),
    ("torch.optim.adam.adam(decoupled_weight_decay=)", "2.7", "mst_ds/engine.py"),
    ("torch.serialization.safe_globals", "2.5", "mst_ds/checkpoint.py"),
]
DEEPSPEED_APIS = [
    ("deepspeed.utils.safe_set_full_grad", "0.15.3", "mst_ds/engine.py"),
    ("deepspeed.utils.safe_get_full_grad", "0.14.0", "mst_ds/engine.py"),
    ("deepspeed.utils.safe_get_full_fp32_param", "0.14.0", "mst_ds/ema.py"),
    ("deepspeed.runtime.engine.DeepSpeedEngine.compile", "0.15.0", "mst_ds/engine.py"),
    ("deepspeed.runtime.engine.DeepSpeedEngine.was_step_applied", "0.14.0", "mst_ds/train.py"),
    ("deepspeed.runtime.engine.DeepSpeedEngine.get_global_grad_norm", "0.14.0", "mst_ds/train.py"),
    ("deepspeed.runtime.zero.partition_parameters.register_external_parameter", "0.14.0", "mst_ds/engine.py"),
    ("deepspeed.zero.GatheredParameters", "0.14.0", "mst_ds/ema.py"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "0.14.0", "mst_ds/ema.py"),
    ("deepspeed.utils.tensor_fragment.fragment_address", "0.14.0", "mst_ds/checkpoint.py"),
    ("deepspeed.runtime.zero.config.ZeroStageEnum", "0.14.0", "mst_ds/checkpoint.py"),
    ("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "0.14.0", "mst_ds/checkpoint.py"),
    ("deepspeed.runtime.fp16.fused_optimizer.FP16_Optimizer", "0.14.0", "mst_ds/ema.py"),
    ("deepspeed.runtime.fp16.unfused_optimizer.FP16_UnfusedOptimizer", "0.14.0", "mst_ds/ema.py"),
    ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "0.14.0", "mst_ds/checkpoint.py"),
    ("deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint", "0.14.0", "mst_ds/checkpoint.py"),
    ("deepspeed.checkpoint.ds_to_universal(--inject_missing_state)", "0.15.0", "mst_ds/checkpoint.py"),
    ("deepspeed.accelerator.get_accelerator", "0.14.0", "mst_ds/engine.py"),
    ("deepspeed.initialize", "0.14.0", "mst_ds/engine.py"),
    ("deepspeed.init_distributed", "0.14.0", "mst_ds/engine.py"),
]


def release(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split("."))


def pyproject_floor(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf'^\s*"{name}>=([0-9.]+)', text, re.M)
    assert found, f"pyproject.toml has no floor for {name}"
    return found.group(1)


def torchvision_for(torch_version: str) -> str:
    """torchvision's release paired with a torch release (0.(minor + 15) since torch 2.0)."""
    major, minor = release(torch_version)[:2]
    assert major == 2
    return f"0.{minor + 15}"


def resolve(dotted: str):
    """The object a dotted name (without any "(…)" suffix) names: longest importable module, then attributes."""
    parts = dotted.split("(")[0].split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name, table", [("torch", TORCH_APIS), ("deepspeed", DEEPSPEED_APIS)])
def test_floor_is_the_newest_first_release_in_the_table(name, table):
    assert release(pyproject_floor(name)) == max(release(v) for _, v, _ in table)


def test_torchvision_floor_and_ceiling_pair_with_torch():
    text = (ROOT / "pyproject.toml").read_text()
    assert pyproject_floor("torchvision") == torchvision_for(pyproject_floor("torch"))
    torch_top = re.search(r'"torch>=[0-9.]+,<=([0-9.]+)"', text).group(1)
    vision_top = re.search(r'"torchvision>=[0-9.]+,<=([0-9.]+)"', text).group(1)
    assert vision_top.rsplit(".", 1)[0] == torchvision_for(torch_top)


@pytest.mark.parametrize("dotted, first, where", TORCH_APIS + DEEPSPEED_APIS)
def test_every_listed_api_is_still_called_and_exists_here(dotted, first, where):
    """A stale row (the code no longer calls it) would keep a floor too high; a row the installed
    versions lack would be a wrong entry."""
    leaf = dotted.split("(")[0].rsplit(".", 1)[-1]
    keyword = re.search(r"\((-*\w+)=?\)", dotted)
    source = (ROOT / where).read_text()
    assert leaf in source, f"{where} no longer calls {dotted}"
    if keyword:
        assert keyword.group(1) in source
    obj = resolve(dotted)
    if keyword and not keyword.group(1).startswith("--"):
        assert keyword.group(1) in inspect.signature(obj).parameters
    elif keyword:  # a command-line flag of a DeepSpeed script
        assert keyword.group(1) in Path(inspect.getsourcefile(obj)).read_text()


def test_every_deepspeed_import_in_the_code_is_in_the_table():
    """A new DeepSpeed API in mst_ds must come with a row (and so a floor) here."""
    listed = {d.split("(")[0] for d, _, _ in DEEPSPEED_APIS}
    listed_leaves = {d.rsplit(".", 1)[-1] for d in listed}
    used: set[str] = set()
    for path in (ROOT / "mst_ds").rglob("*.py"):
        text = path.read_text()
        for module, names in re.findall(r"^\s*from (deepspeed[\w.]*) import ([\w, ]+)", text, re.M):
            used |= {f"{module}.{n.strip()}" for n in names.split(",")}
        used |= set(re.findall(r"\b(deepspeed\.(?!__version__)[a-z_]+(?:\.[A-Za-z_]+)*)\(", text))
    missing = sorted(u for u in used if u not in listed and u.rsplit(".", 1)[-1] not in listed_leaves)
    assert not missing, f"DeepSpeed APIs called but not in the floor table: {missing}"


@pytest.mark.slow
def test_floor_deepspeed_installs_and_has_every_listed_api(tmp_path):
    """Installs deepspeed==<floor> from PyPI into a scratch folder (no ops built) and imports every row
    with it, next to this environment's torch. Skipped without network."""
    floor = pyproject_floor("deepspeed")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), f"deepspeed=={floor}"], capture_output=True, text=True,
                         env={**os.environ, "DS_BUILD_OPS": "0"}, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"deepspeed=={floor} not installable here: {pip.stderr.strip().splitlines()[-1:]}")
    probe = "\n".join([
        "import importlib, inspect, sys",
        "import deepspeed",
        f"assert deepspeed.__version__ == {floor!r}, deepspeed.__version__",
        f"names = {[d for d, _, _ in DEEPSPEED_APIS]!r}",
        "for dotted in names:",
        "    parts = dotted.split('(')[0].split('.')",
        "    for cut in range(len(parts), 0, -1):",
        "        try:",
        "            obj = importlib.import_module('.'.join(parts[:cut])); break",
        "        except ImportError:",
        "            continue",
        "    for a in parts[cut:]:",
        "        obj = getattr(obj, a)",
        "    if '(--' in dotted:",
        "        flag = dotted.split('(')[1].rstrip(')')",
        "        assert flag in open(inspect.getsourcefile(obj)).read(), dotted",
        "print('ok', len(names))",
    ])
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{site}", "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0 and res.stdout.strip().endswith(f"ok {len(DEEPSPEED_APIS)}"), res.stderr[-2000:]
