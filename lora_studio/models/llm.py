"""Load a causal language model and its tokenizer (training, the Testing tab's answers), and list its layers.

    model = load_causal_lm("meta-llama/Llama-3.1-8B", dtype=torch.bfloat16, device="cuda", load_in_4bit=True)
    tokenizer = load_tokenizer("meta-llama/Llama-3.1-8B")       # with a pad token
    linear_module_names("meta-llama/Llama-3.1-8B")              # ["q_proj", "k_proj", ...]: what a LoRA can target
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError
from .download import download_progress
from .load_lock import model_loading


def linear_module_names(model_or_path: Any) -> list[str]:
    """The distinct names of the Linear layers a LoRA can target (``q_proj``, ``v_proj``, ... no ``lm_head``).

    Takes a loaded model, or a model folder / hub id (then the model is built on the meta device: no weights
    are read, so it is instant even for big models).
    """
    model = meta_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    names: dict[str, None] = {}
    for full_name in linear_paths(model):
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf not in ("lm_head", "embed_out", "output", "score"):
            names[leaf] = None
    return list(names)


def linear_paths(model) -> list[str]:
    """Full names of the model's own Linear (and GPT-2 Conv1D) layers, LoRA layers left out."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and ".lora_" not in name]


def meta_model(base_model: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"Could not read the model '{base_model}': {str(exc).splitlines()[0]}.") from None


def load_causal_lm(base_model: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                   load_in_4bit: bool = False, report: Callable[[str], None] | None = None):
    """Load a transformers causal LM (folder or hub id); 4-bit NF4 with ``load_in_4bit`` (CUDA only).

    ``report`` hears how a hub download of the model is going (``models.download``)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    try:
        with model_loading(base_model), download_progress(base_model, report):
            model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the language model '{base_model}': {str(exc).splitlines()[0]}. "
                             "Check that it is a complete transformers model folder or hub id.") from None
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    if load_in_4bit and "device_map" not in kwargs:
        keep_4bit_weights_unpacked(model)
    return model


def keep_4bit_weights_unpacked(model) -> None:
    """4-bit on the CPU (``LORA_STUDIO_CPU_CHECK``): bitsandbytes repacks a 4-bit layer's weights for fast CPU
    inference at its first no-grad forward, and a LoRA on a repacked layer gets no gradient afterwards (the
    run would train nothing). The trainer's own no-grad probes (``answer_logits_mode``) come first, so the
    repacking is switched off for training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(base_model: str):
    """The base model's tokenizer, with a pad token (the EOS token) when it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base_model)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the tokenizer of '{base_model}': {str(exc).splitlines()[0]}.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
