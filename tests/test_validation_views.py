"""What the tabs show of the new features: the loss curve with the validation loss beside the training loss, the
recommended checkpoint in the Testing tab's grid rows and LoRA list, loss masks over the Dataset tab's thumbnails."""

from __future__ import annotations

import json

from PIL import Image

from lora_studio.config import TrainConfig


def test_loss_curve_has_a_validation_series_beside_the_training_one():
    from lora_studio.ui.train_view import empty_loss_frame, loss_frame

    frame = loss_frame([(1, 0.5), (2, 0.4)], [(2, 0.45)])
    assert list(frame.columns) == ["step", "loss", "series"]
    assert frame[frame.series == "validation"].values.tolist() == [[2, 0.45, "validation"]]
    assert list(empty_loss_frame().columns) == list(frame.columns) and loss_frame([], []).empty


def make_run(tmp_path, recommended: dict | None):
    run = tmp_path / "out" / "my_lora-20260101-000000"
    for step in (2, 4):
        folder = run / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / f"my_lora-step{step:06d}.safetensors").write_bytes(b"x")
        (folder / "done").write_text(str(step))
    (run / "my_lora.safetensors").write_bytes(b"x")
    (run / "my_lora-raw.safetensors").write_bytes(b"x")
    TrainConfig(base_model="base").save(run / "config.yaml")
    (run / "job.json").write_text(json.dumps({"status": "finished", "recommended": recommended}))
    return run


def test_the_recommended_checkpoint_is_labelled_in_the_grid_and_the_list(tmp_path):
    from lora_studio.ui.test_tab import checkpoint_rows, lora_choices

    run = make_run(tmp_path, {"step": 2, "val_loss": 0.3, "final": False, "checkpoint": "x"})
    rows = checkpoint_rows(run / "my_lora.safetensors")
    assert [label for label, _ in rows] == ["step 2 (recommended)", "step 4", "final"]
    assert rows[-1][1].name == "my_lora.safetensors"  # the EMA file, not the -raw one
    labels = [label for label, _ in lora_choices(tmp_path / "out")]
    assert sum("(recommended)" in label for label in labels) == 1 and any("step 2 (recommended)" in x for x in labels)
    final = make_run(tmp_path / "b", {"step": 6, "val_loss": 0.2, "final": True, "checkpoint": None})
    assert [label for label, _ in checkpoint_rows(final / "my_lora.safetensors")][-1] == "final (recommended)"
    plain = make_run(tmp_path / "c", None)
    assert not any("recommended" in label for label, _ in checkpoint_rows(plain / "my_lora.safetensors"))


def test_dataset_thumbnails_show_their_loss_masks(tmp_path):
    import numpy as np

    from lora_studio.ui.dataset_tab import with_mask

    (tmp_path / "masks").mkdir()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "a.png")
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))
    mask.save(tmp_path / "masks" / "a.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "b.png")
    thumb = Image.new("RGB", (64, 64), (255, 255, 255))
    shown, note = with_mask(thumb, tmp_path / "a.png", tmp_path)
    pixels = np.asarray(shown, dtype=np.int32)
    assert note == "mask: masks/a.png"
    assert pixels[:, :24, 1].max() < 200 and pixels[:, 40:].min() == 255  # ignored half tinted, trained half as is
    assert with_mask(thumb, tmp_path / "b.png", tmp_path) == (thumb, "")
