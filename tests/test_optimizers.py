"""Optimizers, EMA and the validation loss in the shared loop, on the tiny language model (seconds per run):
every optimizer resumes exactly; the EMA is what gets exported and resumes with the run; the validation loss is
the same in two runs and after a resume; the recommended checkpoint has the lowest validation loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.events import Progress
from lora_studio.training.job import TrainingJob
from lora_studio.training.run_folder import RunFolder
from helpers import run_job


def make_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), lora_rank=4,
                  learning_rate=2e-2, batch_size=3, max_train_steps=6, save_steps=2, mixed_precision="no", seed=7,
                  lr_scheduler="cosine", lr_warmup_steps=1, max_seq_length=64, verify_export=False, lora_dropout=0.1)
    values.update(kw)
    return TrainConfig(**values).validate()


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def stopped_and_resumed(cfg: TrainConfig, stop_at: int = 3) -> TrainingJob:
    first = TrainingJob(cfg)
    first.bus.subscribe(lambda e: first.stop() if isinstance(e, Progress) and e.step == stop_at else None)
    first.start().wait(600)
    assert first.status == "stopped", first.error
    resumed = TrainingJob.resume(first.run.path)
    resumed.start().wait(600)
    assert resumed.status == "finished", resumed.error
    return resumed


def assert_same_run(a: RunFolder, b: RunFolder) -> None:
    """The same losses, validation losses and final adapter, step for step."""
    ma, mb = a.read_metrics(), b.read_metrics()
    assert [m["step"] for m in mb] == [m["step"] for m in ma]
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], rel=1e-5, abs=1e-6)
    va = {m["step"]: m["val_loss"] for m in ma if "val_loss" in m}
    vb = {m["step"]: m["val_loss"] for m in mb if "val_loss" in m}  # + the step a stop saved a checkpoint at
    assert set(va) <= set(vb)
    assert {s: vb[s] for s in va} == pytest.approx(va, rel=1e-5, abs=1e-6)
    wa, wb = adapter_weights(a.path / "my_lora"), adapter_weights(b.path / "my_lora")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "prodigy", "adamw_schedulefree", "adafactor"])
@pytest.mark.slow
def test_each_optimizer_resumes_exactly(tiny_llm, llm_data, tmp_path, monkeypatch, optimizer):
    if optimizer == "adamw8bit":
        monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # bitsandbytes' CPU kernels, as asked
    lr = 1.0 if optimizer == "prodigy" else 2e-2
    full = run_job(make_config(tiny_llm, llm_data, tmp_path / "a", optimizer=optimizer, learning_rate=lr))
    assert full.status == "finished", full.error
    log = "\n".join(full.snapshot().log)
    assert "standard AdamW optimizer instead" not in log  # the asked optimizer really ran
    losses = [m["loss"] for m in full.run.read_metrics()]
    assert losses[-1] != losses[0]
    resumed = stopped_and_resumed(make_config(tiny_llm, llm_data, tmp_path / "b", optimizer=optimizer,
                                              learning_rate=lr))
    assert_same_run(full.run, resumed.run)


def test_prodigy_learning_rate_default_and_warning():
    from lora_studio.training.optimizers import learning_rate

    said = []
    assert learning_rate(TrainConfig(optimizer="prodigy"), lambda m, level="info": said.append((level, m))) == 1.0
    assert said and said[0][0] == "info" and "1.0" in said[0][1]
    said.clear()
    assert learning_rate(TrainConfig(optimizer="prodigy", learning_rate=1e-3), lambda m, level="info":
                         said.append((level, m))) == 1e-3
    assert said and said[0][0] == "warning" and "near 1" in said[0][1]
    said.clear()
    assert learning_rate(TrainConfig(optimizer="prodigy", learning_rate=0.8), lambda *a: said.append(a)) == 0.8
    assert learning_rate(TrainConfig(learning_rate=1e-4), lambda *a: said.append(a)) == 1e-4  # AdamW: untouched
    assert not said


def test_schedulefree_evaluation_weights_come_back_bit_for_bit():
    from schedulefree import AdamWScheduleFree

    from lora_studio.training.optimizers import eval_weights, is_schedule_free, train_mode

    param = torch.nn.Parameter(torch.randn(8))
    opt = AdamWScheduleFree([param], lr=0.1)
    assert is_schedule_free(opt) and not is_schedule_free(torch.optim.AdamW([param]))
    train_mode(opt)
    for _ in range(3):
        param.grad = torch.randn(8)
        opt.step()
    trained = param.detach().clone()
    with eval_weights(opt):
        assert not torch.equal(param, trained)  # the averaged x, not the training y
    assert torch.equal(param, trained) and opt.param_groups[0]["train_mode"]
    param.grad = torch.randn(8)
    opt.step()  # still in train mode


def test_ema_is_exported_raw_kept_on_request_and_resumed_exactly(tiny_llm, llm_data, tmp_path):
    kw = dict(ema_decay=0.6, ema_save_raw=True, validation_split=0.25)
    full = run_job(make_config(tiny_llm, llm_data, tmp_path / "a", **kw))
    assert full.status == "finished", full.error
    run = full.run
    ema, raw = adapter_weights(run.path / "my_lora"), adapter_weights(run.path / "my_lora-raw")
    assert any(not torch.allclose(ema[k], raw[k]) for k in ema)
    # a checkpoint's LoRA file is the EMA its resume state holds (in the order of the trained weights), not the raw
    # weights beside it
    step, folder = run.list_checkpoints()[-1]
    state = torch.load(folder / "state.pt", weights_only=False)
    shipped = adapter_weights(folder / f"my_lora-step{step:06d}")
    assert state["ema"]["updates"] == step and list(shipped) == list(state["lora"])
    for key, average in zip(state["lora"], state["ema"]["shadow"]):
        torch.testing.assert_close(shipped[key], average)
    assert any(not torch.allclose(state["lora"][k], shipped[k]) for k in shipped)
    resumed = stopped_and_resumed(make_config(tiny_llm, llm_data, tmp_path / "b", **kw))
    assert_same_run(run, resumed.run)  # losses, validation losses and the exported EMA


def test_validation_loss_is_repeatable_and_recommends_the_lowest(tiny_llm, llm_data, tmp_path):
    kw = dict(validation_split=0.25, max_train_steps=8, save_steps=2, keep_checkpoints=1, learning_rate=8e-2,
              lr_scheduler="constant", lr_warmup_steps=0, validation_every_steps=1)
    first = run_job(make_config(tiny_llm, llm_data, tmp_path / "a", **kw))
    second = run_job(make_config(tiny_llm, llm_data, tmp_path / "b", **kw))
    assert first.status == second.status == "finished", (first.error, second.error)
    rows = first.run.read_metrics()
    vals = {m["step"]: m["val_loss"] for m in rows}
    assert sorted(vals) == list(range(1, 9))  # every step (validation_every_steps 1)
    assert [m["val_loss"] for m in second.run.read_metrics()] == [vals[s] for s in range(1, 9)]
    snap = first.snapshot()
    assert snap.val_losses == [(s, vals[s]) for s in range(1, 9)]
    saved = {2, 4, 6, 8}  # checkpoints and the final file
    best = min(saved, key=lambda s: (vals[s], -s))
    rec = first.run.read_state()["recommended"]
    assert rec["step"] == best and rec["val_loss"] == pytest.approx(vals[best]) and snap.recommended == best
    if best != 8:  # the best checkpoint survives keep_checkpoints=1
        assert rec["checkpoint"] and Path(rec["checkpoint"]).is_dir()
    assert any("Lowest validation loss" in line for line in snap.log)
    card = (first.run.path / "README.md").read_text(encoding="utf-8")
    assert "## Recommended checkpoint" in card and f"step {best}" in card


def test_overfitting_is_named_when_validation_rises_while_training_falls():
    from lora_studio.training.validation import OVERFIT_EVALS, ValidationHistory, overfit_message

    history = ValidationHistory()
    for step, (train, val) in enumerate([(3.0, 2.0), (2.5, 1.8), (2.0, 1.9), (1.5, 2.0), (1.0, 2.1)], start=1):
        history.add_training_loss(train)
        history.add(step * 10, val)
    assert OVERFIT_EVALS == 3 and history.overfitting()
    assert "steps 20-50" in overfit_message(history)
    assert history.best({20, 40}).step == 20 and history.best({30, 50}).step == 30 and history.best({99}) is None
    calm = ValidationHistory()
    for step, (train, val) in enumerate([(3.0, 2.0), (2.9, 2.1), (3.0, 2.2), (3.1, 2.3)], start=1):
        calm.add_training_loss(train)
        calm.add(step, val)
    assert not calm.overfitting()  # validation rose, but training did not fall: not overfitting
    restored = ValidationHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.points == history.points
