"""Tiny, offline training fixtures: a byte-level BPE tokenizer trained in code, a 2-layer GPT-2, a text dataset."""

from __future__ import annotations

import functools
import os
import random
from typing import Any

# Nothing here may reach the network; set before transformers is imported anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORDS = (
    "the a one two three four five six seven eight nine ten model train loss step gradient norm rank node "
    "learning rate warm up decay batch token sample epoch layer head weight bias optimizer clip scale "
    "river mountain cloud stone bird tree light shadow morning evening quiet bright slow fast small large "
    "runs falls rises turns stays moves grows holds keeps finds makes takes gives sees knows says"
).split()


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic lines of pseudo-English text: enough structure for a language model to learn something."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(6, 18)
        # Bigram-ish structure (each word biased towards its successor in the list) so the loss can fall.
        i = rng.randrange(len(_WORDS))
        words = []
        for _ in range(k):
            words.append(_WORDS[i])
            i = (i + 1) % len(_WORDS) if rng.random() < 0.6 else rng.randrange(len(_WORDS))
        lines.append(" ".join(words) + ".")
    return lines


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(tiny_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    return tok._tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained in code (no download); eos = pad = `<|endoftext|>`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)))
    tok.eos_token = "<|endoftext|>"
    tok.bos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def tiny_gpt2(vocab_size: int = 512, n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
              n_positions: int = 128, seed: int | None = 0, dropout: float = 0.0) -> Any:
    """A freshly initialised `GPT2LMHeadModel` small enough for a CPU test (about 140k parameters).

    Dropout is off by default so that two runs with the same seed give the same numbers whatever
    else consumed the global random generator in between.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


class TinyTextDataset:
    """Fixed-length causal-LM examples (`input_ids`, `attention_mask`, `labels`) cut from the tiny corpus."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def tiny_text_dataset(tokenizer: Any, n: int, seq_len: int, seed: int = 0) -> TinyTextDataset:
    """`n` examples of `seq_len` tokens each, a Trainer-ready map-style dataset of tensors."""
    import torch

    ids: list[int] = []
    lines = tiny_corpus(n_lines=max(400, n * seq_len // 8), seed=seed)
    for line in lines:
        ids.extend(tokenizer.encode(line + " "))
        if len(ids) >= n * seq_len:
            break
    while len(ids) < n * seq_len:  # short corpus for a big request: wrap around
        ids.extend(ids[: n * seq_len - len(ids)])
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in t]
    return TinyTextDataset(examples)
