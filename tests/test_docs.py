"""The documentation site builds with ``mkdocs build --strict`` and renders what it should.

Strict mode turns an unresolved cross-reference, a missing page or a broken snippet include into an
error; the checks below catch what strict mode lets through: reST roles and doctest directives shown
as literal text, examples rendered as quotes instead of code, public names without a page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradalign

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocs_jupyter")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _pages(site: Path) -> dict[str, str]:
    return {
        str(p.relative_to(site)): p.read_text(encoding="utf-8")
        for p in site.rglob("index.html")
        if "search" not in p.parts
    }


def test_no_literal_rest_roles_or_doctest_directives(site: Path) -> None:
    literal = re.compile(r":(class|func|meth|attr|mod|data|exc):`|doctest:|# doctest")
    bad = {name: literal.findall(html) for name, html in _pages(site).items()}
    assert not {k: v for k, v in bad.items() if v}


def test_examples_render_as_code_not_quotes(site: Path) -> None:
    for name, html in _pages(site).items():
        for quote in re.findall(r"<blockquote>(.*?)</blockquote>", html, flags=re.S):
            assert "&gt;&gt;&gt;" not in quote, f"{name}: a doctest example rendered as a quote"
    api = "".join(html for name, html in _pages(site).items() if name.startswith("api"))
    assert api.count("&gt;&gt;&gt;") >= 40  # the examples are there, as code


def test_every_public_name_has_an_api_entry(site: Path) -> None:
    api = "".join(html for name, html in _pages(site).items() if name.startswith("api"))
    anchors = set(re.findall(r'id="(gradalign\.[\w.]+)"', api))
    names = [n for n in gradalign.__all__ if not n.startswith("__")]
    missing = [n for n in names if not any(a.rsplit(".", 1)[-1] == n for a in anchors)]
    assert not missing


def test_tutorials_and_notebooks_are_rendered(site: Path) -> None:
    pages = _pages(site)
    for page in (
        "score-rollouts", "select-dataset", "grpo-loop", "trl", "choose-extractor", "reasoning-gym"
    ):  # fmt: skip
        html = pages[f"tutorials/{page}/index.html"]
        assert "--8&lt;--" not in html and "--8<--" not in html, page  # includes resolved
        assert "gradalign" in html
    for nb in ("walkthrough", "online-curriculum"):
        html = pages[f"notebooks/{nb}/index.html"]
        assert "data:image/png;base64" in html, f"{nb}: the stored plot is not rendered"


def test_an_unresolved_reference_fails_the_build(tmp_path: Path) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    for name in ("src", "examples", "CHANGELOG.md"):  # what the pages include from outside docs/
        (tmp_path / name).symlink_to(ROOT / name)
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, symlinks=True)
    page = docs / "concepts.md"
    page.write_text(page.read_text() + "\nSee [`Nothing`][gradalign.NoSuchName].\n")
    proc = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "gradalign.NoSuchName" in proc.stderr
