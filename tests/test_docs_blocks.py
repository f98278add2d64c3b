"""Every Python block of a tutorial page, as the site shows it, can be pasted and run on its own.

The pages include their code from scripts (``--8<--`` snippet sections), so a block that starts
after its imports, or inside a function, gives a NameError or an IndentationError when a reader
pastes it. The blocks are resolved here with the site's own snippet settings (``mkdocs.yml``) and
checked statically: each compiles, and every global name it reads is a builtin or is bound in the
block itself (imported, assigned, defined). A block may use state from earlier blocks of its page
only when the paragraph just above it says so, ending with "Continues from the block(s) above:
`name`, ...", and then only names that an earlier block assigns: imports are never carried over.
"""

from __future__ import annotations

import builtins
import re
import symtable
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
markdown = pytest.importorskip("markdown")
pytest.importorskip("pymdownx.snippets", reason="the [docs] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
CONTINUES = re.compile(r"\bContinues from the blocks? above\b")
PYTHON = {"python", "py", "python3"}
BUILTINS = set(dir(builtins)) | {"__name__"}


class _Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
    """mkdocs.yml may hold ``!!python/name:`` tags (emoji, superfences); they do not matter here."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _snippets() -> Any:
    """The snippet preprocessor configured as in mkdocs.yml, paths resolved from the repository."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    settings: dict[str, Any] = {}
    for ext in config["markdown_extensions"]:
        if isinstance(ext, dict) and "pymdownx.snippets" in ext:
            settings = dict(ext["pymdownx.snippets"] or {})
    base = settings.get("base_path", ["."])
    settings["base_path"] = [str(ROOT / p) for p in ([base] if isinstance(base, str) else base)]
    md = markdown.Markdown(
        extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": settings}
    )
    return md.preprocessors["snippet"]


def python_blocks(page: Path) -> list[tuple[int, str, set[str]]]:
    """(line, source, names the paragraph above allows) of every Python block, includes resolved."""
    lines = _snippets().run(page.read_text(encoding="utf-8").split("\n"))
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = m["indent"], m["fence"], i
        body, i = [], i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if m["lang"].lower() in PYTHON:
            blocks.append((start + 1, "\n".join(body) + "\n", _allowed(lines, start)))
    return blocks


def _allowed(lines: list[str], fence: int) -> set[str]:
    """Names the paragraph right above the fence declares set up earlier (empty if it does not)."""
    end = fence
    while end > 0 and not lines[end - 1].strip():
        end -= 1
    start = end
    while start > 0 and lines[start - 1].strip():
        start -= 1
    paragraph = " ".join(line.strip() for line in lines[start:end])
    m = CONTINUES.search(paragraph)
    if not m:
        return set()
    return set(re.findall(r"`([A-Za-z_]\w*)`", paragraph[m.end() :]))


def _symbols(source: str, name: str) -> tuple[set[str], set[str], set[str]]:
    """(global names read, names assigned or defined, names imported) at the block's top level."""
    top = symtable.symtable(source, name, "exec")
    assigned = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_namespace()}
    imported = {s.get_name() for s in top.get_symbols() if s.is_imported()}
    reads = {s.get_name() for s in top.get_symbols() if s.is_referenced()}
    stack = list(top.get_children())
    while stack:  # functions, classes, comprehensions: what they read from the module
        table = stack.pop()
        stack += table.get_children()
        for s in table.get_symbols():
            if s.is_referenced() and s.is_global():
                reads.add(s.get_name())
            if s.is_declared_global() and s.is_assigned():
                assigned.add(s.get_name())
    return reads, assigned, imported


def block_problems(page: Path) -> list[str]:
    """Why each block of ``page`` cannot be pasted alone (empty when every block can)."""
    problems: list[str] = []
    earlier: set[str] = set()  # assigned by the page's earlier blocks
    for line, source, allowed in python_blocks(page):
        where = f"{page.name}, block at line {line} (after includes)"
        try:
            compile(source, where, "exec")
        except SyntaxError as e:
            problems.append(f"{where}: does not compile alone: {e.msg} (line {e.lineno})")
            continue
        reads, assigned, imported = _symbols(source, where)
        missing = sorted(reads - assigned - imported - BUILTINS - allowed)
        if missing:
            problems.append(
                f"{where}: uses {missing} without importing or defining them; import them at "
                "the top of the block, or say 'Continues from the block above: `name`' above it"
            )
        untrue = sorted(allowed - earlier)
        if untrue:
            problems.append(
                f"{where}: the paragraph above says {untrue} come from earlier blocks, but no "
                "earlier block on the page assigns them (imports are repeated in every block)"
            )
        earlier |= assigned
    return problems


def test_the_pages_have_python_blocks() -> None:
    assert len(PAGES) >= 5
    assert sum(len(python_blocks(page)) for page in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_block_can_be_pasted_alone(page: Path) -> None:
    problems = block_problems(page)
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_a_reader_would_hit(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport torch\n\nx = torch.zeros(2)\n\n\ndef f():\n    return helper(x)\n```\n\n"
        "Continues from the block above: `x`.\n\n```python\nimport torch\n\ny = x + torch.ones(2)\n```\n\n"
        "Continues from the block above: `torch`.\n\n```python\nz = torch.ones(1)\n```\n\n"
        "```python\n    indented = 1\n```\n\n```python\nprint([w for w in y])\n```\n"
    )
    problems = block_problems(page)
    assert len(problems) == 4, problems
    assert "['helper']" in problems[0]  # read inside a function, defined nowhere
    assert "['torch']" in problems[1]  # an import is never carried over from an earlier block
    assert "does not compile alone" in problems[2]
    assert "['y']" in problems[3]  # read inside a comprehension, not declared above the block
