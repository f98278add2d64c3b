"""The demo's tasks: arithmetic problems with checkable integer answers, and their verifiers.

Two task families:

- ``"addition"`` (the default): one-shot single-digit addition as plain text,
  ``"3 + 4 = 7\n5 + 2 ="``, answered on one line. SmolLM2-135M-Instruct solves about half of these
  at temperature 1.3 and, what GRPO needs, most problems get a mix of right and wrong rollouts.
  [`verify_line`][gradalign.demo.problems.verify_line] reads the first number of the completion's first line.
- ``"word"``: short story problems (``+``, ``-``, ``*``) in a chat turn, answered in free text;
  [`verify`][gradalign.demo.problems.verify] reads the last number (the usual "final answer" rule of math RL). The 135M model
  solves only 12-16% of them, so most groups have no reward spread.

[`format_reward`][gradalign.demo.problems.format_reward] only checks that a number is written; the ``--tiny`` demo uses it because a
random model never writes the right answer, which would leave every validation group without
reward spread.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass

from gradalign.errors import GradAlignError

__all__ = [
    "TASKS",
    "Problem",
    "final_number",
    "first_line_number",
    "format_reward",
    "make_problems",
    "verify",
    "verify_line",
]

TASKS = ("addition", "word")

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
        question: The question text shown to the model (the whole few-shot text for "addition").
        answer: The correct integer answer.
        operation: ``"+"``, ``"-"`` or ``"*"``.
        task: The task family, one of `TASKS`.
    """

    id: int
    question: str
    answer: int
    operation: str
    task: str = "word"


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


def _word_problem(rng: random.Random) -> tuple[str, int, str]:
    op = rng.choice("+-*")
    template = rng.choice(_TEMPLATES[op])
    a, b = _operands(op, rng)
    text = template.format(a=a, b=b, name=rng.choice(_NAMES), thing=rng.choice(_THINGS))
    return text, _answer(op, a, b), op


def _addition_problem(rng: random.Random) -> tuple[str, int, str]:
    a, b, c, d = (rng.randint(1, 9) for _ in range(4))
    return f"{a} + {b} = {a + b}\n{c} + {d} =", c + d, "+"


def make_problems(
    n: int,
    seed: int | str,
    *,
    task: str = "word",
    start_id: int = 0,
    exclude: Collection[str] = (),
) -> list[Problem]:
    """Draw ``n`` distinct problems of ``task`` with a private ``random.Random(seed)``.

    Args:
        n: Number of problems.
        seed: Seed (an int or a string); the same arguments give the same problems.
        task: One of `TASKS`.
        start_id: Id of the first problem (ids are consecutive).
        exclude: Question texts to skip, e.g. the pool's when drawing validation problems.

    Returns:
        The problems, each question distinct and none in ``exclude``.

    Raises:
        GradAlignError: If ``task`` is unknown.

    Examples:
        >>> p = make_problems(2, seed=0, task="addition")
        >>> [q.id for q in p], p[0].question.count("\\n")
        ([0, 1], 1)
    """
    draw = {"word": _word_problem, "addition": _addition_problem}.get(task)
    if draw is None:
        raise GradAlignError(f"make_problems: task must be one of {TASKS}, got {task!r}")
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    while len(problems) < n:
        text, answer, op = draw(rng)
        if text not in seen:
            seen.add(text)
            problems.append(Problem(start_id + len(problems), text, answer, op, task))
    return problems


# A minus sign counts only when it cannot be a subtraction ("12-5" ends in 5, "is -3" in -3).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """Return the last number written in ``text``, or ``None`` if there is none.

    Thousands separators are dropped (``"1,200"`` is 1200) and a trailing full stop is not a
    decimal point (``"is 7."`` gives 7).

    Examples:
        >>> final_number("3 + 4 = 7. So the answer is 7.")
        7.0
    """
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def verify(completion: str, answer: int) -> float:
    """Binary reward: 1.0 if the last number of ``completion`` equals ``answer``, else 0.0.

    Examples:
        >>> verify("She has 12 apples.", 12)
        1.0
    """
    value = final_number(completion)
    return 1.0 if value is not None and value == answer else 0.0


def first_line_number(text: str) -> float | None:
    """The first number on the first line of ``text``, or ``None`` if it has none.

    Examples:
        >>> first_line_number(" 12, so\\n3")
        12.0
    """
    matches = _NUMBER.findall(text.split("\n", 1)[0])
    return float(matches[0].replace(",", "")) if matches else None


def verify_line(completion: str, answer: int) -> float:
    """Binary reward of a one-line answer: 1.0 if its first number equals ``answer``, else 0.0.

    Examples:
        >>> verify_line(" 12\\n", 12), verify_line(" 21\\n", 12), verify_line("\\n12", 12)
        (1.0, 0.0, 0.0)
    """
    value = first_line_number(completion)
    return 1.0 if value is not None and value == answer else 0.0


def format_reward(completion: str, answer: int) -> float:
    """Format-only reward: 1.0 if ``completion`` writes any number, else 0.0 (``answer`` unused).

    Examples:
        >>> format_reward("x7q", 12), format_reward("xyz", 12)
        (1.0, 0.0)
    """
    del answer  # same signature as verify, so the two are interchangeable
    return 1.0 if final_number(completion) is not None else 0.0
