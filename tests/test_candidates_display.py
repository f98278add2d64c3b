"""``Candidates.table()``: the same printed text as ever, and a table (not an escaped string) in Jupyter."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from gradalign import Candidates
from gradalign.candidates import CandidateTable


def _table(g: int = 30) -> Candidates:
    gen = torch.Generator().manual_seed(0)
    return Candidates(
        ids=torch.arange(g) * 3,
        scores=torch.randn(g, generator=gen),
        accuracy=torch.rand(g, generator=gen),
        reward_std=torch.rand(g, generator=gen) / 2,
        zero_gradient=torch.arange(g) % 4 == 0,
        task_scores=torch.randn(g, 2, generator=gen),
    )


def _text(c: Candidates, max_rows: int) -> str:
    """The text table, written out independently of the implementation."""
    cols = ["ids", "scores", "accuracy", "reward_std", "zero_gradient"]
    out = [
        f"Candidates(G={len(c)}, task_scores ({len(c)}, 2))",
        "  ".join(f"{n:>13}" for n in cols),
    ]
    for i in range(min(len(c), max_rows)):
        row = [int(c.ids[i]), float(c.scores[i]), float(c.accuracy[i]), float(c.reward_std[i])]
        cells = [f"{row[0]:>13}", *(f"{v:>13.4g}" for v in row[1:])]
        out.append("  ".join([*cells, f"{bool(c.zero_gradient[i])!s:>13}"]))
    if len(c) > max_rows:
        out.append(f"... ({len(c) - max_rows} more rows)")
    return "\n".join(out)


@pytest.mark.parametrize("max_rows", [0, 5, 30, 40])
def test_printed_text_is_unchanged(max_rows: int, capsys: pytest.CaptureFixture[str]) -> None:
    c = _table()
    t = c.table(max_rows=max_rows)
    assert isinstance(t, str) and isinstance(t, CandidateTable)
    print(t)
    assert capsys.readouterr().out == _text(c, max_rows) + "\n"
    assert str(t) == _text(c, max_rows) and repr(c) == _text(c, 10)
    assert t.more == max(0, 30 - max_rows) and len(t.rows) == min(30, max_rows)


def test_html_is_a_table_with_every_shown_cell_escaped() -> None:
    t = _table().table(max_rows=4)
    html = t._repr_html_()
    assert html.startswith("<table><caption>Candidates(G=30, task_scores (30, 2))</caption>")
    assert html.count("<th>") == 5 and html.count("<tr>") == 1 + 4 + 1
    assert "... (26 more rows)</td></tr>" in html
    assert all(f"<td>{cell}</td>" in html for row in t.rows for cell in row)
    odd = CandidateTable.of("<G=1>", ["a&b"], [["<1>"]])
    assert "<caption>&lt;G=1&gt;</caption>" in odd._repr_html_()
    assert "<th>a&amp;b</th>" in odd._repr_html_() and "<td>&lt;1&gt;</td>" in odd._repr_html_()
    assert _table()._repr_html_() == _table().table(max_rows=10)._repr_html_()


def test_ipython_shows_the_table_not_a_quoted_string() -> None:
    shell = pytest.importorskip("IPython.core.interactiveshell").InteractiveShell.instance()
    t = _table().table(max_rows=3)
    data, _ = shell.display_formatter.format(t)
    assert data["text/plain"] == str(t)  # no quotes, no \n escapes
    assert data["text/html"] == t._repr_html_()


def test_survives_copy_and_pickle() -> None:
    t = _table().table(max_rows=2)
    for other in (copy.copy(t), copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert other == t and other.rows == t.rows and other._repr_html_() == t._repr_html_()
