"""Pairwise judging of free-form answers against the baseline's, asked in both orders.

A judge is any callable `judge(question, answer_a, answer_b)` returning which answer is better:
"A", "B" or "tie" (also 1, 2, 0, or "a"/"b"/"tie" in any case). It may be a local model, a rule or
an API client the user provides. Judges prefer the first or the second position more often than they
should; asking both orders and keeping only verdicts that agree removes that bias from the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

WIN, TIE, LOSS = 1.0, 0.5, 0.0


def _verdict(v: Any) -> str | None:
    """'A', 'B', 'tie' or None for an answer we cannot read."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return {1: "A", 2: "B", 0: "tie"}.get(int(v)) if float(v).is_integer() else None
    if isinstance(v, str):
        s = v.strip().strip(".!\"'()[]").lower()
        if s in ("a", "answer a", "1", "first"):
            return "A"
        if s in ("b", "answer b", "2", "second"):
            return "B"
        if s in ("tie", "equal", "same", "draw", "0", "both"):
            return "tie"
    return None


@dataclass
class Comparison:
    """One item: the current answer against the baseline's."""

    score: float  # WIN (current preferred), LOSS (baseline preferred) or TIE (tie or inconsistent)
    consistent: bool
    error: bool = False


class PairwiseJudge:
    """Compares a current answer with the baseline's answer, both orders; only agreeing verdicts count."""

    def __init__(self, judge: Callable[[str, str, str], Any]):
        if not callable(judge):
            raise TypeError(f"judge: needs a callable judge(question, answer_a, answer_b), got {type(judge).__name__}")
        self.judge = judge

    def compare(self, question: str, current: str, baseline: str) -> Comparison:
        """Ask (current, baseline) then (baseline, current); a win needs both verdicts to agree."""
        if current.strip() == baseline.strip():
            return Comparison(TIE, True)  # the same answer: no call needed
        try:
            first = _verdict(self.judge(question, current, baseline))
            second = _verdict(self.judge(question, baseline, current))
        except Exception:  # noqa: BLE001 - a failing judge must not stop the probe or training
            return Comparison(TIE, False, error=True)
        if first == "A" and second == "B":
            return Comparison(WIN, True)
        if first == "B" and second == "A":
            return Comparison(LOSS, True)
        if first == "tie" and second == "tie":
            return Comparison(TIE, True)
        return Comparison(TIE, False)

    def score(self, questions: Sequence[str], current: Sequence[str | None],
              baseline: Sequence[str | None]) -> tuple[dict[str, float], list[float]]:
        """Aggregate values and per-item scores (NaN where either answer is missing)."""
        items: list[float] = []
        wins = losses = ties = bad = errors = n = 0
        for q, c, b in zip(questions, current, baseline):
            if c is None or b is None:
                items.append(float("nan"))
                continue
            r = self.compare(q, c, b)
            n += 1
            items.append(r.score)
            if r.error:
                errors += 1
            if not r.consistent:
                bad += 1
            elif r.score == WIN:
                wins += 1
            elif r.score == LOSS:
                losses += 1
            else:
                ties += 1
        d = float(n) if n else float("nan")
        values = {"judge_win_rate": wins / d, "judge_loss_rate": losses / d, "judge_tie_rate": ties / d,
                  "judge_inconsistent_rate": bad / d}
        if errors:
            values["judge_errors"] = float(errors)
        return values, items


__all__ = ["Comparison", "PairwiseJudge"]
