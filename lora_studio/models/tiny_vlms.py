"""Tiny random-weight captioners of today's architectures, built offline: Florence-2, Qwen2.5-VL, Qwen3-VL,
a JoyCaption-style Llava, and a WD14-style ONNX tagger.

Each builder writes a folder that the real loading code reads the way it reads a downloaded checkpoint
(``config.json``, weights, tokenizer, image processor; ``model.onnx`` + ``selected_tags.csv`` for the
tagger), with a few thousand to a hundred thousand weights, so every captioner's code path runs in well
under a second on a CPU. Tokenizers are byte-level BPEs trained here with the ``tokenizers`` library on
printable ASCII only, so whatever the random weights generate decodes to readable characters; each
model's ``generation_config`` suppresses its special tokens for the first few tokens so a caption is never
empty. The captions are random words: these models test plumbing, not quality.

The ONNX tagger is not random: its tags respond to the image's mean colour in BGR order on the 0-255 scale
(``red theme`` for red pictures, ``blue theme`` for blue ones, the character ``demo character`` at 0.95 for green),
so a test can tell a wrong channel order or scale from the right one. Building it needs the ``onnx``
package (a test requirement); running it needs only ``onnxruntime``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

# Byte-level BPE characters of printable ASCII ("Ġ" is the space, "Ċ" the newline).
ASCII_ALPHABET = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
_CORPUS = [
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.", "You are a helpful assistant.",
    "You are a helpful image captioner.", "Write a long detailed description for this image.",
    "a red circle on a blue background", "a photo of a cat sitting on a chair", "a green square, soft light",
    "a woman in a yellow dress standing in a garden", "a painting of a house near a tree",
    "1girl, long hair, simple background, smile", "system user assistant",
]


def _bpe(specials: list[str], vocab_size: int = 320, corpus: list[str] | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` over printable ASCII with ``specials`` first (trained on
    ``corpus``, by default the captioners' sentences)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=ASCII_ALPHABET,
                                  limit_alphabet=len(ASCII_ALPHABET), show_progress=False)
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    return tok


def _vocab_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _never_empty(model, tokenizer, eos: list[int]) -> None:
    """The tiny model's own generation settings: no special token but EOS, and not EOS before 3 tokens."""
    specials = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    model.generation_config.suppress_tokens = sorted(i for i in specials if i is not None and i not in eos)
    model.generation_config.min_new_tokens = 3


def _ready(folder: Path, *names: str) -> bool:
    return all((folder / n).exists() for n in names)


def build_tiny_florence2(folder: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny ``Florence2ForConditionalGeneration`` + ``Florence2Processor`` (BART tokenizer, CLIP-style
    image processor with ``image_seq_length``, ``post_processor_config``) saved in ``folder``."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    folder = Path(folder)
    if _ready(folder, "config.json", "processor_config.json"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_merges(_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]))
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    side = image_size // 32  # DaViT downsamples 4 x 2 x 2 x 2; one more token is the mean of all
    image_processor = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                            crop_size={"height": image_size, "width": image_size},
                                            image_seq_length=side * side + 1)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 32, 32], num_heads=[1, 1, 2, 2],
                           num_groups=[1, 1, 2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0,
                           max_position_embeddings=max(side, 2) * 2, max_temporal_embeddings=4),
        text_config=dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    _never_empty(model, tokenizer, [2])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_merges(_bpe(QWEN_SPECIALS))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIALS[1:], model_max_length=4096)


def build_tiny_qwen_vl(folder: str | Path, version: str = "2.5", seed: int = 0) -> Path:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (``version="2.5"``) or ``Qwen3VLForConditionalGeneration``
    (``"3"``) with a Qwen tokenizer and a ``Qwen2VLImageProcessor`` config, saved in ``folder``."""
    import transformers

    folder = Path(folder)
    if _ready(folder, "config.json", "preprocessor_config.json"):
        return folder
    if version not in ("2.5", "3"):
        raise ValueError(f"Qwen-VL version '{version}' is not one of 2.5, 3.")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    patch = 14 if version == "2.5" else 16
    unit = patch * 2  # one image token per 2 x 2 patches
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=unit * unit * 4, max_pixels=unit * unit * 16, patch_size=patch, merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2.5":
        vision.update(window_size=56, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config)
    _never_empty(model, tokenizer, [ids["<|im_end|>"]])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<image>", "<|finetune_right_pad_id|>"]
# Llama 3's chat format; like JoyCaption's, it starts with the BOS and puts the image in the user message.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'user' and '<image>' not in message['content'] %}<image>{% endif %}"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_joycaption(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny JoyCaption-shaped ``LlavaForConditionalGeneration`` (SigLIP vision tower, Llama text model, a
    Llama-3-style tokenizer that adds a BOS itself, the chat template) + ``LlavaProcessor`` in ``folder``."""
    from tokenizers import processors
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessorPil,
    )

    folder = Path(folder)
    if _ready(folder, "config.json", "processor_config.json"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = _bpe(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>",
                                        extra_special_tokens={"image_token": "<image>"})
    patch = 8
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="full", chat_template=LLAMA3_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=0)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in LLAMA3_SPECIALS}
    eos = [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    config = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=ids["<|finetune_right_pad_id|>"]),
        image_token_index=ids["<image>"], vision_feature_select_strategy="full", vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _never_empty(model, tokenizer, eos)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# (name, category, weights on the mean (B, G, R) / 255, bias): category 9 rating, 0 general, 4 character.
WD14_TAGS = [
    ("general", 9, (0, 0, 0), 3.0), ("sensitive", 9, (0, 0, 0), -1.0), ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -4.0),
    ("red_theme", 0, (-6, -6, 8), -1.0), ("blue_theme", 0, (8, -6, -6), -1.0), ("no_humans", 0, (0, 0, 0), 2.0),
    ("simple_background", 0, (0, 0, 0), 1.0), ("white_background", 0, (3, 3, 3), -7.0), ("^_^", 0, (0, 0, 0), 0.5),
    ("long_hair", 0, (0, 0, 0), -4.0),
    ("demo_character", 4, (-6, 8, -6), -3.3), ("other_character", 4, (0, 0, 0), -5.0),
]


def build_tiny_wd14(folder: str | Path, image_size: int = 64) -> Path:
    """A WD14-style tagger: ``model.onnx`` (NHWC, BGR, 0-255 input of ``image_size`` px, sigmoid scores) and
    ``selected_tags.csv`` (tag_id, name, category, count). Needs the ``onnx`` package."""
    import numpy as np

    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # a test requirement, not a runtime one
        raise ImportError("Building the tiny ONNX tagger needs the 'onnx' package (pip install -r "
                          "requirements-dev.txt).") from exc
    folder = Path(folder)
    if _ready(folder, "model.onnx", "selected_tags.csv"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([w for _, _, w, _ in WD14_TAGS], dtype=np.float32).T  # (3, tags)
    bias = np.array([b for _, _, _, b in WD14_TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [numpy_helper.from_array(np.array([1 / 255.0], dtype=np.float32), "scale"),
             numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(WD14_TAGS)])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(WD14_TAGS):
            writer.writerow([1000 + i, name, category, 100 - i])
    return folder


def build_tiny_vlm_captioners(folder: str | Path, wd14: bool = True) -> dict[str, Path]:
    """All of the above under ``folder``, by captioner name (``qwen-vl`` is Qwen2.5-VL, ``qwen3-vl`` Qwen3-VL);
    ``wd14=False`` leaves out the ONNX tagger (it needs the ``onnx`` package to build)."""
    folder = Path(folder)
    models = {"florence2": build_tiny_florence2(folder / "tiny-florence2"),
              "qwen-vl": build_tiny_qwen_vl(folder / "tiny-qwen2.5-vl", "2.5"),
              "qwen3-vl": build_tiny_qwen_vl(folder / "tiny-qwen3-vl", "3"),
              "joycaption": build_tiny_joycaption(folder / "tiny-joycaption")}
    if wd14:
        models["wd14"] = build_tiny_wd14(folder / "tiny-wd14")
    return models
