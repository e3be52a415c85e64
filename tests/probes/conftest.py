"""A tiny character-level GPT-2 really trained on the arithmetic task, shared by the runner tests."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch


def char_gpt(dropout: float = 0.1, seed: int = 0) -> Any:
    """build_char_gpt with dropout on, so that eval mode and the restored RNG matter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from monitor.demo import CharTokenizer

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=CharTokenizer().vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=256,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def train_steps(model: Any, tok: Any, task: str, steps: int, seed: int = 0, lr: float = 3e-3,
                batch: int = 16) -> list[float]:
    """`steps` AdamW steps on a builtin task's texts; the losses."""
    from monitor.demo import lm_batch, task_texts

    pairs = task_texts(task, 2000, seed=seed + 1)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = lm_batch(tok, pairs, rng, batch)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="session")
def _pretrained() -> tuple[Any, Any, list[float]]:
    from monitor.demo import CharTokenizer

    torch.set_num_threads(1)
    tok = CharTokenizer()
    model = char_gpt()
    losses = train_steps(model, tok, "arithmetic", 150)
    return model, tok, losses


@pytest.fixture
def trained(_pretrained: tuple[Any, Any, list[float]]) -> tuple[Any, Any]:
    """(model, tokenizer): a fresh copy of the pre-trained model (in train mode) for each test."""
    model, tok, losses = _pretrained
    assert losses[-1] < 0.6 * losses[0]  # it learned something: not random weights
    m = copy.deepcopy(model)
    m.train()
    return m, tok
