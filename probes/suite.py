"""Probe suites: items, few-shot examples, and the JSON Lines suite file reader."""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from probes.scoring import REFUSAL_ANSWER

ITEM_TYPES = ("generate", "choice")
SUITE_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_SUITE_NAME_RE = re.compile(SUITE_NAME_PATTERN)

# Limits on one suite file. They keep a probe run's memory and time bounded and catch a wrong file
# (a training corpus passed as a suite) early; real eval suites stay far below each of them.
MAX_PROMPT_CHARS = 8192  # also the bound on every other text field (answers, choices, passages)
MAX_CHOICES = 26  # one letter each, as in multiple-choice exams
MIN_CHOICES = 2
MAX_ITEMS = 100_000  # the most items one probe record may carry (monitor.records.MAX_ITEMS)
MAX_ID_CHARS = 128
MAX_ANSWERS = 100
MAX_NEW_TOKENS = 512
MAX_FEWSHOT = 32
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_STOP = 8
MAX_STOP_CHARS = 64
MAX_ERRORS_SHOWN = 10

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Example:
    """A few-shot example: a prompt ending where the answer starts, and its answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Item:
    """One probe item: a generate item (free answer) or a choice item (pick one continuation)."""

    id: str
    type: str
    prompt: str
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    gold: int | None = None
    unanswerable: bool = False
    pattern: str | None = None
    fewshot: tuple[Example, ...] = ()
    max_new_tokens: int | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; tuples keep a frozen item hashable and unchangeable.
        for name in ("answers", "choices", "fewshot", "tags"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.type not in ITEM_TYPES:
            raise ValueError(f"item {self.id!r}: type must be one of {ITEM_TYPES}, not {self.type!r}")
        if self.type == "choice":
            if len(self.choices) < MIN_CHOICES:
                raise ValueError(f"item {self.id!r}: a choice item needs at least {MIN_CHOICES} choices")
            if self.gold is None or not 0 <= self.gold < len(self.choices):
                raise ValueError(f"item {self.id!r}: gold must index one of the {len(self.choices)} choices")
        elif not self.answers and not self.unanswerable:
            raise ValueError(f"item {self.id!r}: a generate item needs answers or unanswerable=True")

    def gold_text(self) -> str:
        """The right answer as text: the canonical answer, REFUSAL_ANSWER, or the gold choice."""
        if self.type == "choice":
            assert self.gold is not None  # checked in __post_init__
            return self.choices[self.gold]
        return REFUSAL_ANSWER if self.unanswerable else self.answers[0]

    def render(self, fewshot: Sequence[Example] = ()) -> str:
        """The full prompt: the item's own examples (else the given ones), then the item's prompt."""
        examples = self.fewshot or fewshot
        return "".join(f"{ex.prompt} {ex.answer}\n\n" for ex in examples) + self.prompt


@dataclass
class Suite:
    """A named list of items with suite-wide few-shot examples and generation settings."""

    name: str
    items: list[Item]
    description: str = ""
    fewshot: tuple[Example, ...] = ()
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SUITE_NAME_RE.fullmatch(self.name):
            raise ValueError(f"suite name {self.name!r} must match {SUITE_NAME_PATTERN}")
        if not self.items:
            raise ValueError(f"suite {self.name!r} has no items")
        if len(self.items) > MAX_ITEMS:
            raise ValueError(f"suite {self.name!r} has {len(self.items)} items (limit {MAX_ITEMS})")
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise ValueError(f"suite {self.name!r}: item id {item.id!r} is used twice")
            seen.add(item.id)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"suite {self.name!r}: max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
        self.fewshot = tuple(self.fewshot)
        self.stop = tuple(self.stop)

    def prompt(self, item: Item) -> str:
        """The full prompt for one item, with the suite's few-shot examples unless the item has its own."""
        return item.render(self.fewshot)


class SuiteError(ValueError):
    """A suite file is invalid; the message lists up to 10 problems as "path:line: field: reason (limit)"."""

    def __init__(self, path: str, line: int, field: str, reason: str, problems: Sequence[str] = ()):
        self.path = path
        self.line = line  # 1-based; 0 for a problem with the file as a whole
        self.field = field
        self.reason = reason
        self.problems = list(problems) or [_format(path, line, field, reason)]
        shown = self.problems[:MAX_ERRORS_SHOWN]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else ""))


def _format(path: str, line: int, field: str, reason: str) -> str:
    where = f"{path}:{line}" if line else path
    return f"{where}: {field}: {reason}"


class _Bad(Exception):
    """One problem in one line; the loader adds the path and the line number."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, name: str, *, empty: bool = False, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise _Bad(name, f"expected a string, got {_type_name(value)}")
    if not empty and not value.strip():
        raise _Bad(name, "must not be empty")
    if len(value) > limit:
        raise _Bad(name, f"{len(value)} characters is too long (limit {limit})")
    return value


def _text_list(
    value: Any, name: str, *, limit: int, at_least: int = 1, item_limit: int = MAX_PROMPT_CHARS, empty: bool = False
) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(name, f"expected a list of strings, got {_type_name(value)}")
    if len(value) < at_least:
        raise _Bad(name, f"{len(value)} entries is too few (at least {at_least})")
    if len(value) > limit:
        raise _Bad(name, f"{len(value)} entries is too many (limit {limit})")
    return tuple(_text(v, f"{name}[{i}]", limit=item_limit, empty=empty) for i, v in enumerate(value))


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    # bool is an int in Python, but `true` for a token count is a mistake in the file
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(name, f"expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise _Bad(name, f"{value} is out of range ({lo}..{hi})")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(name, f"expected true or false, got {_type_name(value)}")
    return value


def _prompt(obj: dict[str, Any], where: str) -> str:
    """The prompt from `prompt`, or built from `context` and/or `question`."""
    p = f"{where}." if where else ""
    has_prompt = obj.get("prompt") is not None
    has_parts = obj.get("context") is not None or obj.get("question") is not None
    if has_prompt and has_parts:
        raise _Bad(f"{p}prompt", "give either prompt or context/question, not both")
    if has_prompt:
        return _text(obj["prompt"], f"{p}prompt")
    if not has_parts:
        raise _Bad(f"{p}prompt", "required (give prompt, or context and/or question)")
    lines = []
    if obj.get("context") is not None:
        lines.append("Passage: " + _text(obj["context"], f"{p}context"))
    if obj.get("question") is not None:
        lines.append("Question: " + _text(obj["question"], f"{p}question"))
    lines.append("Answer:")
    prompt = "\n".join(lines)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _Bad(f"{p}prompt", f"the rendered prompt is {len(prompt)} characters (limit {MAX_PROMPT_CHARS})")
    return prompt


def _fewshot(value: Any, name: str) -> tuple[Example, ...]:
    if not isinstance(value, list):
        raise _Bad(name, f"expected a list of examples, got {_type_name(value)}")
    if len(value) > MAX_FEWSHOT:
        raise _Bad(name, f"{len(value)} examples is too many (limit {MAX_FEWSHOT})")
    out = []
    for i, ex in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(ex, dict):
            raise _Bad(where, f"expected an object, got {_type_name(ex)}")
        if "answer" not in ex:
            raise _Bad(f"{where}.answer", "required")
        out.append(Example(_prompt(ex, where), _text(ex["answer"], f"{where}.answer")))
    return tuple(out)


def _item(obj: dict[str, Any]) -> Item:
    """One item from one parsed line; raises _Bad naming the first field that is wrong."""
    if "id" not in obj:
        raise _Bad("id", "required")
    item_id = _text(obj["id"], "id", limit=MAX_ID_CHARS)
    kind = obj.get("type")
    if kind is None:
        kind = "choice" if obj.get("choices") is not None else "generate"
    elif kind not in ITEM_TYPES:
        raise _Bad("type", f"{kind!r} is not one of {', '.join(ITEM_TYPES)}")
    prompt = _prompt(obj, "")
    fewshot = _fewshot(obj["fewshot"], "fewshot") if obj.get("fewshot") is not None else ()
    max_new = obj.get("max_new_tokens")
    if max_new is not None:
        max_new = _int(max_new, "max_new_tokens", 1, MAX_NEW_TOKENS)
    tags = _text_list(obj["tags"], "tags", limit=MAX_TAGS, at_least=0, item_limit=MAX_TAG_CHARS) if obj.get("tags") is not None else ()

    if kind == "choice":
        # Fields of the other type would be silently unused; a file that has them is probably wrong.
        for other in ("answer", "answers", "unanswerable", "pattern"):
            if obj.get(other) is not None:
                raise _Bad(other, "not used by a choice item (give choices and gold)")
        if obj.get("choices") is None:
            raise _Bad("choices", "required for a choice item")
        choices = _text_list(obj["choices"], "choices", limit=MAX_CHOICES, at_least=MIN_CHOICES)
        if len(set(choices)) != len(choices):
            raise _Bad("choices", "two choices are the same text (each must be distinct)")
        gold = obj.get("gold")
        if gold is None:
            raise _Bad("gold", "required for a choice item (an index or the gold choice's text)")
        if isinstance(gold, str):
            if gold not in choices:
                raise _Bad("gold", f"{gold!r} is not one of the choices")
            gold = choices.index(gold)
        else:
            gold = _int(gold, "gold", 0, len(choices) - 1)
        return Item(item_id, "choice", prompt, choices=choices, gold=gold, fewshot=fewshot, max_new_tokens=max_new, tags=tags)

    for other in ("choices", "gold"):
        if obj.get(other) is not None:
            raise _Bad(other, "not used by a generate item (give answer or answers)")
    unanswerable = _bool(obj["unanswerable"], "unanswerable") if obj.get("unanswerable") is not None else False
    has_one, has_many = obj.get("answer") is not None, obj.get("answers") is not None
    if has_one and has_many:
        raise _Bad("answers", "give either answer or answers, not both")
    if has_one:
        answers: tuple[str, ...] = (_text(obj["answer"], "answer"),)
    elif has_many:
        answers = _text_list(obj["answers"], "answers", limit=MAX_ANSWERS, at_least=0 if unanswerable else 1)
    else:
        answers = ()
    if unanswerable and answers:
        raise _Bad("answers", "an unanswerable item has no answers (its gold is a refusal)")
    if not unanswerable and not answers:
        raise _Bad("answer", "required for a generate item (give answer, answers, or unanswerable: true)")
    pattern = obj.get("pattern")
    if pattern is not None:
        pattern = _text(pattern, "pattern")
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise _Bad("pattern", f"not a valid regular expression ({e})") from None
        if answers and not compiled.fullmatch(answers[0].strip()):
            raise _Bad("pattern", f"the canonical answer {answers[0]!r} does not match it (it must fullmatch)")
    return Item(
        item_id,
        "generate",
        prompt,
        answers=answers,
        unanswerable=unanswerable,
        pattern=pattern,
        fewshot=fewshot,
        max_new_tokens=max_new,
        tags=tags,
    )


def _header(obj: Any, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """Suite settings from the header; a bad field is reported and left at its default."""
    out: dict[str, Any] = {}
    if not isinstance(obj, dict):
        problems.append(("suite", f"expected an object, got {_type_name(obj)}"))
        return out
    checks = {
        "name": lambda v: _suite_name(_text(v, "suite.name", limit=64)),
        "description": lambda v: _text(v, "suite.description", empty=True),
        "fewshot": lambda v: _fewshot(v, "suite.fewshot"),
        "max_new_tokens": lambda v: _int(v, "suite.max_new_tokens", 1, MAX_NEW_TOKENS),
        "stop": lambda v: _stops(_text_list(v, "suite.stop", limit=MAX_STOP, at_least=0, item_limit=MAX_STOP_CHARS, empty=True)),
    }
    for key, check in checks.items():
        if obj.get(key) is None:
            continue
        try:
            out[key] = check(obj[key])
        except _Bad as e:
            problems.append((e.field, e.reason))
    return out


def _suite_name(value: str) -> str:
    if not _SUITE_NAME_RE.fullmatch(value):
        raise _Bad("suite.name", f"{value!r} does not match {SUITE_NAME_PATTERN}")
    return value


def _stops(value: tuple[str, ...]) -> tuple[str, ...]:
    if any(not s for s in value):
        raise _Bad("suite.stop", "a stop sequence must not be empty")
    return value


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _open_text(path: Path):  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":  # gzip by content, so a misnamed file still reads
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def load_suite(path: PathLike, *, name: str | None = None, strict: bool = True) -> Suite:
    """Read one suite from a .jsonl (or .jsonl.gz) file; strict=False skips bad lines and records why."""
    p = Path(path)
    where = str(path)
    problems: list[tuple[int, str, str]] = []
    items: list[Item] = []
    first_line: dict[str, int] = {}
    settings: dict[str, Any] = {}
    seen_content = False

    def bad(line: int, fld: str, reason: str) -> None:
        problems.append((line, fld, reason))

    try:
        with _open_text(p) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    seen_content = True
                    bad(lineno, "json", f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not seen_content and isinstance(obj, dict) and "suite" in obj and "id" not in obj:
                    seen_content = True
                    header_problems: list[tuple[str, str]] = []
                    settings = _header(obj["suite"], header_problems)
                    for fld, reason in header_problems:
                        bad(lineno, fld, reason)
                    continue
                if seen_content and isinstance(obj, dict) and "suite" in obj and "id" not in obj:
                    bad(lineno, "suite", "the suite header must be the first line")
                    continue
                seen_content = True
                if not isinstance(obj, dict):
                    bad(lineno, "json", f"expected an object per line, got {_type_name(obj)}")
                    continue
                if len(items) >= MAX_ITEMS:
                    bad(lineno, "items", f"more items than a suite may hold (limit {MAX_ITEMS}); the rest are left out")
                    break
                try:
                    item = _item(obj)
                except _Bad as e:
                    bad(lineno, e.field, e.reason)
                    continue
                if item.id in first_line:
                    bad(lineno, "id", f"{item.id!r} is already used on line {first_line[item.id]} (ids must be unique)")
                    continue
                first_line[item.id] = lineno
                items.append(item)
    except UnicodeDecodeError as e:
        bad(0, "encoding", f"not UTF-8 text ({e.reason} at byte {e.start})")
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        bad(0, "file", f"cannot be read ({e})")

    header_name = settings.pop("name", None)
    suite_name = name if name is not None else header_name or _stem(p)
    if not _SUITE_NAME_RE.fullmatch(suite_name):
        bad(0, "name", f"suite name {suite_name!r} does not match {SUITE_NAME_PATTERN} (set it in the header or pass name=)")
    if not items:
        bad(0, "items", "no valid items (a suite needs at least 1)")

    messages = [_format(where, *prob) for prob in problems]
    fatal = not items or not _SUITE_NAME_RE.fullmatch(suite_name)
    if problems and (strict or fatal):
        raise SuiteError(where, *problems[0], problems=messages)
    return Suite(name=suite_name, items=items, skipped=messages, **settings)


def _suite_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.is_file() and (f.name.endswith(".jsonl") or f.name.endswith(".jsonl.gz")))


def load_suites(path: PathLike, *, strict: bool = True) -> list[Suite]:
    """Read a suite file, or every *.jsonl / *.jsonl.gz file of a directory (one suite each), sorted by name."""
    p = Path(path)
    if not p.is_dir():
        return [load_suite(p, strict=strict)]
    files = _suite_files(p)
    if not files:
        raise SuiteError(str(path), 0, "files", "no *.jsonl or *.jsonl.gz suite files in this directory")
    suites = [load_suite(f, strict=strict) for f in files]
    by_name: dict[str, Path] = {}
    for s, f in zip(suites, files):
        if s.name in by_name:
            raise SuiteError(str(f), 0, "name", f"suite name {s.name!r} is also used by {by_name[s.name]} (names must be unique)")
        by_name[s.name] = f
    return sorted(suites, key=lambda s: s.name)


def resolve(spec: Suite | PathLike) -> Suite:
    """A Suite as given; "builtin:NAME" or a bare builtin NAME as builtin(NAME); anything else as a suite file."""
    if isinstance(spec, Suite):
        return spec
    from probes.builtin import BUILTIN, builtin  # builtin.py builds on this module

    if isinstance(spec, str):
        if spec.startswith("builtin:"):
            return builtin(spec[len("builtin:") :])
        if spec in BUILTIN:
            return builtin(spec)
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such suite file, and not a builtin suite ({', '.join(BUILTIN)})")
    return load_suite(spec)
