"""Caption handling (dropout, tag shuffling with keep_tokens, tag dropout) has the rates it claims; masked loss
gives no gradient where the mask is black; masks are found (masks/ folder, alpha) and cached at the latent grid;
the held-out images are never trained on and their validation loss does not change between evaluations."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_studio.config import TrainConfig
from lora_studio.data.caption_aug import augment_caption

CAPTION = "mystyle, red dress, garden, smile, flowers"
N = 20000


def sigma(p: float, n: int = N) -> float:
    return (p * (1 - p) / n) ** 0.5


def test_caption_dropout_rate_is_what_it_claims():
    rng = random.Random(0)
    empty = sum(augment_caption(CAPTION, rng, dropout=0.1) == "" for _ in range(N))
    assert abs(empty / N - 0.1) < 4 * sigma(0.1)
    assert augment_caption(CAPTION, rng) == CAPTION  # nothing asked: unchanged


def test_tag_shuffling_keeps_the_first_tags_and_spreads_the_rest_evenly():
    rng = random.Random(1)
    first_after_trigger = Counter()
    for _ in range(N):
        tags = augment_caption(CAPTION, rng, shuffle=True, keep_tokens=1).split(", ")
        assert tags[0] == "mystyle" and sorted(tags[1:]) == sorted(CAPTION.split(", ")[1:])
        first_after_trigger[tags[1]] += 1
    assert set(first_after_trigger) == {"red dress", "garden", "smile", "flowers"}
    for count in first_after_trigger.values():  # each of the 4 tags comes second a quarter of the time
        assert abs(count / N - 0.25) < 4 * sigma(0.25)


def test_tag_dropout_rate_is_what_it_claims_and_spares_the_kept_tags():
    rng = random.Random(2)
    kept = Counter()
    for _ in range(N):
        tags = augment_caption(CAPTION, rng, tag_dropout=0.3, keep_tokens=2).split(", ")
        assert tags[:2] == ["mystyle", "red dress"]
        kept.update(tags[2:])
    for tag in ("garden", "smile", "flowers"):
        assert abs(kept[tag] / N - 0.7) < 4 * sigma(0.7)


def test_masked_out_pixels_give_zero_gradient():
    from lora_studio.training.masked_loss import per_sample_mse

    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0  # the left half is ignored
    per_sample_mse(pred, target, mask).sum().backward()
    assert torch.all(pred.grad[..., :4] == 0) and torch.all(pred.grad[..., 4:] != 0)
    plain = per_sample_mse(pred.detach(), target)
    torch.testing.assert_close(per_sample_mse(pred.detach(), target, torch.ones(2, 1, 8, 8)), plain)
    assert per_sample_mse(pred.detach(), target, torch.zeros(2, 1, 8, 8)).abs().sum() == 0


def test_masks_come_from_the_masks_folder_or_the_alpha_channel(tmp_path):
    from lora_studio.data.images import list_images
    from lora_studio.data.masks import ALPHA, bucket_mask, latent_mask, mask_source

    (tmp_path / "masks").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.jpg")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))  # the right half trains; half the size of its image: it is resized
    mask.save(tmp_path / "masks" / "a.png")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 64, 32))  # the top half is opaque
    rgba.save(tmp_path / "b.png")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "c.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.png"]  # masks/ is not training data
    assert mask_source(tmp_path / "a.jpg", tmp_path) == tmp_path / "masks" / "a.png"
    assert mask_source(tmp_path / "b.png", tmp_path) == ALPHA and mask_source(tmp_path / "c.png", tmp_path) is None
    right = latent_mask(bucket_mask(tmp_path / "a.jpg", tmp_path / "masks" / "a.png", (64, 64), (64, 64)), (8, 8))
    assert right.shape == (1, 8, 8) and right[..., :3].max() < 0.05 and right[..., 5:].min() > 0.95
    top = latent_mask(bucket_mask(tmp_path / "b.png", ALPHA, (64, 64), (64, 64)), (8, 8))
    assert top[:, :3].min() > 0.95 and top[:, 5:].max() < 0.05


def make_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=1e-3, batch_size=2, max_train_steps=2, save_steps=0, mixed_precision="no", seed=3)
    values.update(kw)
    return TrainConfig(**values).validate()


def prepared_trainer(cfg: TrainConfig):
    from lora_studio.training.diffusion import DiffusionTrainer
    from lora_studio.training.events import EventBus
    from lora_studio.training.run_folder import RunFolder

    trainer = DiffusionTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    trainer.prepared_models = trainer.models()
    return trainer


@pytest.mark.slow
def test_validation_images_are_held_out_and_scored_the_same_every_time(tiny_sd15, demo_images, tmp_path):
    cfg = make_config(tiny_sd15, demo_images, tmp_path / "out", validation_split=0.25, masked_loss=True,
                      caption_dropout_rate=0.5)
    (demo_images / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(demo_images / "masks" / "img_001.png")
    trainer = prepared_trainer(cfg)
    held = {it.path.name for it in trainer.val_items}
    assert len(held) == 2 and not held & {it.path.name for it in trainer.items}
    assert "" in trainer.text_cache  # caption dropout alone: the empty caption is cached too
    masked = [i for i, it in enumerate(trainer.items) if it.mask is not None]
    assert [trainer.items[i].path.name for i in masked] == ["img_001.png"] or "img_001.png" in held
    with torch.no_grad():
        first = [trainer.validation_loss(b) for b in trainer.validation_batches()]
        again = [trainer.validation_loss(b) for b in trainer.validation_batches()]
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # fixed noise and timesteps
        for p in trainer.trainable_parameters():
            p.add_(0.05)
        moved = [trainer.validation_loss(b) for b in trainer.validation_batches()]
    assert any(not torch.equal(a, b) for a, b in zip(first, moved))  # it measures the weights
    trainer.cleanup()


def test_step_captions_are_repeatable_per_sample(tiny_sd15, demo_images, tmp_path):
    from lora_studio.data.train_set import Batch

    cfg = make_config(tiny_sd15, demo_images, tmp_path / "out", shuffle_tags=True, keep_tokens=1,
                      tag_dropout_rate=0.2)
    for path in demo_images.glob("*.txt"):
        path.write_text("mystyle, " + path.read_text(encoding="utf-8") + ", one, two, three", encoding="utf-8")
    trainer = prepared_trainer(cfg)
    assert not trainer.text_cache  # the text changes every step: encoded per step
    batch = Batch([0, 1], epoch=3, number=2, offset=0)
    first = trainer.step_captions(batch)
    assert first == trainer.step_captions(Batch([0, 1], epoch=3, number=2, offset=0))
    assert all(c.startswith("mystyle, ") for c in first)
    later = [trainer.step_captions(Batch([0, 1], epoch=e, number=0, offset=0)) for e in range(6)]
    assert len({tuple(c) for c in later}) > 1
    trainer.cleanup()


@pytest.mark.slow
def test_masked_loss_with_augmented_captions_trains_on_sdxl(tiny_sdxl, demo_images, tmp_path):
    """SDXL with tag shuffling (text encoders kept on the device, encoded each step), masks and validation."""
    from helpers import run_job

    (demo_images / "masks").mkdir()
    Image.new("L", (64, 64), 128).save(demo_images / "masks" / "img_002.png")
    job = run_job(make_config(tiny_sdxl, demo_images, tmp_path / "out", max_train_steps=3, masked_loss=True,
                              shuffle_tags=True, validation_split=0.25, verify_export=False))
    assert job.status == "finished", job.error
    assert [m["step"] for m in job.run.read_metrics() if "val_loss" in m] == [3]
