"""Built-in suites: deterministic, well-formed, and their gold answers actually right."""

from __future__ import annotations

import re

import pytest

from probes import builtin as builtin_mod
from probes.builtin import BUILTIN, CONFLICT_ANSWERS, builtin
from probes.scoring import REFUSAL_ANSWER, is_refusal, normalize, score_generation
from probes.suite import MAX_PROMPT_CHARS, Item

CATEGORY_VALUES = {c: values for c, (values, _, _) in builtin_mod._FACTS.items()}


def passage_of(prompt: str) -> str:
    """The passage part of a prompt (everything before the question)."""
    return prompt.split("\nQuestion:")[0]


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_and_seeded(name: str) -> None:
    a, b = builtin(name), builtin(name)
    assert a.items == b.items and a.fewshot == b.fewshot
    assert len(a.items) == 100
    other = builtin(name, seed=1)
    assert [i.prompt for i in other.items] != [i.prompt for i in a.items]
    # a smaller n is a prefix of the larger: the stream does not depend on n
    assert builtin(name, n=10).items == a.items[:10]


def test_fixed_output() -> None:
    # The generators use no platform- or version-dependent randomness; these texts must never change,
    # or probe series recorded before and after the change stop being comparable.
    a = builtin("arithmetic").items[0]
    assert a.prompt == "Question: Ben had 2 marbles and found 3 more. How many marbles does Ben have?\nAnswer:"
    assert a.answers == ("5",)
    r = builtin("reading").items[1]
    assert r.choices == ("trumpet", "violin", "drum", "guitar") and r.gold == 0


def test_unknown_name_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="arithmetic, reading, faithfulness, format"):
        builtin("trivia")
    for n in (0, -1, 100_001, 2.5, True):
        with pytest.raises(ValueError):
            builtin("arithmetic", n=n)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BUILTIN)
def test_well_formed(name: str) -> None:
    s = builtin(name, n=300)
    ids = [i.id for i in s.items]
    assert len(set(ids)) == len(ids)
    assert s.name == name and 2 <= len(s.fewshot) <= 3
    shots = {ex.prompt for ex in s.fewshot}
    assert len(shots) == len(s.fewshot)
    assert not shots & {i.prompt for i in s.items}  # a few-shot example is never also an item
    for item in s.items:
        assert item.prompt.endswith(":") and len(s.prompt(item)) <= MAX_PROMPT_CHARS
        assert len(s.prompt(item)) < 1200  # small enough for a tiny model's context
        # each item's gold answer scores as right, so a perfect model gets accuracy 1
        if item.type == "generate":
            assert score_generation(item, item.gold_text())["accuracy"] == 1.0


def test_arithmetic_answers_are_right() -> None:
    s = builtin("arithmetic", n=500)
    kinds = set()
    for item in s.items + [Item("f", "generate", ex.prompt, answers=(ex.answer,)) for ex in s.fewshot]:
        assert len(item.prompt) < 120
        a, b = (int(x) for x in re.findall(r"\b[0-9]\b", item.prompt))
        assert 1 <= a <= 9 and 1 <= b <= 9
        text = item.prompt
        if any(v in text for v in ("gives away", "lost", "takes out", "used")):
            expected, kind = a - b, "subtract"
        else:
            assert any(v in text for v in ("buys", "found", "puts in", "on Tuesday"))
            expected, kind = a + b, "add"
        assert expected >= 0 and item.answers == (str(expected),)
        kinds.add(kind)
    assert kinds == {"add", "subtract"}
    assert s.max_new_tokens >= 2 and s.stop == ("\n",)


def test_reading_gold_in_passage_distractors_not() -> None:
    for item in builtin("reading", n=300).items:
        assert item.type == "choice" and len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.gold is not None and 0 <= item.gold < 4
        passage = words(passage_of(item.prompt))
        assert item.gold_text() in passage
        assert not any(c in passage for i, c in enumerate(item.choices) if i != item.gold)
        # the distractors come from the gold's category
        (category,) = item.tags
        assert set(item.choices) <= set(CATEGORY_VALUES[category])


def test_faithfulness_kinds() -> None:
    s = builtin("faithfulness", n=300)
    tags = [i.tags for i in s.items]
    assert tags[:3] == [("counterfactual",), ("unanswerable",), ("conflicting",)]
    world = {q: real for _, q, real, _ in builtin_mod._WORLD}
    for item in s.items:
        passage = passage_of(item.prompt)
        if item.tags == ("counterfactual",):
            gold = item.gold_text()
            assert gold in words(passage)
            question = item.prompt.split("Question: ")[1].split("\n")[0]
            assert gold != world[question]  # the passage contradicts the world
            assert not item.unanswerable
        elif item.tags == ("unanswerable",):
            assert item.unanswerable and item.answers == () and item.gold_text() == REFUSAL_ANSWER
            asked = next(c for c, (_, _, q) in builtin_mod._FACTS.items() if q.split("{p}")[0] in item.prompt.split("Question: ")[1])
            assert not words(passage) & set(CATEGORY_VALUES[asked])  # no value of the asked kind is there
            assert score_generation(item, "The passage does not say.")["accuracy"] == 1.0
        else:
            assert item.tags == ("conflicting",) and item.answers == CONFLICT_ANSWERS
            p1, p2 = item.prompt.split("\nQuestion:")[0].split("\n")
            assert p1.startswith("Passage 1: ") and p2.startswith("Passage 2: ") and p1[11:] != p2[11:]
            assert not is_refusal(item.gold_text())
            assert score_generation(item, "The passages disagree.")["accuracy"] == 1.0
    # the few-shot examples show each kind, the refusal word included
    assert [ex.answer for ex in s.fewshot][1:] == [REFUSAL_ANSWER, "conflicting"]


def test_format_answers_fullmatch_their_patterns() -> None:
    s = builtin("format", n=400)
    tags = set()
    for item in s.items:
        assert item.pattern is not None
        assert re.fullmatch(item.pattern, item.gold_text())
        tags.update(item.tags)
        if item.tags == ("number",):
            a, b = (int(x) for x in re.findall(r"\b[0-9]\b", item.prompt))
            op = "plus" if "plus" in item.prompt else "minus"
            assert item.answers == (str(a + b if op == "plus" else a - b),)
        elif item.tags == ("yes_no",):
            passage = passage_of(item.prompt)[len("Passage: ") :].rstrip(".")
            question = item.prompt.split("Is it true that ")[1].split("?")[0]
            assert item.answers == ("yes" if normalize(passage) == normalize(question) else "no",)
        else:
            value = item.gold_text().removeprefix("Answer: ")
            assert normalize(value) in normalize(passage_of(item.prompt))
    assert tags == {"uppercase", "number", "answer_form", "yes_no"}
    # content in the wrong form is wrong
    upper = next(i for i in s.items if i.tags == ("uppercase",))
    assert score_generation(upper, upper.gold_text().lower())["accuracy"] == 0.0
