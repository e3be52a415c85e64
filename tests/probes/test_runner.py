"""The runner, scheduler, drift and judge on a tiny GPT-2 really trained on arithmetic (CPU)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from probes import Drift, PairwiseJudge, Probe, ProbeSet
from probes.builtin import builtin
from probes.probe import Scheduled, check_probes  # noqa: E402
from probes.runner import CausalLMAdapter, merge, probing, run_suite, series, shard, unwrap  # noqa: E402
from tests.probes.conftest import char_gpt, train_steps  # noqa: E402


class Sink:
    """A reporter stand-in that keeps what the probe set logs (the daemon side has its own tests)."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, int, dict[str, float], dict[str, Any]]] = []

    def log(self, kind: str, step: int, values: dict[str, float], **kw: Any) -> None:
        self.logged.append((kind, step, dict(values), kw))


def records_equal(a: list[Any], b: list[Any]) -> bool:
    def norm(recs: list[Any]) -> list[Any]:
        out = []
        for name, values, items in recs:
            v = {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in values.items() if k != "seconds"}
            out.append((name, v, [None if math.isnan(x) else x for x in items] if items is not None else None))
        return out

    return norm(a) == norm(b)


def test_probe_results_are_identical_on_the_same_weights_whatever_the_rng_did(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    probe = Probe("arithmetic", tok, n=24, batch_size=8)
    first = probe.run(model)
    torch.rand(1000)  # move every generator between the runs: dropout would change the result in train mode
    random.random()
    second = probe.run(model)
    assert records_equal(first, second)
    names = [r[0] for r in first]
    assert names == ["arithmetic", "arithmetic/gold_logprob"]
    values = first[0][1]
    assert values["items_scored"] == 24 and values["items_total"] == 24
    # Trained, not random: the gold answers are far likelier than chance (vocab ~96 characters).
    assert values["gold_logprob"] > -2.0 * math.log(96)
    assert len(first[0][2]) == 24 and set(first[0][2]) <= {0.0, 1.0}


def test_probing_restores_every_rng_and_each_module_s_train_flag(trained: tuple[Any, Any]) -> None:
    import numpy as np

    model, tok = trained
    model.train()
    model.transformer.h[0].eval()  # a frozen block the user keeps in eval mode
    flags = [m.training for m in model.modules()]
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    with probing(model):
        assert not model.training and not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
        torch.rand(10)
        random.random()
        np.random.rand(3)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np.random.get_state(), np_state))
    assert torch.is_grad_enabled()


def test_probing_restores_state_when_the_probe_raises(trained: tuple[Any, Any]) -> None:
    model, _ = trained
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with probing(model):
            torch.rand(5)
            raise RuntimeError("boom")
    assert model.training and torch.equal(torch.get_rng_state(), state)


def test_training_loss_curve_and_step_count_are_unchanged_by_probing(trained: tuple[Any, Any]) -> None:
    """Same seed, dropout on, random batches: with a probe every 5 steps the losses are bit-for-bit the same."""
    from monitor.demo import lm_batch, task_texts

    _, tok = trained
    pairs = task_texts("reading", 500, seed=3)

    def fit(with_probes: bool) -> tuple[list[float], int, Any]:
        model = char_gpt(seed=1)
        torch.manual_seed(7)
        rng = random.Random(7)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sink = Sink()
        ps = ProbeSet([Probe("arithmetic", n=8, every_steps=5, max_share=None, batch_size=8),
                       Drift(n_prompts=4, every_steps=5, max_share=None)] if with_probes else [], sink, tokenizer=tok)
        ps.start(0, model)
        losses = []
        steps = 0
        for step in range(1, 16):
            model.train()
            x, y = lm_batch(tok, pairs, rng, 8)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            ps.after_step(step, model)
            assert model.training
        return losses, steps, sink

    plain, n_plain, _ = fit(False)
    probed, n_probed, sink = fit(True)
    assert n_plain == n_probed == 15
    assert plain == probed
    steps = sorted({s for kind, s, _, kw in sink.logged if kind == "probe" and kw["suite"] == "arithmetic"})
    assert steps == [0, 5, 10, 15]
    drift = [v for kind, s, v, kw in sink.logged if kw["suite"] == "drift"]
    assert drift[0]["kl"] == pytest.approx(0.0, abs=1e-6) and drift[0]["top1_agreement"] == 1.0
    assert drift[-1]["kl"] > 1e-3  # 15 steps of another task moved the next-token distributions


class LogitsOnly(torch.nn.Module):
    """A model without HF's generate(): forward(ids) -> logits. The runner falls back to its own greedy loop."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Any) -> Any:
        return self.lm(input_ids=ids).logits


def test_hf_generate_and_the_plain_greedy_loop_give_the_same_answers(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    suite = builtin("arithmetic", n=12)
    prompts = [suite.prompt(it) for it in suite.items]
    with probing(model):
        hf = CausalLMAdapter(model, tok, batch_size=5).generate(prompts, 8)
        loop = CausalLMAdapter(LogitsOnly(model), tok, batch_size=5, max_length=256).generate(prompts, 8)
        one = CausalLMAdapter(model, tok, batch_size=1).generate(prompts, 8)
    # The plain loop does not stop at the end token (id 0, dropped when decoding): compare what both produced.
    assert [h for h in hf] == [s[:len(h)] for h, s in zip(hf, loop)]
    assert hf == one  # left padding in a batch changes nothing
    assert any(h.strip() for h in hf)


def test_loglikelihood_does_not_depend_on_batching_or_padding(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    suite = builtin("reading", n=6)
    reqs = [(suite.prompt(it), " " + c) for it in suite.items for c in it.choices]
    with probing(model):
        a = CausalLMAdapter(model, tok, batch_size=1).loglikelihood(reqs)
        b = CausalLMAdapter(model, tok, batch_size=7).loglikelihood(reqs)
        c = CausalLMAdapter(LogitsOnly(model), tok, batch_size=3, max_length=256).loglikelihood(reqs)
    assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(c, abs=1e-4)
    assert all(x < 0 for x in a)


def test_choice_suite_scores_accuracy_and_acc_norm_per_item(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    suite = builtin("reading", n=10)
    with probing(model):
        res = run_suite(CausalLMAdapter(model, tok), suite, batch_size=4)
    assert res.complete
    for m in res.metrics:
        assert m is not None and set(m) >= {"accuracy", "acc_norm", "gold_logprob"}
    recs = series(res)
    assert recs[0][1]["items_scored"] == 10 and 0.0 <= recs[0][1]["acc_norm"] <= 1.0


def test_the_time_budget_leaves_unscored_items_as_nan(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    suite = builtin("arithmetic", n=12)
    ticks = iter(range(1000))
    with probing(model):
        res = run_suite(CausalLMAdapter(model, tok), suite, batch_size=4, budget_seconds=1.5,
                        clock=lambda: float(next(ticks)))
    # The clock advances one second per look: the first two batches run, the third is over budget.
    assert [m is not None for m in res.metrics] == [True] * 8 + [False] * 4
    assert not res.complete
    name, values, items = series(res)[0]
    assert values["items_scored"] == 8 and values["items_total"] == 12
    assert all(math.isnan(x) for x in items[8:]) and not any(math.isnan(x) for x in items[:8])


def test_sharded_items_merge_back_into_the_suite_order(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    suite = builtin("arithmetic", n=10)
    adapter = CausalLMAdapter(model, tok, batch_size=4)
    with probing(model):
        whole = run_suite(adapter, suite)
        parts = [shard(run_suite(adapter, suite, indices=range(r, 10, 3))) for r in range(3)]
        merged = merge(parts, run_suite(adapter, suite, indices=range(0, 10, 3)))
    assert merged.complete
    assert [m["accuracy"] for m in merged.metrics] == [m["accuracy"] for m in whole.metrics]
    assert [m["gold_logprob"] for m in merged.metrics] == pytest.approx([m["gold_logprob"] for m in whole.metrics],
                                                                        abs=1e-4)


def test_unwrap_finds_the_module_under_ddp_like_wrappers(trained: tuple[Any, Any]) -> None:
    model, _ = trained

    class DistributedDataParallel(torch.nn.Module):
        def __init__(self, module: Any) -> None:
            super().__init__()
            self.module = module

    class OptimizedModule(torch.nn.Module):
        def __init__(self, module: Any) -> None:
            super().__init__()
            self._orig_mod = module

    assert unwrap(OptimizedModule(DistributedDataParallel(model))) is model
    assert unwrap(model) is model


def test_drift_is_zero_on_the_baseline_and_grows_with_a_fine_tune(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    drift = Drift(tokenizer=tok, n_prompts=8)
    (name, v0, _), = drift.run(model)
    assert name == "drift" and v0["kl"] == pytest.approx(0.0, abs=1e-6) and v0["top1_agreement"] == 1.0
    assert v0["prompts"] == 8 and tuple(drift.baseline.shape) == (8, tok.vocab_size)
    train_steps(model, tok, "reading", 15, seed=5)
    (_, v1, _), = drift.run(model)
    (_, again, _), = drift.run(model)
    assert v1["kl"] > 1e-3 and v1["kl"] <= v1["kl_max"]
    assert again == v1  # the measurement itself is deterministic
    assert drift.baseline.shape == (8, tok.vocab_size)  # kept from the first run, not replaced


def test_judge_counts_only_verdicts_that_agree_in_both_orders() -> None:
    def longer(q: str, a: str, b: str) -> str:
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"

    def first_always(q: str, a: str, b: str) -> str:
        return "A"  # pure position bias

    calls = []

    def broken(q: str, a: str, b: str) -> str:
        calls.append(q)
        raise ConnectionError("judge API down")

    qs, cur, base = ["q1", "q2", "q3", "q4"], ["long answer", "x", "same", None], ["short", "longer one", "same", "b"]
    v, items = PairwiseJudge(longer).score(qs, cur, base)
    assert items[:3] == [1.0, 0.0, 0.5] and math.isnan(items[3])
    assert v["judge_win_rate"] == pytest.approx(1 / 3) and v["judge_loss_rate"] == pytest.approx(1 / 3)
    assert v["judge_inconsistent_rate"] == 0.0
    v, items = PairwiseJudge(first_always).score(qs, cur, base)
    assert v["judge_win_rate"] == 0.0 and v["judge_loss_rate"] == 0.0
    assert v["judge_inconsistent_rate"] == pytest.approx(2 / 3)  # both differing items; identical answers need no call
    v, _ = PairwiseJudge(broken).score(qs, cur, base)
    assert v["judge_errors"] == 2.0 and len(calls) == 2
    with pytest.raises(TypeError, match="judge"):
        PairwiseJudge("not callable")  # type: ignore[arg-type]


def test_a_probe_with_a_judge_compares_against_the_baseline_answers(trained: tuple[Any, Any]) -> None:
    model, tok = trained
    seen: list[tuple[str, str]] = []

    def judge(q: str, a: str, b: str) -> str:
        seen.append((a, b))
        return "tie"

    probe = Probe("format", tok, n=6, judge=judge)
    recs = probe.run(model)
    assert recs[-1][0] == "format/judge" and recs[-1][1]["judge_tie_rate"] == 1.0  # the baseline against itself
    train_steps(model, tok, "reading", 20, seed=9)
    recs = probe.run(model)
    assert recs[-1][0] == "format/judge" and len(recs[-1][2]) == 6


def test_schedule_at_start_every_n_steps_and_the_share_cap() -> None:
    now = [0.0]
    s = Scheduled(every_steps=10, max_share=0.1, clock=lambda: now[0])
    assert s.due(0, start=True)
    s.ran(0, 0.0, 1.0)  # a 1 s probe: at 10 % it needs 9 s of training before the next
    assert not s.due(0, start=True)
    now[0] = 3.0
    assert [st for st in range(1, 10) if s.due(st)] == []
    assert not s.due(10) and s.postponed == 1  # due by steps, held back by the share cap
    now[0] = 10.5
    assert s.due(12)
    s = Scheduled(every_minutes=1.0, clock=lambda: now[0])
    now[0] = 100.0
    assert not s.due(1)
    now[0] = 161.0
    assert s.due(2)
    with pytest.raises(ValueError, match="every_steps"):
        Scheduled(every_steps=0)
    with pytest.raises(ValueError, match="max_share"):
        Scheduled(max_share=2.0)
    with pytest.raises(ValueError, match="every_minutes"):
        Scheduled(every_minutes=1.0, shard=True)
    assert Scheduled().every_steps == 500


def test_a_failing_probe_never_raises_into_training_and_is_counted(trained: tuple[Any, Any]) -> None:
    model, tok = trained

    class Broken:
        module = None

        def loglikelihood(self, *args: Any) -> list[float]:
            raise RuntimeError("out of memory")

        generate = next_token_logprobs = loglikelihood

    sink = Sink()
    ps = ProbeSet([Probe("arithmetic", n=4, adapter=Broken(), every_steps=2, max_share=None),
                   Probe("reading", tok, n=4, every_steps=2, max_share=None)], sink)
    assert ps.start(0, model)
    ps.after_step(2, model)
    errors = [v["errors"] for kind, s, v, kw in sink.logged if kw["suite"] == "arithmetic"]
    assert errors == [1.0, 2.0]
    assert [s for kind, s, v, kw in sink.logged if kw["suite"] == "reading"] == [0, 2]
    with pytest.raises(TypeError, match=r"probes\[1\]"):
        check_probes([Probe("reading", tok, n=2), "arithmetic"])


def test_probe_arguments_are_checked_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="budget_seconds"):
        Probe("arithmetic", budget_seconds=0)
    with pytest.raises(ValueError, match="min_drop"):
        Probe("arithmetic", min_drop=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        Probe("arithmetic", n=2).run(char_gpt())
    assert Probe("arithmetic", n=3, min_drop=0.1).name == "arithmetic"


def test_the_share_cap_holds_for_the_probes_together() -> None:
    """Two probes of 1 s each at 10 %: the next round needs 18 s of training, not 9 s each."""
    now = [0.0]

    class Timed(Scheduled):
        def __init__(self, name: str) -> None:
            super().__init__(every_steps=10, max_share=0.1, clock=lambda: now[0])
            self.name = name

        def run(self, model: Any, *args: Any, **kwargs: Any) -> list[Any]:
            now[0] += 1.0
            return [(self.name, {"x": 1.0}, None)]

    sink = Sink()
    ps = ProbeSet([Timed("a"), Timed("b")], sink)
    assert ps.start(0, object())
    now[0] = 2.0 + 10.0  # 10 s of training: enough for one probe's 9 s, not for the pair's 18 s
    assert not ps.after_step(10, object())
    now[0] = 2.0 + 18.5
    assert ps.after_step(11, object())
    assert [(s, kw["suite"]) for _, s, _, kw in sink.logged] == [(0, "a"), (0, "b"), (11, "a"), (11, "b")]

    # On different schedules, one probe's round holds the other back too.
    now[0] = 0.0
    a, b = Timed("a"), Timed("b")
    b.every_steps = 15
    sink = Sink()
    ps = ProbeSet([a, b], sink)
    ps.start(0, object())  # 2 s: both wait until 2 + 18
    now[0] = 21.0
    assert ps.after_step(10, object())  # a alone, 1 s: both wait until 22 + 9
    now[0] = 25.0
    assert not ps.after_step(15, object())
    now[0] = 31.5
    assert ps.after_step(16, object())
    assert [(s, kw["suite"]) for _, s, _, kw in sink.logged] == [(0, "a"), (0, "b"), (10, "a"), (16, "b")]


def test_stop_strings_end_generation_early_without_changing_the_answer(trained: tuple[Any, Any]) -> None:
    from probes.scoring import clean_output

    model, tok = trained
    suite = builtin("format", n=8)
    prompts = [suite.prompt(it) for it in suite.items]
    with probing(model):
        full = CausalLMAdapter(model, tok, batch_size=4).generate(prompts, 24)
        early = CausalLMAdapter(model, tok, batch_size=4).generate(prompts, 24, stop=suite.stop)
        loop = CausalLMAdapter(LogitsOnly(model), tok, batch_size=4, max_length=256).generate(prompts, 24,
                                                                                            stop=suite.stop)
    assert [clean_output(x, suite.stop) for x in early] == [clean_output(x, suite.stop) for x in full]
    assert [clean_output(x, suite.stop) for x in loop] == [clean_output(x, suite.stop) for x in full]
    assert sum(map(len, early)) < sum(map(len, full))  # it did stop early
