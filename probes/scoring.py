"""Per-item scores of probe answers (SQuAD-style matching, refusals, multiple choice) and their aggregation."""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # suite.py imports this module, so the name is only needed for annotations
    from probes.suite import Item

REFUSAL_ANSWER = "unanswerable"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# SQuAD deletes ASCII punctuation; model output also carries typographic quotes and dashes, so every
# Unicode punctuation character goes too.
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    # SQuAD deletes ASCII punctuation; model output also carries typographic quotes and dashes, so every
    # Unicode punctuation character (category P*) goes too.
    if ch.isascii():
        return ch in _ASCII_PUNCT
    return unicodedata.category(ch).startswith("P")


# Phrases that mean "the passage does not tell", matched on normalized text at token boundaries.
# Written already normalized: no punctuation ("don't" -> "dont"), no articles.
_REFUSAL_PHRASES = (
    "unanswerable",
    "not answerable",
    "unknown",
    "cannot be answered",
    "cant be answered",
    "can not be answered",
    "cannot answer",
    "cant answer",
    "cannot be determined",
    "cant be determined",
    "cannot determine",
    "cannot tell",
    "cant tell",
    "cannot say",
    "impossible to say",
    "impossible to tell",
    "impossible to determine",
    "not enough information",
    "not enough info",
    "insufficient information",
    "no information",
    "not enough context",
    "not in passage",
    "not in context",
    "not in text",
    "not mentioned",
    "not stated",
    "not given",
    "not provided",
    "not specified",
    "passage does not say",
    "passage doesnt say",
    "does not say",
    "doesnt say",
    "does not mention",
    "doesnt mention",
    "i dont know",
    "i do not know",
    "dont know",
    "no answer",
    "no idea",
)
_REFUSAL_RE = re.compile(r"(?:^| )(?:" + "|".join(re.escape(p) for p in _REFUSAL_PHRASES) + r")(?: |$)")
# Too short to search for inside a sentence, but a refusal when it is the whole answer.
_REFUSAL_WHOLE = frozenset({"na", "none given", "not sure"})


def normalize(text: str) -> str:
    """SQuAD-style normal form: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer, else 0.0."""
    p = normalize(pred)
    return 1.0 if any(p == normalize(a) for a in answers) else 0.0


def _contains(tokens: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(tokens[i : i + n] == sub for i in range(len(tokens) - n + 1))


def easy_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 if some normalized answer occurs in the normalized prediction on token boundaries (Easy Match)."""
    p = normalize(pred).split()
    for a in answers:
        sub = normalize(a).split()
        # An answer that normalizes to nothing (say "The") would be found in every prediction; it only
        # matches a prediction that is empty as well, as exact_match does.
        if (sub and _contains(p, sub)) or (not sub and not p):
            return 1.0
    return 0.0


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2's rule: an empty side scores 1 only against another empty side
        return 1.0 if pred_tokens == gold_tokens else 0.0
    common: dict[str, int] = {}
    for t in gold_tokens:
        common[t] = common.get(t, 0) + 1
    same = 0
    for t in pred_tokens:
        if common.get(t, 0) > 0:
            common[t] -= 1
            same += 1
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, answers: Sequence[str]) -> float:
    """Best token-level F1 of the prediction against any answer, on normalized tokens (SQuAD)."""
    p = normalize(pred).split()
    return max((_f1(p, normalize(a).split()) for a in answers), default=0.0)


def is_refusal(text: str) -> bool:
    """True if the text declines to answer ("unanswerable", "not enough information", "I don't know", ...)."""
    t = normalize(text)
    return t in _REFUSAL_WHOLE or _REFUSAL_RE.search(t) is not None


def clean_output(text: str, stop: Sequence[str]) -> str:
    """The generated text cut at the first occurrence of any stop sequence, stripped of surrounding space."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut].strip()


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def score_generation(item: Item, output: str, gold_logprob: float | None = None) -> dict[str, float]:
    """Scores of one generated answer (already cut with clean_output) to a generate item."""
    if item.type != "generate":
        raise ValueError(f"item {item.id!r} is a {item.type} item; score it with score_choices")
    out = output.strip()
    refused = is_refusal(out)
    scores: dict[str, float] = {}
    if item.unanswerable:
        # Refusing is the one right answer, so every match metric measures it.
        ok = 1.0 if refused else 0.0
        scores.update(accuracy=ok, exact_match=ok, easy_match=ok, f1=ok)
    else:
        em = exact_match(out, item.answers)
        scores.update(accuracy=em, exact_match=em, easy_match=easy_match(out, item.answers), f1=token_f1(out, item.answers))
    scores["refusal"] = 1.0 if refused else 0.0
    if item.pattern is not None:
        fmt = 1.0 if _compiled(item.pattern).fullmatch(out) else 0.0
        scores["format_ok"] = fmt
        # normalize() forgives case and punctuation, which is exactly what a format item tests
        scores["accuracy"] = min(scores["accuracy"], fmt)
    if gold_logprob is not None:
        scores["gold_logprob"] = float(gold_logprob)
    return scores


def _argmax(values: Sequence[float]) -> int:
    # First maximum wins, as numpy.argmax in lm-evaluation-harness; NaN never wins.
    best, best_v = 0, -math.inf
    for i, v in enumerate(values):
        if v > best_v:
            best, best_v = i, v
    return best


def score_choices(item: Item, logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> dict[str, float]:
    """Scores of one choice item from the summed log-probability of each choice's continuation."""
    if item.type != "choice" or item.gold is None:
        raise ValueError(f"item {item.id!r} is not a choice item with a gold index")
    if len(logprobs) != len(item.choices):
        raise ValueError(f"item {item.id!r}: {len(logprobs)} log-probabilities for {len(item.choices)} choices")
    if lengths is None:
        # lm-evaluation-harness scores the continuation " " + choice; its length in bytes
        lengths = [len((" " + c).encode("utf-8")) for c in item.choices]
    elif len(lengths) != len(item.choices) or any(n <= 0 for n in lengths):
        raise ValueError(f"item {item.id!r}: lengths must be {len(item.choices)} positive numbers")
    lp = [float(x) for x in logprobs]
    return {
        "accuracy": 1.0 if _argmax(lp) == item.gold else 0.0,
        "acc_norm": 1.0 if _argmax([x / n for x, n in zip(lp, lengths)]) == item.gold else 0.0,
        "gold_logprob": lp[item.gold],
    }


def aggregate(per_item: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the items that have a finite value for it, plus items_scored."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    scored = 0
    for scores in per_item:
        any_finite = False
        for key, value in scores.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            any_finite = True
            name = "refusal_rate" if key == "refusal" else key
            sums[name] = sums.get(name, 0.0) + v
            counts[name] = counts.get(name, 0) + 1
        scored += any_finite
    out = {k: sums[k] / counts[k] for k in sums}
    out["items_scored"] = float(scored)
    return out
