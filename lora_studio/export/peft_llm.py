"""LLM LoRA files: a PEFT adapter folder, the check that it reloads exactly, and an optional merged model.

The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is what PEFT, llama.cpp's
``convert_lora_to_gguf.py`` and Ollama's ``ADAPTER`` line take. Those tools want one global ``lora_alpha``
(no ``rank_pattern``/``alpha_pattern``), no ``modules_to_save`` and no resized vocabulary, so
``save_adapter`` refuses a config that has them. Folders are written next to their final place and renamed
over it, so a crash never leaves half an adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..errors import ModelLoadError, TrainingError
from ..fileio import atomic_write_json
from ..models.load_lock import model_loading

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_problems(config: dict[str, Any]) -> list[str]:
    """Why an adapter config would not load in llama.cpp / Ollama (empty when it is fine)."""
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("modules_to_save"):
        problems.append(f"it saves whole modules ({', '.join(config['modules_to_save'])})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("it has per-layer ranks or alphas (rank_pattern/alpha_pattern)")
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter")
    return problems


def is_adapter_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and any(p.glob("adapter_model.*"))


def _swap_in(tmp: Path, final: Path) -> Path:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def save_adapter(model, folder: str | Path, *, base_model: str | None = None,
                 info: dict[str, Any] | None = None) -> Path:
    """Save a ``PeftModel``'s adapter into ``folder`` (PEFT layout, safetensors). Returns ``folder``.

    ``base_model`` is written as ``base_model_name_or_path`` (llama.cpp uses it when ``--base`` is not given);
    ``info`` (steps, data size ...) goes into ``training_info.json`` beside the adapter.
    """
    final = Path(folder)
    tmp = _fresh_tmp(final)
    model.save_pretrained(str(tmp), safe_serialization=True)
    config = json.loads((tmp / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problems = adapter_problems(config)
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError("The adapter cannot be exported for llama.cpp/Ollama: " + "; ".join(problems) + ".")
    if base_model:
        config["base_model_name_or_path"] = base_model
    atomic_write_json(tmp / ADAPTER_CONFIG, config)
    if info:
        atomic_write_json(tmp / "training_info.json", info)
    return _swap_in(tmp, final)


# --- the reload check ----------------------------------------------------------------------------------
@dataclass
class ReloadReport:
    max_diff: float  # reloaded vs trained logits
    lora_effect: float  # trained vs base logits: how much the LoRA changes the output
    tokens: int

    @property
    def identical(self) -> bool:
        return self.max_diff == 0.0

    def __str__(self) -> str:
        same = "identical logits" if self.identical else f"logits within {self.max_diff:.2e}"
        return (f"PeftModel.from_pretrained reloads the adapter to {same} on {self.tokens} tokens "
                f"(the LoRA moves the logits by up to {self.lora_effect:.3g} from the base model).")


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor], autocast: Callable[[], ContextManager] | None = None
              ) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    with (autocast() if autocast else nullcontext()):
        out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    return out.logits.float().cpu()


def reload_and_compare(model, adapter_dir: str | Path, batch: dict[str, torch.Tensor], *,
                       autocast: Callable[[], ContextManager] | None = None, tolerance: float | None = None):
    """Check the written adapter: unload the LoRA from ``model``'s base, reload it with
    ``PeftModel.from_pretrained`` from ``adapter_dir``, and compare logits with the trained model's.

    Reusing the in-memory base (instead of a second copy) keeps the check affordable for big and 4-bit
    models. Returns ``(reloaded PeftModel, ReloadReport)``; raises ``TrainingError`` on a mismatch.
    """
    from peft import PeftModel

    expected = logits_of(model, batch, autocast)
    with model.disable_adapter():
        base = logits_of(model, batch, autocast)
    base_model = model.unload()
    with model_loading(str(adapter_dir)):
        reloaded = PeftModel.from_pretrained(base_model, str(adapter_dir))
    got = logits_of(reloaded, batch, autocast)
    report = ReloadReport(max_diff=float((got - expected).abs().max()),
                          lora_effect=float((expected - base).abs().max()), tokens=int(batch["attention_mask"].sum()))
    if tolerance is None:  # fp32 weights: bit-identical; half-precision kernels may round differently
        tolerance = 0.0 if _param_dtype(reloaded) == torch.float32 else 1e-2
    limit = tolerance * max(1.0, float(expected.abs().max()))
    if report.max_diff > limit:
        raise TrainingError(f"Export check failed: the adapter written to {adapter_dir} reloads to different "
                            f"logits (max difference {report.max_diff:.3g}, allowed {limit:.3g}). The files are "
                            "kept; please report this with the run's log.")
    return reloaded, report


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def load_adapter_model(base_model: str | Path, adapter_dir: str | Path, *, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = None, adapter_name: str = "default"):
    """A fresh base model from disk (or the hub) with the adapter from ``adapter_dir`` (for tests and tools)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not is_adapter_folder(adapter_dir):
        raise ModelLoadError(f"'{adapter_dir}' is not a PEFT adapter folder (adapter_config.json + "
                             "adapter_model.safetensors).")
    with model_loading(str(base_model)):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype or torch.float32)
        except Exception as exc:
            raise ModelLoadError(f"Could not load the base model '{base_model}': "
                                 f"{str(exc).splitlines()[0]}.") from None
        if device is not None:
            model.to(device)
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)


def save_merged_model(base_model: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, tokenizer=None,
                      dtype: torch.dtype | str = "auto") -> Path:
    """Base + LoRA merged into one full transformers model folder (loads without PEFT, converts to GGUF).

    The base is loaded on the CPU in its own precision (``dtype="auto"``), never 4-bit: merging into
    quantized weights would lose precision. Needs about the model's size in RAM.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = Path(out_dir)
    with model_loading(str(base_model)):
        try:
            base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"Could not load the base model '{base_model}' to merge: "
                                 f"{str(exc).splitlines()[0]}.") from None
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = _fresh_tmp(final)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    return _swap_in(tmp, final)
