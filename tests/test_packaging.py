"""What `pip install fastlstm` gets: the sdist built from this checkout, the wheel built from that sdist (the path pip
takes for a source release), and the installed package finding its C++ sources in the wheel's layout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

# pyproject.toml's license-files (PEP 639) needs setuptools 77; the test extra brings it. Built without isolation:
# an isolated build would fetch setuptools from an index, which a machine offline cannot.
setuptools = pytest.importorskip("setuptools", minversion="77", reason="building fastlstm needs setuptools >= 77")

# What a build reads; the rest of the checkout (tests, benchmarks and their results) plays no part in the wheel.
_BUILD_INPUTS = ("pyproject.toml", "README.md", "fastlstm", "csrc")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def _build(kind: str, source: Path, out: Path) -> Path:
    """build_meta's build_<kind> in a fresh process, in `source`; the file it wrote."""
    done = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"],
        cwd=source, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(sdist, wheel built from the unpacked sdist), both from a copy of this checkout's build inputs."""
    work = tmp_path_factory.mktemp("release")
    checkout = work / "checkout"
    for name in _BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, checkout / name, ignore=_IGNORED)
        else:
            checkout.mkdir(exist_ok=True)
            shutil.copy2(path, checkout / name)
    sdist = _build("sdist", checkout, work / "sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    return sdist, _build("wheel", unpacked, work / "wheel")


def _package_files() -> dict[str, Path]:
    """Every file the installed package must hold, by its path in the wheel."""
    files = {p.relative_to(ROOT).as_posix(): p for p in (ROOT / "fastlstm").rglob("*.py")}
    files["fastlstm/LICENSE"] = ROOT / "fastlstm" / "LICENSE"
    files.update({f"fastlstm/csrc/{p.name}": p for p in (ROOT / "csrc").iterdir() if p.is_file()})
    return files


def test_the_wheel_holds_the_package_and_its_cpp_sources_byte_for_byte(released):
    _, wheel = released
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for inside, original in _package_files().items():
            assert inside in names, f"{inside} is missing from {wheel.name}"
            assert archive.read(inside) == original.read_bytes(), inside
        outside = {n for n in names if not n.startswith(("fastlstm/", "fastlstm-"))}
        assert not outside, f"the wheel installs files outside the package: {sorted(outside)}"
        assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}


def test_the_wheel_says_what_it_needs_and_installs_the_command(released):
    _, wheel = released
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "Requires-Python: >=3.10" in metadata
    assert "Requires-Dist: torch>=2.4" in metadata and "Requires-Dist: ninja" in metadata
    assert "License-Expression: BSD-3-Clause" in metadata and "License-File: fastlstm/LICENSE" in metadata
    assert "fastlstm = fastlstm.__main__:main" in entry_points


def test_the_sdist_holds_what_a_wheel_is_built_from(released):
    sdist, _ = released
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {"pyproject.toml", "README.md"} | {p.relative_to(ROOT).as_posix() for p in _package_files().values()}
    assert wanted <= names, sorted(wanted - names)


def test_an_installed_wheel_finds_its_cpp_sources_inside_the_package(released, tmp_path):
    """Installed, there is no <repo>/csrc above the package: the build must read fastlstm/csrc from the wheel."""
    _, wheel = released
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    done = subprocess.run(
        [sys.executable, "-c", "from fastlstm.backends import cpu; print(cpu.source_dir())"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == site / "fastlstm" / "csrc"
