"""Every link in README.md works where the README is read most: on PyPI, as the long description.

A relative link (``docs/tutorials/trl.md``) 404s there, so every link and image must be absolute.
The base URLs are written once, in pyproject.toml's ``[project.urls]``: ``Documentation`` (the
mkdocs site; mkdocs.yml's ``site_url`` must be the same) and ``Repository`` (GitHub; mkdocs.yml's
``repo_url``). A README link must start with one of them (or be the raw-file form of the
repository, or a URL on the external allow-list below), and must point at something that exists:

- a site link at a page or file of the site built from this checkout (``docs/x/y.md`` is served
  at ``<site>/x/y/``), and at a heading of that page when it has an ``#anchor``;
- a repository link (``<repo>/blob/main/<path>``, ``<repo>/tree/main/<dir>``,
  ``https://raw.githubusercontent.com/<owner>/<name>/main/<path>``) at a file or folder of this
  checkout, or it is one of ``[project.urls]``'s own values (``<repo>/issues``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BRANCH = "main"
# Pages outside the project that the README may cite: the paper and package indexes.
EXTERNAL = ("https://arxiv.org/abs/", "https://pypi.org/project/")

_INLINE = re.compile(r"(!?)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HTML = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
_AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")


def _project_urls() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        urls: dict[str, str] = tomllib.load(f)["project"]["urls"]
    return urls


def _bases() -> tuple[str, str]:
    """``(site, repo)``, the site with a trailing slash and the repository without."""
    urls = _project_urls()
    return urls["Documentation"].rstrip("/") + "/", urls["Repository"].rstrip("/")


def _raw_base(repo: str) -> str:
    owner_name = repo.removeprefix("https://github.com/")
    return f"https://raw.githubusercontent.com/{owner_name}/{BRANCH}/"


def _mkdocs_setting(key: str) -> str | None:
    match = re.search(rf"^{key}:\s*(\S+)\s*(?:#.*)?$", (ROOT / "mkdocs.yml").read_text(), re.M)
    return match.group(1).strip("\"'") if match else None


def readme_links(text: str) -> list[str]:
    """Targets of the links and images in markdown ``text``, code blocks and spans left out."""
    text = re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", "", text, flags=re.M | re.S)
    text = re.sub(r"(`+)[^`].*?\1", "", text, flags=re.S)
    links = [m.group(2) for m in _INLINE.finditer(text)]
    links += _REFERENCE.findall(text) + _HTML.findall(text) + _AUTOLINK.findall(text)
    return links


@pytest.fixture(scope="module")
def links() -> list[str]:
    found = readme_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert found, "README.md has no links: the link finder is broken"
    return found


def test_link_finder() -> None:
    text = (
        '[a](https://x.org/a) ![b](img/b.png "t") [c [d]](<c.md>)\n'
        "`[not](code.md)` <https://y.org/> <img src='z.png'>\n"
        "```python\nx[0](1)\n```\n[ref]: https://r.org/\n"
    )
    assert readme_links(text) == [
        "https://x.org/a",
        "img/b.png",
        "c.md",
        "https://r.org/",
        "z.png",
        "https://y.org/",
    ]


def test_project_urls_are_written_once() -> None:
    urls = _project_urls()
    site, repo = _bases()
    assert {"Homepage", "Documentation", "Repository", "Changelog", "Issues"} <= set(urls)
    assert repo.startswith("https://github.com/")
    assert urls["Homepage"] in (site, repo)
    assert urls["Changelog"] == f"{repo}/blob/{BRANCH}/CHANGELOG.md"
    assert urls["Issues"] == f"{repo}/issues"
    assert _mkdocs_setting("site_url") == site, (
        "mkdocs.yml site_url != [project.urls] Documentation"
    )
    assert (_mkdocs_setting("repo_url") or "").rstrip("/") == repo, "mkdocs.yml repo_url"


def test_every_link_is_absolute_and_ours(links: list[str]) -> None:
    site, repo = _bases()
    ours = (site, f"{repo}/", _raw_base(repo), *EXTERNAL)
    own_urls = set(_project_urls().values()) | {repo}
    relative = [u for u in links if not re.match(r"https?://", u)]
    assert not relative, f"README.md links that 404 on PyPI (not absolute): {relative}"
    foreign = [u for u in links if u not in own_urls and not u.startswith(ours)]
    assert not foreign, f"README.md links outside {ours} and [project.urls]: {foreign}"


def _site_target(rel: str) -> str:
    """The built file that serves ``<site>/<rel>``: a folder URL serves its index.html."""
    return f"{rel}index.html" if rel == "" or rel.endswith("/") else rel


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocs_jupyter")
    from tests.test_docs import _build

    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def test_site_links_name_built_pages(links: list[str], site: Path) -> None:
    base, _ = _bases()
    checked, missing = 0, []
    for url in (u for u in links if u.startswith(base)):
        rel, _, anchor = url.removeprefix(base).partition("#")
        page = site / _site_target(rel)
        checked += 1
        if not page.is_file():
            missing.append(f"{url}: no {page.relative_to(site)} in the built site")
        elif anchor and f'id="{anchor}"' not in page.read_text(encoding="utf-8"):
            missing.append(f"{url}: the page has no heading #{anchor}")
    assert not missing, missing
    assert checked, "README.md links no page of the documentation site"


def test_repository_links_name_files_of_this_checkout(links: list[str]) -> None:
    _, repo = _bases()
    kinds = {
        f"{repo}/blob/{BRANCH}/": Path.is_file,
        f"{repo}/tree/{BRANCH}/": Path.is_dir,
        _raw_base(repo): Path.is_file,
    }
    own_urls = set(_project_urls().values()) | {repo}
    checked, missing = 0, []
    for url in links:
        if url in own_urls or not url.startswith((f"{repo}/", _raw_base(repo))):
            continue
        prefix = next((p for p in kinds if url.startswith(p)), None)
        if prefix is None:
            missing.append(f"{url}: not a {BRANCH}-branch file, folder or raw link")
            continue
        path = url.removeprefix(prefix).partition("#")[0].rstrip("/")
        checked += 1
        if not path or not kinds[prefix](ROOT / path):
            missing.append(f"{url}: no {path or '(empty path)'} in the repository")
    assert not missing, missing
    assert checked, "README.md links no file of the repository"
