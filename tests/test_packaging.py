"""The sdist is the whole project (its tests run); the wheel alone runs the README's pip quick start."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sdist_holds_a_runnable_test_suite(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("gradalign-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    for name in (
        "tests/__init__.py",
        "tests/conftest.py",
        "tests/helpers.py",
        "constraints.txt",
        "Makefile",
        "CHANGELOG.md",
        "docs/index.md",
        "examples/online_loop.py",
        "benchmarks/study.py",
        ".ci/run",
        "src/gradalign/py.typed",
    ):
        assert (root / name).exists(), name
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " tests collected" in proc.stdout or "tests collected" in proc.stdout


def test_wheel_alone_runs_the_pip_quick_start(dist: Path, tmp_path: Path) -> None:
    """A fresh venv: pinned torch, the wheel (its own dependencies), then the tiny demo."""
    (wheel,) = dist.glob("gradalign-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*args: str, cwd: Path = tmp_path) -> str:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    run(str(python), "-m", "pip", "install", "-q", "torch==2.13.0")
    run(str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel))
    out = run(str(python), "-m", "gradalign.demo", "--tiny", "--seeds", "0")
    assert "Summary over seeds 0" in out and "GradAlign" in out
    where = run(str(python), "-c", "import gradalign; print(gradalign.__file__)")
    assert str(env_dir) in where  # the wheel's copy, not the repository's
