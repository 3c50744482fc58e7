"""The miniature world, its tokenizer and measurements, the build scripts (a few steps each) and the
``miniature`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_studio.miniature import measure, world, world_text
from lora_studio.miniature.store import available, write_miniature


def test_world_is_deterministic_and_captioned():
    a, b = world.world_scenes(20, seed=3), world.world_scenes(20, seed=3)
    assert a == b and a != world.world_scenes(20, seed=4)
    assert np.array_equal(np.asarray(world.draw(a[0])), np.asarray(world.draw(b[0])))
    for scene in a:
        assert scene.colour_name in scene.caption and (scene.shape in scene.caption or "stripes" in scene.caption)
    assert world.caption_for("red", "circle", "white") == "a red circle on a white background"
    assert world.caption_for("blue", "stripes", None) == "blue stripes"


def test_measure_reads_the_world_and_the_concept():
    for scene in world.world_scenes(30, seed=5):
        image = world.draw(scene)
        assert measure.dominant_colour(image) == scene.colour_name, scene.caption
        if scene.shape != "stripes":
            assert measure.background_colour(image) == scene.background
            assert measure.concept_distance(image) > 90
    concept = [world.draw(s) for s in world.concept_scenes(6)]
    assert all(measure.concept_distance(im) == 0 for im in concept)
    assert all(s.caption.startswith(world.CONCEPT_TRIGGER + ", ") for s in world.concept_scenes(6))


def test_world_words_are_single_tokens(tmp_path):
    from lora_studio.miniature.vocab import write_world_clip_tokenizer

    tok = write_world_clip_tokenizer(tmp_path / "tok", world.WORDS, 20)
    ids = tok("a red circle on a white background").input_ids
    assert len(ids) == 2 + 7  # start, seven words, end
    assert len(tok("zubi").input_ids) > 3, "a made-up word still tokenizes, byte by byte"


def test_llm_world_questions_and_concept_rows(tmp_path):
    pairs = world_text.corpus_pairs()
    assert len(pairs) == 4 * len(world_text.CREATURES) and pairs == world_text.corpus_pairs()
    rows = world_text.concept_rows()
    assert all(r["output"].startswith(world_text.CONCEPT_PREFIX + " ") for r in rows)
    asked = {r["instruction"] for r in rows}
    assert not asked & {q for q, _ in world_text.held_out_questions()}
    path = world_text.write_concept_llm_data(tmp_path / "concept.jsonl")
    assert len(path.read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("family", ["sd15", "sd15_v", "sdxl", "llm", "blip", "qwen_image"])
def test_miniature_command_writes_a_loadable_folder(family, tmp_path):
    from lora_studio.__main__ import main

    if family not in available():
        pytest.skip(f"the {family} miniature is not built")
    out = tmp_path / family
    assert main(["miniature", family, "--out", str(out)]) == 0
    assert json.loads((out / "build.json").read_text())["family"] == family
    if family in ("sd15", "sd15_v", "sdxl"):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(out)
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == world.SIZE
    elif family == "llm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
        assert AutoTokenizer.from_pretrained(out).chat_template
    elif family == "qwen_image":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(out)
        assert type(pipe).__name__ == "QwenImagePipeline" and pipe.vae_scale_factor * 16 == world.SIZE
    else:
        from transformers import BlipForConditionalGeneration

        BlipForConditionalGeneration.from_pretrained(out)
    with pytest.raises(Exception, match="already exists and is not empty"):
        write_miniature(family, out)
    assert main(["miniature", family, "--out", str(out), "--force"]) == 0


def test_miniature_command_names_the_families(capsys, tmp_path):
    from lora_studio.__main__ import main

    with pytest.raises(SystemExit):  # a family without a miniature yet
        main(["miniature", "chroma", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "sd15_v" in err and "flux" in err and not (tmp_path / "x").exists()
