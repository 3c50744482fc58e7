"""A tiny Llama-style causal language model and its tokenizer, built offline (tests, ``--demo``, ``doctor``).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a small built-in text, wrapped
in ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``, role markers and a chat template, so every
path a real model takes (chat template, answer-only labels, PEFT adapter save and reload, merge, generate)
runs on it in seconds on a CPU. ``make_demo_llm_data`` writes a small instruction dataset to train on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"] + ROLE_TOKENS

DEMO_PAIRS = [
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("Say hello like a pirate.", "Ahoy there, matey!"),
    ("What is two plus two?", "Two plus two is four."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What do bees make?", "Bees make honey."),
    ("Give me a word for happy.", "Cheerful is a word for happy."),
]


def _corpus() -> list[str]:
    lines = [f"{q} {a}" for q, a in DEMO_PAIRS]
    lines += ["### Instruction:", "### Input:", "### Response:", "System: User: Assistant:",
              "the quick brown fox jumps over the lazy dog", "Hello world, this is a tiny model."]
    return lines * 4


def build_tiny_tokenizer(folder: str | Path | None = None, vocab_size: int = 384, chat_template: bool = True,
                         corpus: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` (default: a small built-in text),
    saved to ``folder`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or _corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=ROLE_TOKENS, model_max_length=2048)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def build_tiny_llm(folder: str | Path, seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, chat_template: bool = True, init_range: float = 0.2,
                   vocab_size: int | None = None) -> Path:
    """A tiny random-weight ``LlamaForCausalLM`` with its tokenizer, saved as a transformers folder.

    ``vocab_size`` pads the model's vocabulary beyond the tokenizer's (real models have 32k-150k entries,
    which makes the logits a big part of training memory; the benchmark uses that).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder, chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=init_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_demo_llm_data(path: str | Path, repeats: int = 2) -> Path:
    """An Alpaca-style JSONL file (instruction / input / output) built from ``DEMO_PAIRS``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "input": "", "output": a} for q, a in DEMO_PAIRS] * repeats
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
