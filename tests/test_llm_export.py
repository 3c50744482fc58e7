"""LLM export and testing: the PEFT adapter folder reloads exactly, the merged model, answers at strengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_studio.errors import TrainingError


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


def lora_model(base: Path, **kw):
    """The tiny model with a random (non-zero) LoRA, as if trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)
    return get_peft_model(model, config)


def batch(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    from lora_studio.models.llm import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    enc = tok(["<s><|user|>\nWhat do bees make?</s>\n<|assistant|>\n", "Hello world"], padding=True,
              add_special_tokens=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_adapter_folder_reloads_to_identical_logits_from_disk(tiny_llm, tmp_path):
    from safetensors import safe_open

    from lora_studio.export.peft_llm import load_adapter_model, logits_of, save_adapter

    model = lora_model(tiny_llm)
    folder = save_adapter(model, tmp_path / "adapter", base_model=str(tiny_llm), info={"steps": 3})
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors", "training_info.json"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8 and config["r"] == 4 and config["peft_type"] == "LORA"
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("modules_to_save")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        keys = sorted(fh.keys())
    # the key layout llama.cpp's convert_lora_to_gguf.py and Ollama read
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)

    b = batch(tiny_llm)
    expected = logits_of(model, b)
    reloaded = load_adapter_model(tiny_llm, folder)
    assert torch.equal(logits_of(reloaded, b), expected)
    assert not list(tmp_path.glob(".adapter*"))  # no temporary folders left behind


def test_reload_check_reports_identical_and_catches_a_wrong_file(tiny_llm, tmp_path):
    from lora_studio.export.peft_llm import reload_and_compare, save_adapter

    b = batch(tiny_llm)
    model = lora_model(tiny_llm)
    folder = save_adapter(model, tmp_path / "ok")
    reloaded, report = reload_and_compare(model, folder, b)
    assert report.identical and report.lora_effect > 0 and "identical logits" in str(report)

    other = lora_model(tiny_llm)
    save_adapter(other, tmp_path / "stale")
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # trained further after the file was written
    with pytest.raises(TrainingError, match="Export check failed"):
        reload_and_compare(other, tmp_path / "stale", b)


def test_adapters_the_tools_cannot_load_are_refused(tiny_llm, tmp_path):
    from lora_studio.export.peft_llm import adapter_problems, save_adapter

    model = lora_model(tiny_llm, modules_to_save=["lm_head"])
    with pytest.raises(TrainingError, match="saves whole modules"):
        save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert adapter_problems({"peft_type": "LORA", "rank_pattern": {"q_proj": 8}})


def test_merged_model_matches_the_adapter(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_studio.models.llm import load_tokenizer
    from lora_studio.export.peft_llm import logits_of, save_adapter, save_merged_model

    model = lora_model(tiny_llm)
    folder = save_adapter(model, tmp_path / "adapter")
    merged_dir = save_merged_model(tiny_llm, folder, tmp_path / "merged", tokenizer=load_tokenizer(str(tiny_llm)))
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    b = batch(tiny_llm)
    assert torch.allclose(logits_of(merged, b), logits_of(model, b), atol=1e-4)


@pytest.fixture(scope="module")
def tester(tiny_llm, tmp_path_factory):
    from lora_studio.export.peft_llm import save_adapter
    from lora_studio.inference.llm_compare import LLMTester

    folder = save_adapter(lora_model(tiny_llm), tmp_path_factory.mktemp("adapters") / "final")
    return LLMTester(str(tiny_llm), folder, device="cpu")


def test_strength_zero_is_the_base_model_and_answers_keep_order(tiny_llm, tester):
    from transformers import AutoModelForCausalLM

    from lora_studio.data.llm_data import prompt_ids

    answers = tester.compare("What do bees make?", strengths=(0, 0.5, 1.0), max_new_tokens=8)
    assert [a.strength for a in answers] == [0.0, 0.5, 1.0]
    assert all(a.new_tokens > 0 for a in answers)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm))
    ids = torch.tensor([prompt_ids(tester.tokenizer, [{"role": "user", "content": "What do bees make?"}])])
    out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                        pad_token_id=tester.tokenizer.pad_token_id, eos_token_id=tester.tokenizer.eos_token_id)
    assert answers[0].text == tester.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answers[2].text != answers[0].text  # the LoRA changes the answer


def test_strength_scales_the_lora_and_resets(tester):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        full = tester.model(input_ids=ids).logits
        tester._set_strength(0.5)
        half = tester.model(input_ids=ids).logits
        tester._set_strength(1.0)
        with tester.model.disable_adapter():
            base = tester.model(input_ids=ids).logits
    assert not torch.allclose(half, full) and not torch.allclose(half, base)
    tester.generate(msgs, strength=2.0, max_new_tokens=2)
    with torch.no_grad():
        assert torch.equal(tester.model(input_ids=ids).logits, full)  # strength is back to 1 afterwards


def test_seeded_sampling_repeats_and_chat_keeps_history(tester):
    a = tester.compare("Hello", strengths=(0, 1), temperature=1.0, seed=5, max_new_tokens=6)
    b = tester.compare("Hello", strengths=(0, 1), temperature=1.0, seed=5, max_new_tokens=6)
    assert [x.text for x in a] == [x.text for x in b]
    reply, history = tester.chat([], "Hello", max_new_tokens=4)
    reply2, history2 = tester.chat(history, "And then?", max_new_tokens=4)
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"]
    assert history2[1]["content"] == reply and history2[3]["content"] == reply2


def test_compare_checkpoints_of_a_run(tiny_llm, tmp_path):
    from lora_studio.export.peft_llm import save_adapter
    from lora_studio.inference.llm_compare import get_tester, list_adapters

    run = tmp_path / "run"
    save_adapter(lora_model(tiny_llm), run / "my_lora")
    torch.manual_seed(1)
    save_adapter(lora_model(tiny_llm, lora_dropout=0.0), run / "checkpoints" / "step_000002" / "my_lora-step000002")
    adapters = list_adapters(run)
    assert [label for label, _ in adapters] == ["my_lora", "step_000002"]
    tester = get_tester(str(tiny_llm), adapters[0][1], device="cpu")
    answers = tester.compare_adapters("Hello", adapters, max_new_tokens=4)
    assert [a.label for a in answers] == ["my_lora", "step_000002"]
    assert get_tester(str(tiny_llm), adapters[1][1], device="cpu") is tester  # cached, adapter swapped
