"""CITATION.cff and the docs' citation page cite the paper and this version of the library."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import gradalign

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
PAPER = "2602.21492"


def _urls() -> dict[str, str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("urls", {})


def test_citation_cff_names_this_version_and_the_paper() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["message"] and cff["title"].startswith("gradalign") and cff["authors"]
    assert cff["version"] == gradalign.__version__
    urls = _urls()
    if "Repository" in urls:
        assert cff["repository-code"] == urls["Repository"]
    (paper,) = cff["references"]
    assert paper["title"].startswith("GradAlign: Gradient-Aligned Data Selection")
    assert [a["family-names"] for a in paper["authors"]] == ["Yang", "Du", "Sun", "Welleck", "Yang"]
    assert paper["identifiers"][0]["value"] == f"arXiv:{PAPER}"


def test_citation_page_has_both_bibtex_entries() -> None:
    page = (ROOT / "docs" / "citation.md").read_text()
    entries = re.findall(r"```bibtex\n(@\w+\{.*?\n\})\n```", page, flags=re.S)
    assert len(entries) == 2
    paper, library = entries
    assert f"eprint        = {{{PAPER}}}" in paper and "Welleck, Sean" in paper
    assert f"version = {{{gradalign.__version__}}}" in library
    for entry in entries:  # balanced braces: BibTeX would otherwise swallow the rest of a file
        assert entry.count("{") == entry.count("}")


def test_changelog_and_citation_pages_are_in_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in ("changelog.md", "citation.md", "scaling-up.md"):
        assert f": {page}" in nav
    assert (ROOT / "docs" / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'
