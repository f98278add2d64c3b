"""Arithmetic word problems with checkable integer answers, and their verifier.

Problems are drawn from a few seeded story templates per operation (``+``, ``-``, ``*``) with small
numbers, so a 135M model solves some and fails others: the mixed pass rates GRPO groups need for a
non-zero gradient. The verifier reads the last number in a completion (the usual "final answer"
rule of math RL) and gives 1.0 when it equals the answer, else 0.0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["Problem", "final_number", "make_problems", "verify"]

# (template, operation): {a} and {b} are the operands, {name} a person and {thing} a plural noun.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "{name} has {a} {thing}. {name} buys {b} more {thing}. How many {thing} does {name} have now?",
        "+",
    ),
    (
        "There are {a} {thing} on a table and {b} {thing} on a shelf. How many {thing} are there in all?",
        "+",
    ),
    (
        "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read?",
        "+",
    ),
    (
        "{name} had {a} {thing}. {name} gave {b} {thing} to a friend. How many {thing} are left?",
        "-",
    ),
    (
        "A box holds {a} {thing}. {b} {thing} are taken out. How many {thing} remain in the box?",
        "-",
    ),
    ("{name} is {a} years old. {name}'s cousin is {b} years younger. How old is the cousin?", "-"),
    ("There are {a} bags with {b} {thing} in each bag. How many {thing} are there in total?", "*"),
    (
        "{name} buys {a} packs of {thing}. Each pack has {b} {thing}. How many {thing} does {name} buy?",
        "*",
    ),
    (
        "A garden has {a} rows of plants with {b} plants in each row. How many plants are there?",
        "*",
    ),
)
_NAMES = ("Sam", "Lily", "Omar", "Mia", "Ravi", "Ana", "Ben", "Zoe")
_THINGS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards")


@dataclass(frozen=True)
class Problem:
    """One word problem.

    Attributes:
        id: Index of the problem in its pool; used as the GRPO group id.
        question: The question text shown to the model.
        answer: The correct integer answer.
        operation: ``"+"``, ``"-"`` or ``"*"``.
    """

    id: int
    question: str
    answer: int
    operation: str


def _operands(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 9), rng.randint(2, 9)
    a, b = rng.randint(2, 40), rng.randint(1, 30)
    if op == "-" and b > a:
        a, b = b, a
    if op == "-" and a == b:
        a += rng.randint(1, 9)
    return a, b


def _answer(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def make_problems(n: int, seed: int, *, start_id: int = 0) -> list[Problem]:
    """Draw ``n`` word problems from the templates with a private ``random.Random(seed)``.

    Args:
        n: Number of problems.
        seed: Seed; the same ``(n, seed)`` gives the same problems.
        start_id: Id of the first problem (ids are consecutive).

    Returns:
        The problems, operations cycling through the templates in a seeded order.

    Example:
        >>> p = make_problems(2, seed=0)
        >>> [q.id for q in p]
        [0, 1]
    """
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        template, op = rng.choice(_TEMPLATES)
        a, b = _operands(op, rng)
        text = template.format(a=a, b=b, name=rng.choice(_NAMES), thing=rng.choice(_THINGS))
        problems.append(Problem(start_id + i, text, _answer(op, a, b), op))
    return problems


# A minus sign counts only when it cannot be a subtraction ("12-5" ends in 5, "is -3" in -3).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """Return the last number written in ``text``, or ``None`` if there is none.

    Thousands separators are dropped (``"1,200"`` is 1200) and a trailing full stop is not a
    decimal point (``"is 7."`` gives 7).

    Example:
        >>> final_number("3 + 4 = 7. So the answer is 7.")
        7.0
    """
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def verify(completion: str, answer: int) -> float:
    """Binary reward: 1.0 if the last number of ``completion`` equals ``answer``, else 0.0.

    Example:
        >>> verify("She has 12 apples.", 12)
        1.0
    """
    value = final_number(completion)
    return 1.0 if value is not None and value == answer else 0.0
