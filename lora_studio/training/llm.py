"""The causal language model LoRA trainer (plugs into the shared loop in ``loop.py``).

In order: load the tokenizer and check/tokenize the data (``data.llm_data``: answer-only labels, preflight
report), load the model (bf16/fp16 weights on a GPU with mixed precision, 4-bit NF4 for QLoRA when
``load_in_4bit`` and CUDA allow it, fp32 on a CPU), add a PEFT LoRA on ``target_modules`` (default
``q_proj``, ``v_proj``) or continue an ``init_lora`` adapter folder, then each step: a length-grouped,
right-padded batch and the model's own next-token loss. Checkpoints hold a PEFT adapter folder; the final
export writes one, reloads it with ``PeftModel.from_pretrained`` and checks the logits, and can also write
a merged full model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data.llm_data import LLMPreflight, collate, epoch_batches, preflight_llm, prompt_ids
from ..errors import ConfigError, ModelLoadError
from ..models.llm import linear_module_names, linear_paths, load_causal_lm, load_tokenizer
from .events import EventBus, Progress
from .loop import Trainer
from .run_folder import RunFolder
from .runtime import cpu_check, enable_checkpointing, weight_dtype

VERIFY_TOKENS = 64
SAMPLE_NEW_TOKENS = 64


# --- checks -------------------------------------------------------------------------------------------
def check_targets(model, targets: list[str]) -> None:
    """ConfigError naming the missing target and the layers the model has, if a target matches nothing."""
    available = linear_module_names(model)
    full_names = linear_paths(model)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in full_names):
            raise ConfigError("target_modules", f"'{target}' matches no layer of this model; its Linear layers are: "
                              f"{', '.join(available)} (or all-linear).")


def use_4bit(config: TrainConfig, say=None) -> bool:
    """True when QLoRA can run: ``load_in_4bit`` set, a CUDA GPU, and a working bitsandbytes."""
    if not config.load_in_4bit:
        return False
    if not torch.cuda.is_available() and not cpu_check():
        reason = "load_in_4bit (QLoRA) needs a CUDA GPU"
    else:
        try:
            import bitsandbytes  # noqa: F401

            return True
        except Exception as exc:
            reason = f"load_in_4bit needs bitsandbytes, which could not be imported ({exc.__class__.__name__}: {exc})"
    if say:
        say(f"{reason}; loading the model unquantized instead (needs about 4x the memory for its weights).",
            "warning")
    return False


NO_EFFECT = 1e-3  # a trained LoRA that moves no logit by this much has learned (next to) nothing


# --- the loss --------------------------------------------------------------------------------------------
def answer_logits_mode(model) -> str:
    """How to compute logits only where a label is trained (saves the biggest activation: batch x length x vocab).

    "mask": ``logits_to_keep`` takes a boolean (batch, length) mask (transformers' ``slice_logits_to_keep``);
    "index": it takes 1-D positions; "labels": the model computes its own loss on every position.
    """
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "labels"
    device = next(model.parameters()).device
    ids = torch.zeros((2, 4), dtype=torch.long, device=device)
    mask = torch.tensor([[True, False, True, False], [False, False, True, False]], device=device)
    for mode, keep in (("mask", mask), ("index", torch.tensor([0, 2], device=device))):
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep).logits
        except Exception:
            continue
        if tuple(logits.shape[:-1]) == ((3,) if mode == "mask" else (2, 2)):
            return mode
    return "labels"


def causal_lm_loss(model, inputs: dict[str, torch.Tensor], mode: str = "labels") -> torch.Tensor:
    """Mean next-token cross-entropy over the trained labels; the same value as the model's own loss."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    if mode == "labels":
        return model(**inputs).loss.float()
    targets = labels[:, 1:]
    wanted = targets != -100  # position t predicts token t + 1
    feed = {k: v for k, v in inputs.items() if k != "labels"}
    if mode == "mask":
        keep = torch.cat([wanted, torch.zeros_like(wanted[:, :1])], dim=1)
        logits = model(**feed, logits_to_keep=keep).logits
        return F.cross_entropy(logits.float(), targets[wanted])
    positions = wanted.any(dim=0).nonzero().squeeze(1)
    logits = model(**feed, logits_to_keep=positions).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=-100)


# --- the trainer -----------------------------------------------------------------------------------------
class LLMTrainer(Trainer):
    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "llm"):
        super().__init__(config, run, bus, family)
        self.model = None
        self.tokenizer = None
        self.report: LLMPreflight | None = None
        self.quantized = False
        self.tokens_seen = 0
        self._last_tokens = (0, time.perf_counter())
        self.started_at = 0.0

    # --- setup -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, acc = self.config, self.accelerator
        self.started_at = time.time()
        self.tokenizer = load_tokenizer(cfg.base_model)
        self.bus.state("tokenizing")
        self.report = preflight_llm(cfg.train_data_dir, self.tokenizer, cfg.max_seq_length, progress=self._progress)
        for line in self.report.lines():
            self.say(line, "warning" if line.lstrip().startswith(("skipped", "warning")) else "info")
        self.bus.state("loading model")
        self.quantized = use_4bit(cfg, say=self.say)
        dtype = weight_dtype(acc)
        model = load_causal_lm(cfg.base_model, dtype=dtype, device=acc.device, load_in_4bit=self.quantized,
                               report=self.say)
        model.config.use_cache = False
        model.requires_grad_(False)
        # QLoRA too: peft's prepare_model_for_kbit_training is not used, it would upcast the embeddings and
        # lm_head to fp32 (about 4 GB more for a 128k-vocabulary 8B model); autocast handles the precision.
        if cfg.gradient_checkpointing:
            enable_checkpointing(model, use_reentrant=False)
        self.logits_mode = answer_logits_mode(model)
        from ..models.load_lock import model_loading

        with model_loading("the LoRA"):  # new LoRA layers must not be built while another thread loads
            self.model = self._add_lora(model)
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.lengths = [len(e.input_ids) for e in self.report.examples]
        self._last_tokens = (0, time.perf_counter())
        lora = self.model.peft_config["default"]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        weights = "4-bit NF4 (QLoRA)" if self.quantized else str(dtype).replace("torch.", "")
        targets = lora.target_modules
        targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
        self.say(f"Model: {cfg.base_model} (causal LM), weights {weights}, LoRA rank {lora.r} alpha "
                 f"{lora.lora_alpha:g} on {targets} ({trainable:,} trainable parameters), "
                 f"max_seq_length {cfg.max_seq_length}.")

    def _progress(self, done: int, total: int) -> None:
        self.bus.emit(Progress(stage="tokenizing", done=done, of=total))

    def _add_lora(self, model):
        from peft import LoraConfig, PeftModel, get_peft_model

        from ..export.peft_llm import ADAPTER_CONFIG, is_adapter_folder

        cfg = self.config
        if cfg.init_lora:
            if not is_adapter_folder(cfg.init_lora):
                raise ModelLoadError(f"init_lora '{cfg.init_lora}' is not a PEFT adapter folder: for a language "
                                     f"model it must hold {ADAPTER_CONFIG} and adapter_model.safetensors.")
            try:
                model = PeftModel.from_pretrained(model, cfg.init_lora, is_trainable=True)
            except Exception as exc:
                raise ModelLoadError(f"Could not load init_lora '{cfg.init_lora}' onto '{cfg.base_model}': "
                                     f"{str(exc).splitlines()[0]}. Was it trained on this base model?") from None
            lora = model.peft_config["default"]
            self.say(f"Continuing from the adapter {cfg.init_lora} (its rank {lora.r}, alpha {lora.lora_alpha:g} and "
                     "target modules are used; lora_rank/lora_alpha/target_modules in the config are ignored).")
            return model
        targets = cfg.targets_for("llm")
        if targets == ["all-linear"]:  # named explicitly, so the adapter config lists short names
            targets = linear_module_names(model)
        check_targets(model, targets)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=targets)
        return get_peft_model(model, lora)

    # --- the step --------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[list[int]]:
        acc = self.accelerator
        return epoch_batches(self.lengths, self.config.batch_size, self.config.seed, epoch,
                             acc.process_index, acc.num_processes)

    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.config.learning_rate}]

    def compute_loss(self, batch: list[int]) -> torch.Tensor:
        acc = self.accelerator
        model = self.prepared_models[0]
        inputs = collate([self.report.examples[i] for i in batch], self.tokenizer.pad_token_id)
        inputs = {k: v.to(acc.device) for k, v in inputs.items()}
        with acc.autocast():
            loss = causal_lm_loss(model, inputs, self.logits_mode)
        self.tokens_seen += int(inputs["attention_mask"].sum())
        return loss

    def export_extra_bytes(self) -> int:
        """With ``save_merged_model``, the merged full model: about 2 bytes per base weight (bf16/fp16; a 4-bit
        base counts its packed weights, so this is on the low side)."""
        if not self.config.save_merged_model:
            return 0
        return 2 * sum(p.numel() for p in self.model.parameters() if not p.requires_grad)

    def step_metrics(self) -> dict[str, float]:
        tokens, since = self._last_tokens
        now = time.perf_counter()
        rate = (self.tokens_seen - tokens) / max(now - since, 1e-9)
        self._last_tokens = (self.tokens_seen, now)
        return {"tokens_per_s": round(rate, 1)}

    # --- weights ---------------------------------------------------------------------------------
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self._unwrapped())

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self._unwrapped(), state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ModelLoadError(f"The checkpoint does not match this model and LoRA ({len(unexpected)} unexpected "
                                 "keys); resume with the same base_model, lora_rank and target_modules.")

    def _info(self, step: int, epoch: int) -> dict[str, Any]:
        cfg, report = self.config, self.report
        return {"trainer": "lora_studio", "base_model": cfg.base_model, "steps": step, "epoch": epoch,
                "rows": report.rows_read if report else 0, "sequences": len(report.examples) if report else 0,
                "max_seq_length": cfg.max_seq_length, "learning_rate": cfg.learning_rate,
                "qlora": self.quantized, "training_started_at": self.started_at}

    def save_lora(self, folder: Path, name: str, step: int, epoch: int) -> list[Path]:
        from ..export.peft_llm import save_adapter

        return [save_adapter(self._unwrapped(), folder / name, base_model=self.config.base_model,
                             info=self._info(step, epoch))]

    # --- export and checks -----------------------------------------------------------------------
    def export(self, step: int, epoch: int) -> list[Path]:
        from ..export.peft_llm import reload_and_compare, save_adapter, save_merged_model

        cfg = self.config
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        adapter = save_adapter(model, self.run.path / cfg.output_name, base_model=cfg.base_model,
                               info=self._info(step, epoch))
        files = [adapter]
        if cfg.verify_export:
            self.bus.state("verifying export")
            batch = collate([_head(e, VERIFY_TOKENS) for e in self.report.examples[:2]], self.tokenizer.pad_token_id)
            self.model, report = reload_and_compare(model, adapter, batch, autocast=self.accelerator.autocast)
            self.say(f"Export check passed: {report}")
            self.warn_if_little_effect(report.lora_effect, NO_EFFECT, "the model's logits")
        if getattr(cfg, "save_merged_model", False):
            self.bus.state("merging")
            merged = save_merged_model(cfg.base_model, adapter, self.run.path / f"{cfg.output_name}-merged",
                                       tokenizer=self.tokenizer)
            self.say(f"Merged model written to {merged}.")
            files.append(merged)
        self.write_card(step, files, num_images=len(self.report.examples))
        return files

    @torch.no_grad()
    def render_sample(self, step: int) -> Path | None:
        """Answer ``sample_prompt`` greedily and write it to ``samples/step_N.txt``."""
        model = self._unwrapped()
        was_training = model.training
        model.eval()
        ids = prompt_ids(self.tokenizer, [{"role": "user", "content": self.config.sample_prompt}])
        inputs = torch.tensor([ids], device=self.accelerator.device)
        model.config.use_cache = True
        try:
            with self.accelerator.autocast():
                out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                     max_new_tokens=SAMPLE_NEW_TOKENS, pad_token_id=self.tokenizer.pad_token_id)
        finally:
            model.config.use_cache = False
            model.train(was_training)
        text = self.tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True).strip()
        path = self.run.samples_dir / f"step_{step:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Prompt: {self.config.sample_prompt}\n\nAnswer at step {step}:\n{text}\n", encoding="utf-8")
        return path

    def cleanup(self) -> None:
        self.model = None
        self.prepared_models = []


def _head(example, n: int):
    from ..data.llm_data import Example

    return Example(example.input_ids[:n], example.labels[:n], example.where)
