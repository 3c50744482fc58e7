"""Test an LLM LoRA: the same prompt answered side by side at several strengths, and a simple chat.

    tester = LLMTester("path/to/base", "runs/my_lora-.../my_lora")
    for a in tester.compare("Who are you?", strengths=(0, 0.5, 1.0)):   # 0 is the base model, exactly
        print(a.strength, a.text)
    reply, history = tester.chat([], "Hello!", strength=1.0)

Every answer of a comparison starts from the same seed: greedy decoding (``temperature=0``) is
deterministic, and seeded sampling draws the same random numbers at each strength, so differences come
from the LoRA alone. Strength scales the LoRA (PEFT's ``set_scale``); strength 0 turns the adapter off.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.llm_data import prompt_ids
from ..models.llm import load_causal_lm, load_tokenizer
from ..errors import ModelLoadError
from ..models.load_lock import model_loading

log = logging.getLogger(__name__)

ADAPTER = "lora"


@dataclass
class Answer:
    strength: float
    text: str
    new_tokens: int
    seconds: float
    label: str = ""  # adapter name when comparing checkpoints


def list_adapters(run_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, folder) of the adapters in a run: the final one first, then checkpoints newest first."""
    from ..export.peft_llm import is_adapter_folder

    root = Path(run_dir)
    if not root.is_dir():
        return []
    final = [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and is_adapter_folder(p)]
    ckpts = sorted((root / "checkpoints").glob("step_*/*"), reverse=True)
    return final + [(f"{p.parent.name}", p) for p in ckpts if is_adapter_folder(p)]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLMTester:
    """A base model with one LoRA adapter loaded, for comparisons and chat. Reuse it between calls."""

    def __init__(self, base_model: str, adapter_dir: str | Path, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, load_in_4bit: bool = False,
                 report: Callable[[str], None] | None = None):
        """``report`` hears how a hub download of the base model is going."""
        from peft import PeftModel

        from ..export.peft_llm import is_adapter_folder
        if not is_adapter_folder(adapter_dir):
            raise ModelLoadError(f"'{adapter_dir}' is not a PEFT adapter folder (adapter_config.json + "
                                 "adapter_model.safetensors).")
        self.device = torch.device(device) if device else _default_device()
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.base_model, self.adapter_dir, self.dtype = base_model, str(adapter_dir), dtype
        self.tokenizer = load_tokenizer(base_model)
        model = load_causal_lm(base_model, dtype=dtype, device=self.device,
                               load_in_4bit=load_in_4bit and self.device.type == "cuda", report=report)
        self.adapter_name, self._loads = ADAPTER, 0
        with model_loading(self.adapter_dir):
            self.model = PeftModel.from_pretrained(model, self.adapter_dir, adapter_name=ADAPTER)
        self.model.eval()

    # --- adapters --------------------------------------------------------------------------------
    def use_adapter(self, adapter_dir: str | Path) -> None:
        """Swap in another adapter (e.g. a checkpoint of the same run) on the same base model."""
        if str(adapter_dir) == self.adapter_dir:
            return
        self._loads += 1
        name, old = f"{ADAPTER}{self._loads}", self.adapter_name
        with model_loading(str(adapter_dir)):
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
        self.model.set_adapter(name)
        self.model.delete_adapter(old)
        self.adapter_name, self.adapter_dir = name, str(adapter_dir)

    def _set_strength(self, strength: float) -> None:
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(self.adapter_name, float(strength))

    # --- answering -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]], *, strength: float = 1.0, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Answer:
        """One answer to ``messages`` with the LoRA at ``strength`` (0: the base model, exactly)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        ids = torch.tensor([prompt_ids(tok, messages)], device=self.device)
        eos = {i for i in (tok.eos_token_id, *(_as_list(self.model.generation_config.eos_token_id))) if i is not None}
        sample = temperature > 0
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature if sample else None, top_p=top_p if sample else None,
                                  top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos) or None)
        torch.manual_seed(seed)
        started = time.perf_counter()
        context = self.model.disable_adapter() if strength == 0 else nullcontext()
        if strength != 0:
            self._set_strength(strength)
        try:
            with context:
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        finally:
            self._set_strength(1.0)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        return Answer(strength=float(strength), text=text, new_tokens=int(new.numel()),
                      seconds=round(time.perf_counter() - started, 3))

    def compare(self, prompt: str, strengths: Sequence[float] = (0.0, 0.5, 1.0), *, system: str | None = None,
                **generation) -> list[Answer]:
        """The same prompt (same seed) answered at each strength, in the order given."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return [self.generate(messages, strength=s, **generation) for s in strengths]

    def compare_adapters(self, prompt: str, adapters: Sequence[tuple[str, str | Path]], *, strength: float = 1.0,
                         **generation) -> list[Answer]:
        """The same prompt answered by several adapters (e.g. the checkpoints from ``list_adapters``)."""
        answers = []
        for label, folder in adapters:
            self.use_adapter(folder)
            answer = self.generate([{"role": "user", "content": prompt}], strength=strength, **generation)
            answer.label = label
            answers.append(answer)
        return answers

    def chat(self, history: list[dict[str, str]], message: str, *, strength: float = 1.0,
             **generation) -> tuple[str, list[dict[str, str]]]:
        """Answer ``message`` after ``history`` (role/content dicts) with the LoRA on; returns (reply, new history)."""
        messages = list(history) + [{"role": "user", "content": message}]
        reply = self.generate(messages, strength=strength, **generation).text
        return reply, messages + [{"role": "assistant", "content": reply}]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_cache: dict[tuple[str, str], LLMTester] = {}


def get_tester(base_model: str, adapter_dir: str | Path, **kwargs) -> LLMTester:
    """A cached ``LLMTester`` (one base model in memory at a time; the adapter is swapped when it changes)."""
    report = kwargs.pop("report", None)
    key = (str(base_model), str(kwargs.get("device") or ""))
    tester = _cache.get(key)
    if tester is None:
        _cache.clear()
        tester = _cache[key] = LLMTester(base_model, adapter_dir, report=report, **kwargs)
    else:
        tester.use_adapter(adapter_dir)
    return tester


def compare_answers(base_model: str, adapter_dir: str | Path, prompt: str,
                    strengths: Sequence[float] = (0.0, 0.5, 1.0), *, report: Callable[[str], None] | None = None,
                    **generation) -> list[Answer]:
    """Answers to ``prompt`` at each strength (0 = base), greedy unless ``temperature`` > 0 (then seeded).
    ``report`` hears how a first download of the base model is going."""
    return get_tester(base_model, adapter_dir, report=report).compare(prompt, strengths, **generation)
