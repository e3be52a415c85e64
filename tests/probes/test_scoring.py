"""Scoring: SQuAD-style normalisation and matching, refusals, choice scoring and aggregation."""

from __future__ import annotations

import math

import pytest

from probes.scoring import (
    REFUSAL_ANSWER,
    aggregate,
    clean_output,
    easy_match,
    exact_match,
    is_refusal,
    normalize,
    score_choices,
    score_generation,
    token_f1,
)
from probes.suite import Item


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat\tand\nAN owl ", "cat and owl"),
        ("Paris!", "paris"),
        ("Don't", "dont"),  # SQuAD deletes punctuation, it does not split on it
        ("3.5 km", "35 km"),
        ("“Lyon”—France", "lyonfrance"),  # typographic quotes and dashes are punctuation too
        ("theatre", "theatre"),  # articles only as whole words
        ("Anna and the king", "anna and king"),
        ("THE", ""),
        ("Ünïcode Café", "ünïcode café"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact_match() -> None:
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("Denver Broncos.", ["Carolina Panthers", "denver broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_easy_match_is_on_token_boundaries() -> None:
    assert easy_match("The answer is Santa Clara, California.", ["Santa Clara"]) == 1.0
    assert easy_match("I think it was Lyon", ["lyon"]) == 1.0
    # "cat" is a substring of "concatenate" but not a token of it
    assert easy_match("concatenate", ["cat"]) == 0.0
    # the answer's tokens must be contiguous and in order
    assert easy_match("Clara Santa", ["Santa Clara"]) == 0.0
    assert easy_match("Santa is in Clara", ["Santa Clara"]) == 0.0
    # an answer that normalizes to nothing does not match every prediction
    assert easy_match("Paris", ["The"]) == 0.0
    assert easy_match("a", ["The"]) == 1.0


def test_token_f1_known_pairs() -> None:
    # pred {denver, broncos, won}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    # SQuAD dev example: pred "Santa Clara, California" vs gold "Levi's Stadium in the San Francisco Bay Area at
    # Santa Clara, California": gold tokens (normalized) levis stadium in san francisco bay area at santa clara
    # california = 11, overlap 3: P = 1, R = 3/11, F1 = 2 * (3/11) / (1 + 3/11) = 6/14
    gold = "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California"
    assert token_f1("Santa Clara, California", [gold]) == pytest.approx(6 / 14)
    # the best answer counts
    assert token_f1("Santa Clara, California", [gold, "Santa Clara"]) == pytest.approx(0.8)
    # repeated tokens count only as often as they occur in the gold answer: pred "the the cat cat" ->
    # [cat, cat], gold [cat]: overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert token_f1("dog", ["cat"]) == 0.0
    # empty sides follow SQuAD v2: equal only to each other
    assert token_f1("", ["the"]) == 1.0
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", []) == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "unanswerable",
        "Unanswerable.",
        "This cannot be answered from the passage.",
        "There is not enough information.",
        "The answer is not in the passage.",
        "Unknown",
        "I don't know",
        "I do not know.",
        "No answer",
        "The passage does not say.",
        "It is not mentioned.",
        "N/A",
        "Cannot be determined",
    ],
)
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Paris",
        "7",
        "known",
        "no",
        "The answer is in the passage: Lyon",
        "conflicting",
        "the passages disagree",
        "I know: Lyon",
        "answerable",
        "",
    ],
)
def test_non_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_clean_output_cuts_at_first_stop() -> None:
    assert clean_output(" Lyon\nQuestion: next", ["\n"]) == "Lyon"
    assert clean_output("7.\n\nQuestion", ["\n\n", "."]) == "7"
    assert clean_output("  no stop here  ", ["\n"]) == "no stop here"
    assert clean_output("abc", ["", "\n"]) == "abc"  # an empty stop sequence cuts nothing


def _gen(**kw: object) -> Item:
    kw.setdefault("answers", ("Lyon",))
    return Item("g", "generate", "Question: q\nAnswer:", **kw)  # type: ignore[arg-type]


def test_score_generation_plain() -> None:
    s = score_generation(_gen(answers=("Santa Clara",)), "It was in Santa Clara")
    assert s["accuracy"] == 0.0 and s["exact_match"] == 0.0
    assert s["easy_match"] == 1.0
    assert s["f1"] == pytest.approx(2 * (2 / 5) / (1 + 2 / 5))  # pred "it was in santa clara": P 2/5, R 1
    assert s["refusal"] == 0.0
    assert "format_ok" not in s and "gold_logprob" not in s
    s = score_generation(_gen(), " lyon. ", gold_logprob=-1.5)
    assert s["accuracy"] == 1.0 and s["gold_logprob"] == -1.5


def test_score_generation_unanswerable() -> None:
    item = _gen(answers=(), unanswerable=True)
    assert item.gold_text() == REFUSAL_ANSWER
    refused = score_generation(item, "Not enough information.")
    assert refused == {"accuracy": 1.0, "exact_match": 1.0, "easy_match": 1.0, "f1": 1.0, "refusal": 1.0}
    answered = score_generation(item, "Lyon")
    assert answered == {"accuracy": 0.0, "exact_match": 0.0, "easy_match": 0.0, "f1": 0.0, "refusal": 0.0}
    # refusing an answerable item is wrong and counted as a refusal
    s = score_generation(_gen(), "unknown")
    assert s["accuracy"] == 0.0 and s["refusal"] == 1.0


def test_score_generation_pattern_needs_format_and_content() -> None:
    item = _gen(answers=("LYON",), pattern=r"[A-Z]+")
    assert score_generation(item, "LYON")["accuracy"] == 1.0
    wrong_form = score_generation(item, "Lyon")
    assert wrong_form["exact_match"] == 1.0 and wrong_form["format_ok"] == 0.0 and wrong_form["accuracy"] == 0.0
    wrong_content = score_generation(item, "PARIS")
    assert wrong_content["format_ok"] == 1.0 and wrong_content["accuracy"] == 0.0


def test_score_generation_rejects_choice_items() -> None:
    item = Item("c", "choice", "p", choices=("a", "b"), gold=0)
    with pytest.raises(ValueError, match="score_choices"):
        score_generation(item, "a")


def test_acc_and_acc_norm_disagree() -> None:
    # " elephant" is 9 bytes, " cat" 4: the long gold choice has the lower total log-probability but the
    # higher per-byte one (-4/9 = -0.44 against -2/4 = -0.5)
    item = Item("c", "choice", "p", choices=("cat", "elephant"), gold=1)
    s = score_choices(item, [-2.0, -4.0])
    assert s == {"accuracy": 0.0, "acc_norm": 1.0, "gold_logprob": -4.0}
    # explicit lengths (say, in tokens) replace the byte lengths: -2/1 < -4/4, then -2/1 > -4/1
    assert score_choices(item, [-2.0, -4.0], lengths=[1, 4])["acc_norm"] == 1.0
    assert score_choices(item, [-2.0, -4.0], lengths=[1, 1])["acc_norm"] == 0.0


def test_score_choices_ties_and_nan() -> None:
    item = Item("c", "choice", "p", choices=("aa", "bb", "cc"), gold=1)
    # ties go to the first maximum, as numpy.argmax
    assert score_choices(item, [-1.0, -1.0, -3.0])["accuracy"] == 0.0
    item0 = Item("c", "choice", "p", choices=("aa", "bb", "cc"), gold=0)
    assert score_choices(item0, [-1.0, -1.0, -1.0])["accuracy"] == 1.0
    # a choice that could not be scored never wins
    assert score_choices(item, [math.nan, -2.0, -3.0])["accuracy"] == 1.0


def test_score_choices_checks_shapes() -> None:
    item = Item("c", "choice", "p", choices=("a", "b"), gold=0)
    with pytest.raises(ValueError):
        score_choices(item, [-1.0])
    with pytest.raises(ValueError):
        score_choices(item, [-1.0, -2.0], lengths=[1, 0])
    with pytest.raises(ValueError):
        score_choices(_gen(), [-1.0])


def test_aggregate() -> None:
    per_item = [
        {"accuracy": 1.0, "refusal": 0.0, "gold_logprob": -1.0},
        {"accuracy": 0.0, "refusal": 1.0, "gold_logprob": math.nan, "format_ok": 1.0},
        {"accuracy": 1.0, "refusal": 1.0, "gold_logprob": -3.0},
        {},  # an item not scored
    ]
    agg = aggregate(per_item)
    assert agg["accuracy"] == pytest.approx(2 / 3)
    assert agg["refusal_rate"] == pytest.approx(2 / 3) and "refusal" not in agg
    assert agg["gold_logprob"] == pytest.approx(-2.0)  # the NaN is left out, not averaged as 0
    assert agg["format_ok"] == 1.0  # over the one item that has it
    assert agg["items_scored"] == 3.0
    assert aggregate([]) == {"items_scored": 0.0}
