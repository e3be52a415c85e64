"""Suite files: the JSON Lines format, its limits and errors, directories, and resolve()."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from probes.builtin import builtin
from probes.suite import (
    MAX_CHOICES,
    MAX_ID_CHARS,
    MAX_ITEMS,
    MAX_PROMPT_CHARS,
    Example,
    Item,
    Suite,
    SuiteError,
    load_suite,
    load_suites,
    resolve,
)


def write(path: Path, *lines: Any) -> Path:
    """Write JSON values (or raw strings) one per line."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


GOOD = [
    {"suite": {"name": "mini", "description": "two items", "fewshot": [{"question": "1+1?", "answer": "2"}], "max_new_tokens": 8, "stop": ["\n", "."]}},
    {"id": "g1", "context": "The capital of France is Lyon.", "question": "What is the capital of France?", "answer": "Lyon", "tags": ["counterfactual"]},
    {"id": "c1", "prompt": "The sky is", "choices": ["green", "blue"], "gold": "blue", "extra": "ignored"},
    {"id": "u1", "question": "What is the capital of Atlantis?", "unanswerable": True},
    {"id": "f1", "prompt": "Say yes.\nAnswer:", "answers": ["yes", "Yes"], "pattern": "(?i:yes|no)", "max_new_tokens": 3,
     "fewshot": [{"prompt": "Say no.\nAnswer:", "answer": "no"}]},
]


def test_good_file(tmp_path: Path) -> None:
    s = load_suite(write(tmp_path / "whatever.jsonl", *GOOD))
    assert s.name == "mini" and s.description == "two items"
    assert s.max_new_tokens == 8 and s.stop == ("\n", ".")
    assert s.fewshot == (Example("Question: 1+1?\nAnswer:", "2"),)
    assert [i.id for i in s.items] == ["g1", "c1", "u1", "f1"] and s.skipped == []
    g, c, u, f = s.items
    assert g.type == "generate" and g.answers == ("Lyon",) and g.tags == ("counterfactual",)
    assert g.prompt == "Passage: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    assert c.type == "choice" and c.gold == 1 and c.gold_text() == "blue"
    assert u.unanswerable and u.answers == () and u.gold_text() == "unanswerable"
    assert u.prompt == "Question: What is the capital of Atlantis?\nAnswer:"
    assert f.pattern == "(?i:yes|no)" and f.max_new_tokens == 3 and f.gold_text() == "yes"
    # the suite's examples, unless the item has its own
    assert s.prompt(g) == "Question: 1+1?\nAnswer: 2\n\n" + g.prompt
    assert s.prompt(f) == "Say no.\nAnswer: no\n\nSay yes.\nAnswer:"


def test_no_header_defaults_and_name_from_file(tmp_path: Path) -> None:
    s = load_suite(write(tmp_path / "plain.jsonl", "", GOOD[1], "   "))
    assert s.name == "plain" and s.max_new_tokens == 16 and s.stop == ("\n",) and s.fewshot == ()
    assert load_suite(tmp_path / "plain.jsonl", name="other").name == "other"


def test_gzip(tmp_path: Path) -> None:
    p = tmp_path / "zipped.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD[1]) + "\n")
    s = load_suite(p)
    assert s.name == "zipped" and s.items[0].id == "g1"


def test_directory_sorted_by_suite_name(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", {"suite": {"name": "zeta"}}, GOOD[1])
    write(tmp_path / "b.jsonl", GOOD[2])
    write(tmp_path / "notes.txt", "not a suite")
    suites = load_suites(tmp_path)
    assert [s.name for s in suites] == ["b", "zeta"]
    assert [s.name for s in load_suites(tmp_path / "a.jsonl")] == ["zeta"]


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="no \\*.jsonl"):
        load_suites(tmp_path)
    write(tmp_path / "a.jsonl", {"suite": {"name": "same"}}, GOOD[1])
    write(tmp_path / "b.jsonl", {"suite": {"name": "same"}}, GOOD[1])
    with pytest.raises(SuiteError, match="'same' is also used"):
        load_suites(tmp_path)


BAD_LINES = [
    # (line, field expected in the error, a word of the reason)
    ('{"id": "x", "answer": ', "json", "not valid JSON"),
    ("[1, 2]", "json", "expected an object"),
    ({"answer": "7", "prompt": "p"}, "id", "required"),
    ({"id": 5, "answer": "7", "prompt": "p"}, "id", "expected a string"),
    ({"id": "x" * (MAX_ID_CHARS + 1), "answer": "7", "prompt": "p"}, "id", f"limit {MAX_ID_CHARS}"),
    ({"id": "t", "type": "essay", "prompt": "p", "answer": "a"}, "type", "not one of"),
    ({"id": "np", "answer": "a"}, "prompt", "required"),
    ({"id": "both", "prompt": "p", "question": "q", "answer": "a"}, "prompt", "not both"),
    ({"id": "long", "prompt": "x" * (MAX_PROMPT_CHARS + 1), "answer": "a"}, "prompt", f"limit {MAX_PROMPT_CHARS}"),
    ({"id": "longctx", "context": "x" * (MAX_PROMPT_CHARS - 10), "question": "q", "answer": "a"}, "prompt", f"limit {MAX_PROMPT_CHARS}"),
    ({"id": "na", "prompt": "p"}, "answer", "required"),
    ({"id": "ea", "prompt": "p", "answer": ""}, "answer", "empty"),
    ({"id": "ia", "prompt": "p", "answer": 7}, "answer", "expected a string"),
    ({"id": "aa", "prompt": "p", "answer": "a", "answers": ["a"]}, "answers", "not both"),
    ({"id": "ua", "prompt": "p", "answer": "a", "unanswerable": True}, "answers", "no answers"),
    ({"id": "ub", "prompt": "p", "unanswerable": "yes"}, "unanswerable", "true or false"),
    ({"id": "pat", "prompt": "p", "answer": "a", "pattern": "(["}, "pattern", "valid regular expression"),
    ({"id": "pm", "prompt": "p", "answer": "lyon", "pattern": "[A-Z]+"}, "pattern", "does not match"),
    ({"id": "c1", "prompt": "p", "choices": ["only"], "gold": 0}, "choices", "at least 2"),
    ({"id": "c2", "prompt": "p", "choices": [f"c{i}" for i in range(MAX_CHOICES + 1)], "gold": 0}, "choices", f"limit {MAX_CHOICES}"),
    ({"id": "c3", "prompt": "p", "choices": ["a", "b"]}, "gold", "required"),
    ({"id": "c4", "prompt": "p", "choices": ["a", "b"], "gold": 2}, "gold", "out of range (0..1)"),
    ({"id": "c5", "prompt": "p", "choices": ["a", "b"], "gold": "c"}, "gold", "not one of the choices"),
    ({"id": "c6", "prompt": "p", "choices": ["a", "a"], "gold": 0}, "choices", "distinct"),
    ({"id": "c7", "prompt": "p", "choices": ["a", "b"], "gold": True}, "gold", "expected an integer"),
    ({"id": "c8", "prompt": "p", "choices": ["a", "b"], "gold": 0, "answer": "a"}, "answer", "not used by a choice item"),
    ({"id": "c9", "type": "generate", "prompt": "p", "choices": ["a", "b"], "answer": "a"}, "choices", "not used by a generate"),
    ({"id": "m1", "prompt": "p", "answer": "a", "max_new_tokens": 0}, "max_new_tokens", "(1..512)"),
    ({"id": "m2", "prompt": "p", "answer": "a", "max_new_tokens": 513}, "max_new_tokens", "(1..512)"),
    ({"id": "tg", "prompt": "p", "answer": "a", "tags": "x"}, "tags", "expected a list"),
    ({"id": "fs", "prompt": "p", "answer": "a", "fewshot": [{"prompt": "q"}]}, "fewshot[0].answer", "required"),
    ({"id": "fs2", "prompt": "p", "answer": "a", "fewshot": ["q"]}, "fewshot[0]", "expected an object"),
    ({"suite": {"name": "late"}}, "suite", "first line"),
]


@pytest.mark.parametrize("line, field, reason", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_each_bad_line_names_file_line_and_field(tmp_path: Path, line: Any, field: str, reason: str) -> None:
    p = write(tmp_path / "s.jsonl", GOOD[1], line, GOOD[2])
    with pytest.raises(SuiteError) as e:
        load_suite(p)
    err = e.value
    assert (err.path, err.line, err.field) == (str(p), 2, field)
    assert reason in err.reason
    assert str(err) == f"{p}:2: {field}: {err.reason}"
    # non-strict keeps the good lines around the bad one and says what it left out
    s = load_suite(p, strict=False)
    assert [i.id for i in s.items] == ["g1", "c1"]
    assert s.skipped == [str(err)]


def test_duplicate_id(tmp_path: Path) -> None:
    p = write(tmp_path / "s.jsonl", GOOD[1], GOOD[2], GOOD[1])
    with pytest.raises(SuiteError, match=r":3: id: 'g1' is already used on line 1"):
        load_suite(p)
    assert [i.id for i in load_suite(p, strict=False).items] == ["g1", "c1"]


def test_bad_header_field_falls_back_to_default(tmp_path: Path) -> None:
    p = write(tmp_path / "hdr.jsonl", {"suite": {"name": "bad name!", "max_new_tokens": 9999, "stop": [""]}}, GOOD[1])
    with pytest.raises(SuiteError) as e:
        load_suite(p)
    assert e.value.line == 1 and e.value.field == "suite.name"
    assert len(e.value.problems) == 3
    s = load_suite(p, strict=False)
    assert s.name == "hdr" and s.max_new_tokens == 16 and s.stop == ("\n",) and len(s.skipped) == 3


def test_strict_lists_up_to_ten_problems(tmp_path: Path) -> None:
    p = write(tmp_path / "many.jsonl", *[{"id": f"x{i}", "prompt": "p"} for i in range(13)], GOOD[1])
    with pytest.raises(SuiteError) as e:
        load_suite(p)
    msg = str(e.value).splitlines()
    assert len(msg) == 11 and msg[-1] == "... and 3 more problems"
    assert msg[0].startswith(f"{p}:1: answer: ") and msg[9].startswith(f"{p}:10: answer: ")
    assert len(e.value.problems) == 13


def test_empty_suite_is_an_error_either_way(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.jsonl", {"suite": {"name": "e"}})
    all_bad = write(tmp_path / "bad.jsonl", {"id": "x", "prompt": "p"})
    for p in (empty, all_bad):
        for strict in (True, False):
            with pytest.raises(SuiteError, match="no valid items"):
                load_suite(p, strict=strict)
    with pytest.raises(SuiteError) as e:
        load_suite(empty)
    assert e.value.line == 0 and e.value.field == "items" and str(e.value).startswith(f"{empty}: items: ")


def test_bad_file_name_needs_a_name(tmp_path: Path) -> None:
    p = write(tmp_path / "my suite.jsonl", GOOD[1])
    with pytest.raises(SuiteError, match="pass name="):
        load_suite(p, strict=False)
    assert load_suite(p, name="my-suite").name == "my-suite"


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"id": "x", "prompt": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(SuiteError, match="encoding: not UTF-8"):
        load_suite(p)


def test_item_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the limit itself is 100,000; a small stand-in keeps the test fast, the same code path
    import probes.suite as suite_mod

    assert MAX_ITEMS == 100_000
    monkeypatch.setattr(suite_mod, "MAX_ITEMS", 3)
    p = write(tmp_path / "big.jsonl", *[{"id": f"i{k}", "prompt": "p", "answer": "a"} for k in range(5)])
    with pytest.raises(SuiteError, match=r":4: items: .*limit 3"):
        load_suite(p)
    s = load_suite(p, strict=False)
    assert [i.id for i in s.items] == ["i0", "i1", "i2"] and len(s.skipped) == 1


def test_item_and_suite_constructors_check_invariants() -> None:
    with pytest.raises(ValueError):
        Item("x", "essay", "p", answers=("a",))
    with pytest.raises(ValueError):
        Item("x", "choice", "p", choices=("a", "b"), gold=2)
    with pytest.raises(ValueError):
        Item("x", "generate", "p")
    item = Item("x", "generate", "p", answers=["a"], tags=["t"])  # type: ignore[arg-type]
    assert item.answers == ("a",) and item.tags == ("t",)
    hash(item)
    with pytest.raises(ValueError):
        Suite("bad name", [item])
    with pytest.raises(ValueError):
        Suite("ok", [])
    with pytest.raises(ValueError):
        Suite("ok", [item, item])


def test_render() -> None:
    own = Item("x", "generate", "Q: b\nA:", answers=("2",), fewshot=(Example("Q: a\nA:", "1"),))
    plain = Item("y", "generate", "Q: b\nA:", answers=("2",))
    given = [Example("Q: c\nA:", "3"), Example("Q: d\nA:", "4")]
    assert own.render(given) == "Q: a\nA: 1\n\nQ: b\nA:"
    assert plain.render(given) == "Q: c\nA: 3\n\nQ: d\nA: 4\n\nQ: b\nA:"
    assert plain.render() == "Q: b\nA:"


def test_resolve(tmp_path: Path) -> None:
    s = builtin("format", n=5)
    assert resolve(s) is s
    assert resolve("builtin:arithmetic").items == builtin("arithmetic").items
    assert resolve("reading").name == "reading"
    p = write(tmp_path / "file.jsonl", GOOD[1])
    assert resolve(p).name == "file" and resolve(str(p)).name == "file"
    with pytest.raises(ValueError, match="arithmetic, reading"):
        resolve("builtin:nope")
    with pytest.raises(FileNotFoundError, match="not a builtin suite"):
        resolve(tmp_path / "missing.jsonl")


def test_builtin_suites_pass_the_file_format(tmp_path: Path) -> None:
    # every builtin suite, written as a suite file, loads back unchanged: it keeps every limit and rule
    for name in ("arithmetic", "reading", "faithfulness", "format"):
        s = builtin(name, n=30)
        header = {"suite": {"name": s.name, "description": s.description, "max_new_tokens": s.max_new_tokens,
                            "stop": list(s.stop), "fewshot": [{"prompt": e.prompt, "answer": e.answer} for e in s.fewshot]}}
        lines: list[Any] = [header]
        for it in s.items:
            d: dict[str, Any] = {"id": it.id, "type": it.type, "prompt": it.prompt, "tags": list(it.tags)}
            if it.type == "choice":
                d.update(choices=list(it.choices), gold=it.gold)
            elif it.unanswerable:
                d["unanswerable"] = True
            else:
                d["answers"] = list(it.answers)
            if it.pattern is not None:
                d["pattern"] = it.pattern
            lines.append(d)
        back = load_suite(write(tmp_path / f"{name}.jsonl", *lines))
        assert back.items == s.items and back.fewshot == s.fewshot and back.max_new_tokens == s.max_new_tokens
