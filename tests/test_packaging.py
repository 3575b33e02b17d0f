"""The wheel a user installs (pip install, not -e) carries everything the library reads at run time."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_ships_every_subpackage_the_kernel_source_and_the_model_card_template(tmp_path):
    pytest.importorskip("setuptools", minversion="70")  # builds a wheel without network (no build isolation)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for folder in ("ela_hf", "model_cards"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
         "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("ela_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # export_pruned renders the card from this template: without it a wheel install cannot export
    assert "ela_hf/model_cards/ela_model_card.md" in names
    assert "ela_hf/layers/cpu_kernels.cpp" in names  # the CPU kernels are compiled from it at first use
    subpackages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "ela_hf").rglob("__init__.py")}
    missing = sorted(f"{package}/__init__.py" for package in subpackages if f"{package}/__init__.py" not in names)
    assert not missing, f"pyproject.toml's package list misses {missing}"
