"""Data-parallel training for real: two CPU processes (gloo) under ``accelerate launch`` on the tiny model.

The two-process run (batch 1 x 2 processes) must write one run folder with one set of outputs, and its LoRA
must match a one-process run with the same effective batch (batch 2 x 1 process).

Tolerance, derived: both runs do the same arithmetic except for float32 summation order (one batch-of-2
forward/backward against two batch-of-1 passes averaged by the all-reduce), so their gradients agree to
about 1e-6 relative. Adam turns a gradient into a step of about ``lr`` whatever its size, so a relative
gradient error d moves a weight by about ``lr * d`` per step (more only for the few elements whose gradient
is near Adam's eps). We allow 1% of one step per step: ``atol = 0.01 * lr * steps`` (4e-5 here; measured
about 3e-6). A run whose processes did not share gradients, trained on other samples or drew other noise
differs by O(lr) per step (the trained LoRA-up weights, zero at the start, reach about ``lr * steps``), a
hundred times the tolerance; the test checks that margin too. Rank 1's weights are not written anywhere,
but if they drifted from rank 0's after any step, its next gradients (averaged into rank 0's update) would
break the match.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from lora_studio.config import TrainConfig
from lora_studio.data.train_set import TrainItem, epoch_batches, sample_seed
from lora_studio.training import multi_gpu, process_job
from lora_studio.training.events import Commands
from lora_studio.training.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
LR, STEPS = 1e-3, 4
SETTINGS = dict(resolution=64, lora_rank=4, learning_rate=LR, lr_scheduler="constant", max_train_steps=STEPS,
                save_steps=2, mixed_precision="no", seed=7, output_name="mg", verify_export=False)

def _env() -> dict[str, str]:
    # CPU processes everywhere (also on a machine with one GPU, where two ranks cannot share it)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop(multi_gpu.ENV_RUN_DIR, None)
    return env


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _lora(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "mg.safetensors"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_sd15) -> dict:
    """One ``accelerate launch --num_processes 2`` run (batch 1 per process) and its inputs."""
    from lora_studio.models.tiny import make_demo_images

    root = tmp_path_factory.mktemp("multi_gpu")
    data = make_demo_images(root / "images", count=8, size=64)
    values = dict(SETTINGS, base_model=str(tiny_sd15), train_data_dir=str(data), batch_size=1,
                  output_dir=str(root / "out2"))
    config_path = root / "two.yaml"
    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    proc = _launch(process_job.launch_command(config_path, 2))
    runs = [p for p in (root / "out2").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return {"root": root, "data": data, "values": values, "runs": runs, "output": proc.stdout + proc.stderr}


def test_two_processes_write_one_run(two_process_run):
    runs = two_process_run["runs"]
    assert len(runs) == 1, f"expected one run folder, got {[r.name for r in runs]}"
    run = RunFolder(runs[0])
    state = run.read_state()
    assert state["status"] == "finished" and state["step"] == STEPS and state["total"] == STEPS
    assert state["num_processes"] == 2 and state["effective_batch"] == 2
    assert "x 2 process(es) = effective batch 2" in two_process_run["output"]
    assert [r["step"] for r in run.read_metrics()] == list(range(1, STEPS + 1))  # one writer, no duplicates
    assert len(list(run.logs_dir.glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in run.list_checkpoints()] == [2]
    names = {p.name for p in run.path.iterdir()}
    assert {"mg.safetensors", "README.md", "mg.json", "config.yaml", "job.json"} <= names
    assert not any(n.startswith(".") and n.endswith(".tmp") for n in names)


def test_two_processes_match_one_process(two_process_run, tmp_path):
    values = dict(two_process_run["values"], batch_size=2, output_dir=str(tmp_path / "out1"))
    config_path = tmp_path / "one.yaml"
    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    _launch(process_job.launch_command(config_path, 1))  # the same command line, one process
    (run_one,) = [p for p in (tmp_path / "out1").iterdir() if p.is_dir() and not p.name.startswith(".")]
    one, two = _lora(run_one), _lora(two_process_run["runs"][0])
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    tolerance = 0.01 * LR * STEPS
    assert diff <= tolerance, f"two processes differ from one by {diff:.3g} (tolerance {tolerance:.3g})"
    ups = [k for k in one if "lora_up" in k or "lora_B" in k]
    moved = max(float(one[k].abs().max()) for k in ups)
    assert moved >= 25 * tolerance, f"the LoRA barely trained ({moved:.3g}); the comparison would prove nothing"
    one_loss = [r["loss"] for r in RunFolder(run_one).read_metrics()]
    two_loss = [r["loss"] for r in RunFolder(two_process_run["runs"][0]).read_metrics()]
    assert one_loss == pytest.approx(two_loss, rel=1e-4)  # the logged loss is the mean over processes


def test_two_processes_resume_exactly(two_process_run):
    run = two_process_run["runs"][0]
    before = _lora(run)
    _launch(process_job.launch_command(None, 2, resume_dir=run))  # continues from the step-2 checkpoint
    after = _lora(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["step"] for r in RunFolder(run).read_metrics()] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_two_processes_in_bf16_with_text_encoders_pass_the_export_check(tiny_sd15, tmp_path, monkeypatch):
    """The GPU presets' mixed precision under DDP (bf16 on the CPU, LORA_STUDIO_CPU_CHECK): accelerate wraps
    each model for autocast and for DDP; the main process's export check must see through both."""
    from lora_studio.models.tiny import make_demo_images

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # _env() copies os.environ into the launched processes
    data = make_demo_images(tmp_path / "images", count=8, size=64)
    values = dict(SETTINGS, base_model=str(tiny_sd15), train_data_dir=str(data), batch_size=1, mixed_precision="bf16",
                  train_text_encoder=True, verify_export=True, output_dir=str(tmp_path / "out"))
    config_path = tmp_path / "bf16.yaml"
    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    proc = _launch(process_job.launch_command(config_path, 2))
    output = proc.stdout + proc.stderr
    assert "weights bfloat16" in output and "x 2 process(es)" in output
    assert "Export check passed" in output, output[-3000:]
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert any(k.startswith("lora_te") for k in _lora(run))


# --- fast checks of the pieces --------------------------------------------------------------------
def _items(n: int, buckets: int = 1) -> list[TrainItem]:
    return [TrainItem(Path(f"{i}.png"), f"c{i}", (64, 64), (64 + 8 * (i % buckets), 64)) for i in range(n)]


@pytest.mark.parametrize("n,buckets", [(8, 1), (7, 1), (11, 3)])
def test_batches_depend_only_on_effective_batch(n, buckets):
    items = _items(n, buckets)
    for epoch in (0, 1):
        whole = epoch_batches(items, 2, 5, epoch, 0, 1)
        shards = [epoch_batches(items, 1, 5, epoch, r, 2) for r in range(2)]
        assert len(shards[0]) == len(shards[1])  # all processes step together
        for r, shard in enumerate(shards):
            for batch in shard:
                assert len({items[i].bucket for i in batch}) == 1
                assert batch.positions()[0] == (epoch, batch.number, r * len(batch))
        if n % 2 == 0 and buckets == 1:  # nothing to pad: the same samples at the same positions
            assert [list(b) for b in whole] == [s0 + s1 for s0, s1 in zip(*shards)]
        seen = {i for shard in shards for b in shard for i in b}
        assert seen == set(range(n))  # padding repeats images, never drops one


def test_one_process_order_is_unchanged():
    """The single-process order is the plain shuffled-buckets order (runs and resumes stay as before)."""
    import random

    items = _items(9)
    rng = random.Random(3 * 1000003 + 0)
    idxs = list(range(9))
    rng.shuffle(idxs)
    expected = [idxs[i:i + 2] for i in range(0, 9, 2)]
    rng.shuffle(expected)
    assert [list(b) for b in epoch_batches(items, 2, 3, 0)] == expected


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(1, 0, 0, 0) == sample_seed(1, 0, 0, 0)
    seeds = {sample_seed(1, e, b, p) for e in range(3) for b in range(5) for p in range(4)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)


def test_launch_command(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mixed_precision: bf16\n", encoding="utf-8")
    single = process_job.launch_command(cfg, 1, python="py")
    assert single == ["py", "-m", "lora_studio", "train", "--config", str(cfg)]
    cmd = process_job.launch_command(cfg, 4, python="py", port=29555)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16" and cmd[cmd.index("--main_process_port") + 1] == "29555"
    assert cmd[-5:] == ["-m", "lora_studio", "train", "--config", str(cfg)]
    resume = process_job.launch_command(None, 2, resume_dir=tmp_path, python="py")
    assert resume[-5:] == ["-m", "lora_studio", "train", "--resume", str(tmp_path)]


def test_process_job_prepares_one_run_folder(tmp_path, monkeypatch, tiny_sd15, demo_images):
    started = {}

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            started.update(cmd=cmd, env=env)
            self.pid, self.returncode = 4242, 0

        def poll(self):  # the launched run has ended (the next test may start one)
            return 0

    monkeypatch.setattr(process_job.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(process_job, "available_gpus", lambda: 2)
    cfg = TrainConfig(**dict(SETTINGS, base_model=str(tiny_sd15), train_data_dir=str(demo_images),
                             output_dir=str(tmp_path / "out"))).validate()
    job = process_job.ProcessJob(cfg, 2).start()
    run = RunFolder.open(job.run.path)
    assert run.load_config().to_dict() == cfg.to_dict()
    assert started["env"][multi_gpu.ENV_RUN_DIR] == str(run.path)
    assert started["cmd"][-2:] == ["--config", str(run.config_path)]
    assert run.read_state()["status"] == "starting" and run.read_state()["num_processes"] == 2
    # the launched processes reuse that folder instead of naming their own
    monkeypatch.setenv(multi_gpu.ENV_RUN_DIR, str(run.path))
    assert RunFolder.create(cfg).path == run.path
    assert [p.name for p in (tmp_path / "out").iterdir()] == [run.path.name]


@pytest.mark.slow
def test_stop_through_a_command_file(tmp_path, tiny_sd15, demo_images):
    """A run in another process is stopped by a file (what the UI does for a multi-GPU run)."""
    from lora_studio.training.job import make_trainer
    from lora_studio.training.loop import run_training
    from lora_studio.training.events import EventBus, Progress

    cfg = TrainConfig(**dict(SETTINGS, base_model=str(tiny_sd15), train_data_dir=str(demo_images),
                             output_dir=str(tmp_path), batch_size=2, save_steps=0)).validate()
    run = RunFolder.create(cfg)
    run.request_command("stop")  # stale: dropped when training starts
    bus = EventBus()

    def stop_after_first_step(event) -> None:
        if isinstance(event, Progress) and event.step == 1:
            run.request_command("stop")

    bus.subscribe(stop_after_first_step)
    files = run_training(make_trainer(cfg, run, bus), Commands())
    assert files == [] and run.read_state()["status"] == "stopped" and run.read_state()["step"] == 1
    assert [s for s, _ in run.list_checkpoints()] == [1]
    assert not (run.path / "commands" / "stop").exists()
    with pytest.raises(ValueError):
        run.request_command("explode")


@pytest.mark.slow
def test_two_processes_validate_on_the_main_process_with_ema(tmp_path, tiny_sd15):
    """Validation runs on the main process alone (no collective call the other would wait in); EMA on both."""
    from lora_studio.models.tiny import make_demo_images

    data = make_demo_images(tmp_path / "images", count=8, size=64)
    values = dict(SETTINGS, base_model=str(tiny_sd15), train_data_dir=str(data), batch_size=1,
                  output_dir=str(tmp_path / "out"), validation_split=0.25, ema_decay=0.5, optimizer="prodigy",
                  learning_rate=1.0)
    config_path = tmp_path / "val.yaml"
    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    _launch(process_job.launch_command(config_path, 2))
    run = RunFolder(next(p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")))
    assert [m["step"] for m in run.read_metrics() if "val_loss" in m] == [2, 4]
    assert run.read_state()["status"] == "finished" and run.read_state()["recommended"]["step"] in (2, 4)
