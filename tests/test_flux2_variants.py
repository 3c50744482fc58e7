"""FLUX.2's three models (klein 4B, klein 9B, dev 32B) told apart: from a folder, a single file's blocks and a hub
id's name; each gets its own memory figures and presets, the Training tab and the out-of-memory advice pick the
base model's presets, and dev's Mistral encodes the captions on the CPU when it does not fit the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_studio.config import TrainConfig
from test_flux2 import klein_config, tiny_dev, tiny_klein  # noqa: F401  (fixtures)

DEV_ID, NINE_ID, FOUR_ID = ("black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-base-9B",
                            "black-forest-labs/FLUX.2-klein-base-4B")


def _single_file(path: Path, double: int, single: int, names=("double_blocks", "single_blocks")) -> Path:
    tensors = {f"{names[0]}.{i}.img_attn.qkv.weight": torch.zeros(1) for i in range(double)}
    tensors.update({f"{names[1]}.{i}.linear1.weight": torch.zeros(1) for i in range(single)})
    save_file(tensors, str(path))
    return path


def test_the_variant_is_told_from_a_folder_a_single_file_and_a_hub_id(tiny_dev, tiny_klein, tmp_path):  # noqa: F811
    from lora_studio.families import get_family

    variant = get_family("flux2").variant_of
    assert variant(str(tiny_dev)) == "dev"  # Flux2Pipeline in its model_index.json
    assert variant(str(tiny_klein)) == ""  # klein 4B: the family's first
    assert variant(str(_single_file(tmp_path / "dev.safetensors", 8, 48))) == "dev"
    assert variant(str(_single_file(tmp_path / "k9.safetensors", 8, 24))) == "klein9b"
    assert variant(str(_single_file(tmp_path / "k4.safetensors", 5, 20))) == ""
    diffusers_names = ("transformer_blocks", "single_transformer_blocks")
    assert variant(str(_single_file(tmp_path / "dev2.safetensors", 8, 48, diffusers_names))) == "dev"
    assert [variant(i) for i in (DEV_ID, NINE_ID, FOUR_ID, "someone/flux2-dev-finetune")] == ["dev", "klein9b", "", "dev"]
    assert get_family("flux").variant_of(DEV_ID) == ""  # a family without variants


def _config(base: str, preset) -> TrainConfig:
    return TrainConfig(base_model=base, model_family="flux2").replace(**preset.values)


def test_each_flux2_model_gets_its_figures_and_presets_that_fit_their_budget():
    from lora_studio.presets import list_presets, next_smaller_preset, recommend_preset
    from lora_studio.training.memory import estimate_breakdown

    presets = list_presets("flux2")
    assert [p.name for p in presets] == [
        "flux2_12gb", "flux2_16gb", "flux2_24gb", "flux2_dev_12gb", "flux2_dev_16gb", "flux2_dev_24gb",
        "flux2_klein9b_12gb", "flux2_klein9b_16gb", "flux2_klein9b_24gb"]
    base = {"": FOUR_ID, "dev": DEV_ID, "klein9b": NINE_ID}
    for preset in presets:
        assert estimate_breakdown(_config(base[preset.variant], preset), "flux2").total_gb <= 0.9 * preset.vram_gb
    # why the bigger models need their own: the klein 4B preset's settings do not fit them
    klein24 = presets[2]
    assert estimate_breakdown(_config(NINE_ID, klein24), "flux2").total_gb > 24
    assert estimate_breakdown(_config(DEV_ID, klein24), "flux2").total_gb > 60  # 32B in bf16 alone is 64 GB
    dev24 = estimate_breakdown(_config(DEV_ID, presets[5]), "flux2")
    assert dev24.parts["transformer weights"] < 12.5 and dev24.parts["activations"] == pytest.approx(6.39, abs=0.01)
    assert recommend_preset(23.6, "flux2", "dev").name == "flux2_dev_24gb"
    assert recommend_preset(16.0, "flux2", "klein9b").name == "flux2_klein9b_16gb"
    assert recommend_preset(23.6, "flux2").name == "flux2_24gb"
    assert next_smaller_preset("flux2_dev_16gb").name == "flux2_dev_12gb"
    assert next_smaller_preset("flux2_dev_12gb") is None  # not klein's 24 GB preset


def test_the_training_tab_and_the_advice_pick_the_base_models_presets(tiny_dev):  # noqa: F811
    from lora_studio.training.loop import out_of_memory_advice
    from lora_studio.training.memory import check_fits, size_note
    from lora_studio.ui.train_family import family_choices

    choices = family_choices(str(tiny_dev), "auto", 24.0)
    assert choices.preset == "flux2_dev_24gb" and "Model family: **FLUX.2 dev** (`flux2`)" in choices.text
    cfg = TrainConfig(base_model=DEV_ID, model_family="flux2", resolution=1024, batch_size=1)
    assert "Pick the preset 'flux2_dev_24gb'" in check_fits(cfg, "flux2", 23.6)
    swapping = cfg.replace(base_quantization="fp8", gradient_checkpointing=True, blocks_to_swap=42)
    assert "Try the preset 'flux2_dev_16gb'" in out_of_memory_advice(swapping, "flux2")
    note = size_note(TrainConfig(base_model=str(tiny_dev)), "flux2")
    assert note and "32,223 M: the estimate is for a full-size model" in note


def test_dev_encodes_the_captions_on_the_cpu_when_mistral_does_not_fit_the_gpu(tiny_dev, demo_images, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """Mistral Small 3.1 is 47 GB in bf16: with too little free GPU memory the captions are encoded on the CPU
    (decided once and said), and the cached conditioning is the same as the CPU run's."""
    from types import SimpleNamespace

    from diffusers import Flux2Pipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.flux2 import Flux2Trainer
    from lora_studio.training.run_folder import RunFolder

    cfg = klein_config(tiny_dev, demo_images, tmp_path / "out")
    trainer = Flux2Trainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.pipe = Flux2Pipeline.from_pretrained(tiny_dev, transformer=None)
    trainer.accelerator = SimpleNamespace(device=torch.device("cuda"))  # a GPU that is full
    said = []
    trainer.say = lambda text, level="info": said.append(text)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**3, 10**12))
    out = trainer.encode_text(["a red circle"])  # would fail on the (absent) GPU
    assert out["prompt_embeds"].device.type == "cpu" and trainer.text_device().type == "cpu"
    assert len([s for s in said if "encoded on the CPU" in s]) == 1
    reference = trainer.pipe.encode_prompt(prompt=["a red circle"], device=torch.device("cpu"),
                                           max_sequence_length=trainer.sequence_length())[0]
    assert torch.equal(out["prompt_embeds"], reference)
