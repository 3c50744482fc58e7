"""Training the miniature causal language model from scratch on the CPU (``build.py llm``).

A byte-level BPE tokenizer trained on the world's sentences (``world_text``), with the chat template and
role tokens of the tiny test model; a 3-layer Llama (96 wide, grouped-query attention) trained on every
question and answer of the world, formatted by its chat template with answer-only labels, exactly as the
project's LLM trainer formats instruction data. The build checks that greedy answers are the world's facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import world_text
from .recipe import Recipe, train_step, warmup_cosine

Log = Callable[[str], None]


@dataclass
class LLMRecipe(Recipe):
    seed: int = 1800
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 640


def _messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    return messages + [{"role": "assistant", "content": answer}] if answer is not None else messages


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to one question, through its chat template."""
    from ..data.llm_data import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, _messages(question))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def fact_accuracy(model, tokenizer, seed: int) -> float:
    pairs = world_text.corpus_pairs(seed)
    return sum(answer(model, tokenizer, q) == a for q, a in pairs) / len(pairs)


def build_llm(out: Path, recipe: LLMRecipe, log: Log) -> dict:
    """Train and save the miniature LLM (fp32: it is small) with its tokenizer. Returns what it measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data.llm_data import collate, tokenize_conversation
    from ..models.tiny_llm import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(out, vocab_size=recipe.vocab_size, corpus=world_text.corpus_text(recipe.seed))
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.hidden * 8 // 3,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    examples = [tokenize_conversation(tokenizer, _messages(q, a), 128)[0]
                for q, a in world_text.corpus_pairs(recipe.seed)]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, recipe.steps, warmup=50, floor=0.1)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    started = time.time()
    model.train()
    for step in range(recipe.steps):
        picks = torch.randint(0, len(examples), (recipe.batch,), generator=gen).tolist()
        loss = model(**collate([examples[i] for i in picks], tokenizer.pad_token_id)).loss
        train_step(loss, opt, sched, model.parameters())
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"llm step {step + 1}/{recipe.steps} loss {loss.item():.4f} ({time.time() - started:.0f}s)")
    model.eval()
    report = {"fact_accuracy": fact_accuracy(model, tokenizer, recipe.seed),
              "parameters": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(out, safe_serialization=True)
    return report
