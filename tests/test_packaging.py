"""What a built wheel carries: the dashboard, the type marker, the license, the version."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import actorflow as af

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_the_distribution_version() -> None:
    assert af.__version__ == importlib.metadata.version("actorflow")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy of the sources, so the build leaves nothing in the checkout,
    # and without build isolation: setuptools and wheel come from the test extra.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "actorflow", src / "actorflow", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("actorflow-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_carries_the_dashboard_the_type_marker_and_the_license(
    wheel: zipfile.ZipFile,
) -> None:
    names = set(wheel.namelist())
    for asset in ("index.html", "app.js", "style.css"):
        assert f"actorflow/dashboard/{asset}" in names
    assert "actorflow/py.typed" in names
    licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(licenses) == 1
    assert "Apache License" in wheel.read(licenses[0]).decode()


def test_the_wheel_metadata_names_the_license_version_and_classifiers(
    wheel: zipfile.ZipFile,
) -> None:
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    msg = Parser().parsestr(wheel.read(meta).decode())
    assert msg["Version"] == af.__version__
    assert msg["License-Expression"] == "Apache-2.0"
    classifiers = msg.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in classifiers)
    assert msg["Requires-Python"] == ">=3.11"


def test_the_wheel_holds_no_tests_or_stray_files(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/", 1)[0] for n in wheel.namelist()}
    assert tops == {"actorflow", f"actorflow-{af.__version__}.dist-info"}
