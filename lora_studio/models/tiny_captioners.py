"""Tiny random-weight BLIP and CLIP models built offline, saved as folders ``from_pretrained`` loads.

They have the real architectures (``BlipForConditionalGeneration``, ``CLIPModel``) with a few hundred
thousand weights, so the captioning code paths (processor, tokenizer, generate, image/text features) run
in well under a second on a CPU. Their captions are random words: they test plumbing, not quality.
BLIP needs a BERT ``vocab.txt`` written here and ``text_config.bos_token_id`` set to the ``[DEC]`` token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_studio.models.tiny import write_clip_tokenizer

_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_BERT_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "painting", "photo", "drawing", "picture",
               "cat", "dog", "woman", "man", "house", "tree", "red", "blue", "green", "yellow", "circle",
               "square", "shape", "background", "light", "dark", "sitting", "standing", "close", "up"]


def _write_bert_vocab(folder: Path, words: list[str] | None = None) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = list(_BERT_SPECIAL) + [w for w in (words or _BERT_WORDS) if w not in _BERT_SPECIAL]
    vocab += [c for c in letters + "0123456789,.'-!?" if c not in vocab]
    vocab += ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def build_tiny_blip(folder: str | Path, seed: int = 0, image_size: int = 32, words: list[str] | None = None,
                    hidden: int = 32, patch_size: int = 8) -> Path:
    """A tiny BLIP captioning model + processor saved in ``folder`` (reused if already there).

    ``words`` (whole-word tokens of its vocabulary), ``hidden`` (the width) and ``patch_size`` are for the miniature
    captioner, which starts from this model and is then trained."""
    import transformers
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "vocab.txt").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_bert_vocab(folder, words)
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    dec, sep = vocab.index("[DEC]"), vocab.index("[SEP]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, encoder_hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, bos_token_id=dec, sep_token_id=sep, eos_token_id=sep,
                         pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    image_processor_cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    processor = BlipProcessor(image_processor=image_processor_cls(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIP model (text + vision towers) + tokenizer + image processor saved in ``folder``."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "vocab.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    n = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=n - 2,
                         eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_cls(size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder
