"""Arithmetic word problems with checkable integer answers, and their verifier.

Problems are drawn from a few seeded story templates per operation (``+``, ``-``, ``*``) with small
numbers, so a 135M model solves some and fails others: the mixed pass rates GRPO groups need for a
non-zero gradient. The verifier reads the last number in a completion (the usual "final answer"
rule of math RL) and gives 1.0 when it equals the answer, else 0.0. :func:`format_reward` only
checks that a number is written; the ``--tiny`` demo uses it because an untrained model never
writes the right answer, which would leave every validation group without reward spread.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["Problem", "final_number", "format_reward", "make_problems", "verify"]

# Story templates per operation: {a} and {b} are the operands, {name} a person, {thing} a noun.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{name} has {a} {thing}. {name} buys {b} more {thing}. "
        "How many {thing} does {name} have now?",
        "There are {a} {thing} on a table and {b} {thing} on a shelf. "
        "How many {thing} are there in all?",
        "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read?",
    ),
    "-": (
        "{name} had {a} {thing}. {name} gave {b} {thing} to a friend. How many {thing} are left?",
        "A box holds {a} {thing}. {b} {thing} are taken out. How many {thing} remain in the box?",
        "{name} is {a} years old. {name}'s cousin is {b} years younger. How old is the cousin?",
    ),
    "*": (
        "There are {a} bags with {b} {thing} in each bag. How many {thing} are there in total?",
        "{name} buys {a} packs of {thing}. Each pack has {b} {thing}. "
        "How many {thing} does {name} buy?",
        "A garden has {a} rows of plants with {b} plants in each row. How many plants are there?",
    ),
}
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
    # Small operands: SmolLM2-135M then solves roughly one rollout in five, so many groups mix
    # right and wrong answers (larger numbers leave almost every group all-wrong).
    if op == "*":
        return rng.randint(2, 6), rng.randint(2, 6)
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    if op == "-" and b >= a:
        a, b = b + rng.randint(1, 6), a
    return a, b


def _answer(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def make_problems(
    n: int, seed: int, *, start_id: int = 0, exclude: Collection[str] = ()
) -> list[Problem]:
    """Draw ``n`` distinct word problems from the templates with a private ``random.Random(seed)``.

    Args:
        n: Number of problems.
        seed: Seed; the same arguments give the same problems.
        start_id: Id of the first problem (ids are consecutive).
        exclude: Question texts to skip, e.g. the pool's when drawing validation problems.

    Returns:
        The problems (operations equally likely), each question distinct and none in
        ``exclude``.

    Example:
        >>> p = make_problems(2, seed=0)
        >>> [q.id for q in p]
        [0, 1]
    """
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    while len(problems) < n:
        op = rng.choice("+-*")
        template = rng.choice(_TEMPLATES[op])
        a, b = _operands(op, rng)
        text = template.format(a=a, b=b, name=rng.choice(_NAMES), thing=rng.choice(_THINGS))
        if text not in seen:
            seen.add(text)
            problems.append(Problem(start_id + len(problems), text, _answer(op, a, b), op))
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


def format_reward(completion: str, answer: int) -> float:
    """Format-only reward: 1.0 if ``completion`` writes any number, else 0.0 (``answer`` unused).

    Example:
        >>> format_reward("x7q", 12), format_reward("xyz", 12)
        (1.0, 0.0)
    """
    del answer  # same signature as verify, so the two are interchangeable
    return 1.0 if final_number(completion) is not None else 0.0
