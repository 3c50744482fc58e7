"""Faults a creator's machine meets: files and permissions, interrupted and resumed runs, long captions,
relative folders, concurrent model loads, read-only and full disks (issue 19).

The disk tests mount a read-only or a tiny tmpfs; they need root and a working ``mount`` and are skipped
with the reason otherwise (chmod does not stop root, so a read-only folder is a read-only mount here).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from lora_studio.training.events import Progress

from lora_studio.config import TrainConfig
from lora_studio.fileio import atomic_write_bytes, atomic_write_text, is_temp_name, make_temp_dir


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files: permissions and leftovers ---------------------------------------------------------------------
def test_atomic_writes_keep_the_umask_and_the_old_mode(tmp_path):
    with umask(0o022):
        new = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        folder = make_temp_dir(tmp_path, "diffusers")
        assert mode(new) == 0o644 and mode(folder) == 0o755
        caption = tmp_path / "img.txt"
        caption.write_text("old", encoding="utf-8")
        caption.chmod(0o664)
        atomic_write_bytes(caption, b"new")
        assert mode(caption) == 0o664 and caption.read_bytes() == b"new"
    with umask(0o077):
        assert mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600
    assert is_temp_name(folder.name) and not list(tmp_path.glob(".config.yaml.*"))
    for name in (".crash.safetensors.k2j3_x9.tmp", ".state.pt.ab12cd34.tmp", ".step_000006.tmp",
                 ".diffusers.tmp-abc_123", ".diffusers.old-x1", ".my_lora.old"):
        assert is_temp_name(name), name
    for name in (".cache", "crash.safetensors", "step_000006", ".gradio", "notes.tmp.txt"):
        assert not is_temp_name(name), name


# --- interrupted and resumed runs ---------------------------------------------------------------------------
def make_config(base: Path, data: Path | str, out: Path | str, **kw) -> TrainConfig:
    values = dict(base_model=str(base), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=1e-3, batch_size=2, max_train_steps=6, save_steps=0, mixed_precision="no", seed=123,
                  verify_export=False)
    values.update(kw)
    return TrainConfig(**values).validate()


class _Crash(Exception):
    """Stands for the process dying (kill -9) right after a step."""


def crash_after(step: int):
    def listener(event):
        if isinstance(event, Progress) and event.step == step and event.total:
            raise _Crash(f"killed after step {step}")
    return listener


def run(job, crash: int | None = None):
    if crash is not None:
        job.bus.subscribe(crash_after(crash))
    job = job.start()
    assert job.wait(300)
    return job


@pytest.mark.slow
def test_each_step_is_recorded_once_after_crashes_and_resumes(tiny_sd15, demo_images, tmp_path):
    """Crash twice before any checkpoint, once after one, then finish: metrics.jsonl, TensorBoard and the
    live curve hold each of the 8 steps exactly once; leftovers of the dead processes are removed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_studio.training.job import TrainingJob
    from lora_studio.ui.train_view import run_choices

    first = run(TrainingJob(make_config(tiny_sd15, demo_images, tmp_path / "out", max_train_steps=8, save_steps=4,
                                        batch_size=1)), crash=3)
    assert first.status == "failed" and "No checkpoint had been saved yet" in first.error
    folder = first.run.path
    state = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    assert state["status"] == "failed" and "killed after step 3" in state["message"]
    (label, _), = run_choices(tmp_path / "out")
    assert "failed at" in label and "killed after step 3" in label
    leftovers = [folder / ".my_lora.safetensors.k2j3_x9.tmp", folder / "checkpoints" / ".step_000004.tmp",
                 folder / "checkpoints" / "step_000004" / ".state.pt.ab12cd34.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.suffix == ".tmp" and "step_" in path.name else path.write_bytes(b"half written")

    assert run(TrainingJob.resume(folder), crash=3).status == "failed"  # again before any checkpoint
    third = run(TrainingJob.resume(folder), crash=6)  # a checkpoint at step 4, then dies at 6
    assert third.status == "failed" and "step_000004" in third.error
    assert not any(p.exists() for p in leftovers)
    last = run(TrainingJob.resume(folder))
    assert last.status == "finished", last.error

    steps = [r["step"] for r in last.run.read_metrics()]
    assert steps == list(range(1, 9))
    assert [s for s, _ in last.snapshot().losses] == steps
    events = EventAccumulator(str(folder / "logs"))
    events.Reload()
    tb = events.Scalars("loss")
    assert [e.step for e in tb] == steps
    assert [e.value for e in tb] == pytest.approx([r["loss"] for r in last.run.read_metrics()], rel=1e-5)
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_training_reads_captions_of_a_relative_folder(tiny_sd15, demo_images, tmp_path, monkeypatch):
    from lora_studio.training.job import TrainingJob

    monkeypatch.chdir(demo_images.parent)
    job = run(TrainingJob(make_config(tiny_sd15, f"./{demo_images.name}", "out", max_train_steps=2)))
    assert job.status == "finished", job.error
    assert any("8 images found in" in line and "8 with captions, 8 will train" in line for line in job.snapshot().log)


# --- two things at once ---------------------------------------------------------------------------------------
def test_model_loads_take_turns_and_leave_torch_unpatched(tiny_sd15, monkeypatch):
    """Loads on several threads (a training start, a grid, a captioner) run one at a time, so accelerate's
    empty-weights patch is never interleaved: afterwards a new nn.Linear is a real CPU layer again."""
    import torch
    from diffusers import AutoencoderKL

    from lora_studio.captioning.loading import load_model_part
    from lora_studio.models.load_lock import model_loading
    from lora_studio.models.loading import load_vae

    original_register = torch.nn.Module.register_parameter
    real = AutoencoderKL.from_pretrained
    inside, most = [0], [0]
    guard = threading.Lock()

    def counting(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", counting)
    vae = str(tiny_sd15 / "vae")
    loaders = [lambda: load_vae(vae)] * 3 + [lambda: load_model_part(AutoencoderKL.from_pretrained, vae, "VAE")] * 3
    errors = []

    def work(load):
        try:
            assert load().encoder.conv_in.weight.device.type == "cpu"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(load,)) for load in loaders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert most[0] == 1  # never two loads at once
    assert torch.nn.Module.register_parameter is original_register
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    # Re-entrant: a trainer holding the lock may call a loader that takes it again; another thread waits.
    order = []
    with model_loading("outer"):
        def other():
            with model_loading("other"):
                order.append("other")

        waiter = threading.Thread(target=other)
        waiter.start()
        with model_loading("inner"):
            time.sleep(0.1)
            order.append("inner")
    waiter.join(10)
    assert order == ["inner", "other"]


# --- read-only and full disks ----------------------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, options: str):
    """A tmpfs mounted at ``where`` (``ro`` or ``size=...``); skips the test where that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only or tiny tmpfs (and chmod cannot make a folder read-only "
                    "for root)")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Write a file until the disk under ``folder`` is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while fh.write(b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_write_faults_are_recognised_and_told_in_one_sentence(tmp_path):
    from lora_studio.training.disk import fault_errno, run_bytes, write_fault

    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "x"))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "read-only file system" in write_fault(ro, tmp_path) and str(tmp_path) in write_fault(ro, tmp_path)
    text = write_fault(full, tmp_path, need=3 * 2**20)
    assert "is full" in text and "free" in text and "about 3.0 MB" in text
    assert "permission denied" in write_fault(OSError(errno.EACCES, "Permission denied"), tmp_path)
    # What torch.save and safetensors raise for a short write, also when wrapped in another error.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert fault_errno(torch_error) == errno.ENOSPC
    wrapped = ValueError("export failed")
    wrapped.__cause__ = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert fault_errno(wrapped) == errno.ENOSPC
    assert write_fault(ValueError("a bug"), tmp_path) is None
    assert write_fault(FileNotFoundError(errno.ENOENT, "No such file"), tmp_path) is None
    cfg = TrainConfig(save_steps=100, keep_checkpoints=3)
    need, parts = run_bytes(cfg, 1_000_000, 4, total_steps=1000)
    # 4 checkpoints (3 kept + the one being written) of LoRA file + state (LoRA + AdamW's 2 moments), export 2 files
    assert need == 4 * (8_000_000 + 8_000_000) + 8_000_000 + 16 * 2**20
    assert parts.startswith("4 checkpoint(s)")


def test_real_write_errors_on_read_only_and_full_disks(tmp_path):
    import torch

    from lora_studio.fileio import atomic_save_safetensors, atomic_write
    from lora_studio.training.disk import fault_errno, write_fault

    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OSError) as err:
            atomic_write_text(ro / "job.json", "{}")
        assert err.value.errno == errno.EROFS and "read-only file system" in write_fault(err.value, ro)
    with tmpfs(tmp_path / "full", "size=64k") as full:
        big = {"w": torch.zeros(100_000)}
        for write in (lambda: atomic_save_safetensors(full / "a.safetensors", big),
                      lambda: atomic_write(full / "state.pt", lambda p: torch.save(big, p))):
            with pytest.raises(Exception) as err:
                write()
            assert fault_errno(err.value) == errno.ENOSPC, err.value
        assert list(full.iterdir()) == []  # the atomic writer removed its half-written temporaries


def test_read_only_output_dir_is_one_sentence(tiny_sd15, demo_images, tmp_path, capsys):
    from lora_studio.__main__ import main
    from lora_studio.errors import TrainingError
    from lora_studio.training.job import TrainingJob

    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(TrainingError, match="read-only file system"):
            TrainingJob(make_config(tiny_sd15, demo_images, ro)).start()
        args = ["train", f"base_model={tiny_sd15}", f"train_data_dir={demo_images}", f"output_dir={ro / 'runs'}",
                "mixed_precision=no", "max_train_steps=2"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"Cannot write to '{ro / 'runs'}': it is on a read-only file system" in err


def test_full_disk_when_the_run_folder_is_made(tiny_sd15, demo_images, tmp_path):
    from lora_studio.errors import TrainingError
    from lora_studio.training.job import TrainingJob

    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        fill(disk)
        with pytest.raises(TrainingError, match=f"The disk holding '{disk}' is full"):
            TrainingJob(make_config(tiny_sd15, demo_images, disk)).start()
        assert [p.name for p in disk.iterdir()] == ["filler"]  # no half-made run folder


def test_too_little_free_space_is_refused_before_training(tiny_sd15, demo_images, tmp_path):
    from lora_studio.training.job import TrainingJob

    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        job = run(TrainingJob(make_config(tiny_sd15, demo_images, disk)))
        assert job.status == "failed"
        assert f"Not enough free disk space for this run in '{job.run.path}'" in job.error
        assert "is needed" in job.error and "is free" in job.error and "checkpoint(s)" in job.error
        assert job.run.read_state()["status"] == "failed"
        assert job.run.read_state()["message"] == job.error and job.run.read_metrics() == []


@pytest.mark.parametrize("when, steps, save_steps", [("checkpoint", 6, 2), ("exporting", 3, 0)])
@pytest.mark.slow
def test_full_disk_during_training_fails_the_run_with_one_sentence(tiny_sd15, demo_images, tmp_path, when, steps,
                                                                    save_steps):
    """The disk fills up after the first checkpoint (the next one cannot be written), or at the export."""
    from lora_studio.training.job import TrainingJob

    with tmpfs(tmp_path / "disk", "size=40m") as disk:
        job = TrainingJob(make_config(tiny_sd15, demo_images, disk, max_train_steps=steps, save_steps=save_steps))
        filled = []

        def fill_once(event):
            if not filled and (event.kind == when or getattr(event, "state", None) == when):
                filled.append(event.kind)
                fill(disk)

        job.bus.subscribe(fill_once)
        job = run(job)
        assert filled and job.status == "failed"
        assert f"The disk holding '{job.run.path}' is full" in job.error, job.error
        assert "Traceback" not in job.error
        if when == "checkpoint":
            assert "The last good checkpoint is kept:" in job.error and "step_000002" in job.error
            assert [s for s, _ in job.run.list_checkpoints()] == [2]
        else:
            assert "No checkpoint had been saved yet" in job.error and "last good" not in job.error
        state = job.run.read_state()
        assert state["status"] == "failed" and state["message"] == job.error
        assert not [p for p in job.run.path.rglob("*") if p.name.startswith(".")]  # temporaries removed


# --- captions the text encoder cannot read ------------------------------------------------------------------
def test_captions_longer_than_the_text_encoder_reads_are_counted(tiny_sd15, demo_images, tmp_path, capsys):
    from lora_studio.cli_dataset import main
    from lora_studio.training.job import TrainingJob

    (demo_images / "img_000.txt").write_text("a red circle, " + "very " * 2000 + "long", encoding="utf-8")
    (demo_images / "img_001.txt").write_text(" ".join(["word"] * 90), encoding="utf-8")
    assert main(["dataset", "check", str(demo_images), "--min-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 caption(s) are longer than SD1.5 reads 77 CLIP tokens" in out  # img_006 is a duplicate
    assert out.count("caption too long: about") == 2
    job = run(TrainingJob(make_config(tiny_sd15, demo_images, tmp_path / "out", max_train_steps=1)))
    assert job.status == "finished", job.error
    warnings = [line for line in job.snapshot().log if "longer than the text encoder's limit" in line]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 8 captions") and "approximately" not in warnings[0]
    (demo_images / "img_000.txt").write_text("short", encoding="utf-8")
    (demo_images / "img_001.txt").write_text("short too", encoding="utf-8")
    assert main(["dataset", "check", str(demo_images), "--min-size", "32"]) == 0
    assert "longer than" not in capsys.readouterr().out
