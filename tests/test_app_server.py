"""The real app in a subprocess on 127.0.0.1, driven through its API with gradio_client.

One ``--demo`` server runs the flow tab by tab (dataset, captioning, training, testing) and checks that
only the outputs folder is served (403 elsewhere). A second server started with ``--share`` (no internet
here) checks that it keeps serving locally, prints a generated password, answers 401 before login, and
refuses typed paths outside its folders.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """``python app.py ...`` in the background, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--no-browser", "--port", str(self.port),
                                      *args], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> "AppProcess":
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if "LoRA Studio is running on" in self.output():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"app.py did not start in {START_TIMEOUT}s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    app = AppProcess(["--demo", "--outputs", str(outputs)], outputs.parent / "demo_app.log")
    try:
        yield app.wait_ready(), outputs
    finally:
        app.stop()


@pytest.fixture(scope="module")
def client(demo_app):
    from gradio_client import Client

    return Client(demo_app[0].url, verbose=False)


def _defaults(client, api_name: str) -> dict:
    """Values for the parameters the API has no default for (empty optional settings)."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"][api_name]
    return {p["parameter_name"]: None for p in info["parameters"] if not p["parameter_has_default"]}


def _wait_for_training(client, timeout: float = 150) -> dict:
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        status = client.predict(api_name="/training_status")
        if not status["running"] and status["status"] != "idle":
            return status
        time.sleep(1)
    raise AssertionError(f"training did not finish in {timeout}s: {status}")


def test_flow_through_every_tab(demo_app, client):
    app, outputs = demo_app
    images = outputs / "demo" / "images"

    # Dataset: scan the demo images, prepare a working copy.
    summary, gallery, problems, dataset_dir = client.predict(str(images), 32, 4.0, api_name="/scan_dataset")
    assert "images usable" in summary and len(gallery) >= 6 and dataset_dir == str(images)
    status, prepared = client.predict(str(images), 32, 4.0, 64, "center_crop", "none", "", api_name="/prepare_dataset")
    assert "prepared" in status and Path(prepared).parent == outputs / "datasets"
    assert len(list(Path(prepared).glob("*.png"))) >= 6

    # Captioning: the tiny BLIP with a trigger word, a previewed batch edit, then save.
    demo = outputs / "demo"
    table, text = client.predict(str(images), ["BLIP caption"], "zubi", True, str(demo / "miniature-blip"),
                                 str(demo / "tiny-clip"), api_name="/run_captioning")
    rows = table["data"]
    assert "captioned" in text and rows and all(r[2].startswith("zubi, a ") for r in rows)
    preview = client.predict(table, "", "", ", shapes", "", "", "", False, False, False,
                             api_name="/preview_caption_edit")
    assert all(r[2].endswith("shapes") for r in preview["data"])
    saved = client.predict(str(images), table, ["metadata.csv", ".txt files"], api_name="/save_captions")
    assert "Saved" in saved and (images / "metadata.csv").is_file()

    # Training: start, stop after a few steps (a checkpoint is saved), resume to the end. A second start
    # while a run is going is refused with a reason.
    params = {**_defaults(client, "/start_training"), "max_train_steps": 12, "save_steps": 6, "sample_steps": 6}
    client.predict(**params, api_name="/start_training")
    deadline = time.time() + 60
    while client.predict(api_name="/training_status")["step"] < 2 and time.time() < deadline:
        time.sleep(0.3)
    client.predict(api_name="/stop_training")
    stopped = _wait_for_training(client)
    assert stopped["status"] == "stopped", stopped.get("error")
    client.predict(stopped["run_dir"], api_name="/resume_training")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="already in progress"):
        client.predict(**params, api_name="/start_training")
    status = _wait_for_training(client)
    assert status["status"] == "finished", status.get("error")
    assert status["run_dir"] == stopped["run_dir"]
    steps = [step for step, _ in status["losses"]]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    assert status["sample"] and Path(status["sample"]).is_file()
    lora_file = next(f for f in status["files"] if f.endswith(".safetensors"))

    # The run folder alone tells the story (what the page shows after an app restart).
    shown = client.predict(status["run_dir"], api_name="/show_run")
    assert "Step 12 / 12" in shown[0] and "finished" in shown[0]

    yaml_text = client.predict(**params, api_name="/show_command")[1]
    assert "base_model:" in yaml_text and "max_train_steps: 12" in yaml_text

    # Testing: strengths side by side, and the checkpoint x strength grid.
    grid, tags, _ = client.predict(lora_file, "", "zubi, a red circle", "", 1, 3, 5.0, 32, "0, 0.5, 1",
                                   api_name="/render_strengths")
    assert Path(grid).is_file() and tags == "<lora:demo_lora:0.5>  <lora:demo_lora:1>"
    assert any((outputs / "grids").glob("demo_lora-*.png"))
    grid2, _, _ = client.predict(lora_file, "", "zubi", "", 1, 2, 5.0, 32, "0, 1",
                                 api_name="/render_checkpoint_grid")
    assert Path(grid2).is_file()


def test_language_model_lora_answers_side_by_side(demo_app, client):
    pytest.importorskip("lora_studio.inference.llm_compare")
    app, outputs = demo_app
    demo = outputs / "demo"
    params = {**_defaults(client, "/start_training"), "base_model": str(demo / "miniature-llm"),
              "train_data_dir": str(demo / "llm_data.jsonl"), "output_name": "llm_demo", "max_train_steps": 6,
              "save_steps": 0, "sample_steps": 0, "resolution": "", "learning_rate": 0.01}
    client.predict(**params, api_name="/start_training")
    status = _wait_for_training(client)
    assert status["status"] == "finished", status.get("error")
    table = client.predict(status["files"][0], "", "What is LoRA?", "0, 1", 12, 0, 0, api_name="/compare_llm_answers")
    rows = table["data"]
    assert [r[0] for r in rows] == ["0 (base)", "1"] and all(r[2] > 0 for r in rows)


def test_files_are_served_only_from_the_outputs_folder(demo_app):
    app, outputs = demo_app
    inside = outputs / "served.txt"
    inside.write_text("ok", encoding="utf-8")
    with httpx.Client(base_url=app.url) as http:
        assert http.get(f"/gradio_api/file={inside}").status_code == 200
        assert http.get("/gradio_api/file=/etc/passwd").status_code == 403
        assert http.get(f"/gradio_api/file={ROOT / 'app.py'}").status_code == 403
        assert http.get(f"/gradio_api/file={outputs}/../demo_app.log").status_code == 403


def test_typed_folder_must_exist(client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="does not exist"):
        client.predict(str(tmp_path / "nope"), 32, 4.0, api_name="/scan_dataset")


def test_uploaded_images_land_in_the_uploads_folder(demo_app, client):
    from gradio_client import handle_file

    app, outputs = demo_app
    image = next((outputs / "demo" / "images").glob("*.png"))
    folder = client.predict([handle_file(str(image))], api_name="/upload_images")
    assert Path(folder).parent == outputs / "uploads" and (Path(folder) / image.name).is_file()


def test_path_policy(tmp_path):
    from lora_studio.ui.security import PathError, PathPolicy, parse_auth

    root = tmp_path / "outputs"
    (root / "data").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    shared = PathPolicy(roots=[root], restricted=True)
    assert shared.folder(root / "data") == root / "data"
    for bad in (outside, root / "escape", root / ".." / "elsewhere"):
        with pytest.raises(PathError, match="outside the folders"):
            shared.folder(bad)
    assert shared.model_ref("owner/model") == "owner/model"
    with pytest.raises(PathError, match="outside"):
        shared.model_ref(str(outside))
    local = PathPolicy(roots=[root])
    assert local.folder(outside) == outside
    with pytest.raises(PathError, match="does not exist"):
        local.folder(tmp_path / "missing")
    with pytest.raises(PathError, match="is a file"):
        (tmp_path / "f.txt").write_text("x")
        local.folder(tmp_path / "f.txt")
    assert parse_auth("me:se:cret") == ("me", "se:cret")
    with pytest.raises(ValueError):
        parse_auth("nopassword")


@pytest.mark.slow
def test_share_without_internet_needs_login_and_limits_paths(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    outputs = tmp_path / "outputs"
    app = AppProcess(["--share", "--outputs", str(outputs)], tmp_path / "share_app.log").wait_ready()
    try:
        out = app.output()
        assert "share link could not be made" in out
        password = re.search(r"password:\s+(\S+)", out).group(1)
        with httpx.Client(base_url=app.url) as http:
            assert http.get("/config").status_code == 401
            assert http.get("/gradio_api/info").status_code == 401
            assert http.post("/login", data={"username": "studio", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "studio", "password": password}).status_code == 200
            assert http.get("/config").status_code == 200
        client = Client(app.url, auth=("studio", password), verbose=False)
        with pytest.raises(AppError, match="outside the folders"):
            client.predict(str(tmp_path), 32, 4.0, api_name="/scan_dataset")
        (outputs / "uploads" / "mine").mkdir(parents=True)
        summary = client.predict(str(outputs / "uploads" / "mine"), 32, 4.0, api_name="/scan_dataset")[0]
        assert "No images" in summary
        # Every path in the training settings is checked, the optional ones too.
        (outputs / "uploads" / "base").mkdir()
        secret = tmp_path / "secret.safetensors"
        secret.write_bytes(b"not for visitors")
        params = {**_defaults(client, "/show_command"), "base_model": str(outputs / "uploads" / "base"),
                  "train_data_dir": str(outputs / "uploads" / "mine")}
        for field in ("init_lora", "vae", "single_file_config", "metadata_path"):
            with pytest.raises(AppError, match="outside the folders"):
                client.predict(**{**params, field: str(secret)}, api_name="/show_command")
    finally:
        app.stop()


def test_memory_estimate_follows_the_settings(client):
    params = _defaults(client, "/memory_estimate")
    small = client.predict(**{**params, "batch_size": 1}, api_name="/memory_estimate")
    large = client.predict(**{**params, "batch_size": 8}, api_name="/memory_estimate")

    def gb(text: str) -> float:
        return float(text.split("about ")[1].split(" GB")[0])

    assert small.startswith("**Estimated peak GPU memory:**") and "not yet measured" in small
    assert gb(large) > gb(small)


def test_command_for_several_gpus_is_accelerate_launch(client):
    params = _defaults(client, "/show_command")
    one = client.predict(**{**params, "num_gpus": 1}, api_name="/show_command")[0]
    two = client.predict(**{**params, "num_gpus": 2}, api_name="/show_command")[0]
    assert "-m lora_studio train --config" in one and "accelerate" not in one
    assert "accelerate launch --multi_gpu --num_processes 2" in two and "-m lora_studio train --config" in two
    assert "accelerate launch" in two.split("continue a stopped run:")[1] and "train --resume" in two


def test_memory_estimate_follows_the_family(demo_app, client):
    app, outputs = demo_app
    params = {**_defaults(client, "/memory_estimate"), "resolution": "512", "batch_size": 1}
    sd15 = client.predict(**{**params, "model_family": "sd15"}, api_name="/memory_estimate")
    sdxl = client.predict(**{**params, "model_family": "sdxl"}, api_name="/memory_estimate")
    llm = client.predict(**{**params, "base_model": str(outputs / "demo" / "miniature-llm")}, api_name="/memory_estimate")
    assert "UNet weights" in sd15 and "UNet weights" in sdxl and "UNet" not in llm
    assert float(sdxl.split("about ")[1].split(" GB")[0]) > float(sd15.split("about ")[1].split(" GB")[0])


def test_preset_list_and_layer_choices_follow_the_family(demo_app):
    from lora_studio.ui.train_family import family_choices

    app, outputs = demo_app
    sd15, llm = str(outputs / "demo" / "miniature-sd15"), str(outputs / "demo" / "miniature-llm")

    def names(choices):
        return [value for _, value in choices.presets]

    image = family_choices(sd15, "auto", None)
    assert image.family == "sd15" and names(image) == ["", "12gb", "16gb", "24gb"] and image.preset == ""
    assert image.target_value == [] and "to_q" in image.targets and not image.llm
    assert "Stable Diffusion 1.x" in image.text
    assert family_choices(sd15, "auto", 16.0).preset == "16gb"
    assert family_choices(sd15, "auto", 16.0, preselect=False).preset == ""  # what --demo asks for
    assert names(family_choices(sd15, "sd2", None)) == ["", "12gb", "16gb", "24gb"]
    assert names(family_choices(sd15, "sdxl", None)) == ["", "sdxl_12gb", "sdxl_16gb", "sdxl_24gb"]
    assert family_choices(sd15, "sdxl", 24.0).preset == "sdxl_24gb"

    lm = family_choices(llm, "auto", None)
    assert lm.family == "llm" and lm.llm and names(lm) == ["", "llm_12gb", "llm_16gb", "llm_24gb"]
    assert lm.target_value == ["q_proj", "v_proj"] and {"k_proj", "o_proj", "down_proj"} <= set(lm.targets)
    assert "down_proj" in lm.target_info
    assert family_choices(llm, "auto", 12.0).preset == "llm_12gb"
    # A choice the new model has is kept; the other family's layer names are not.
    assert family_choices(llm, "auto", None, ["k_proj", "o_proj"]).target_value == ["k_proj", "o_proj"]
    assert family_choices(sd15, "auto", None, ["q_proj", "v_proj"]).target_value == []

    unknown = family_choices(str(outputs / "missing"), "auto", 16.0)
    assert unknown.text.startswith("Model family: unknown") and names(unknown)[1] == "12gb"


def test_start_job_trains_here_on_one_gpu_and_launches_accelerate_on_several(monkeypatch, tmp_path):
    """The choice behind Start and Resume, with the in-process job and the launched processes replaced by fakes."""
    from lora_studio.config import TrainConfig
    from lora_studio.errors import StudioError
    from lora_studio.training import job as job_module
    from lora_studio.training import jobs, process_job
    from lora_studio.training.run_folder import RunFolder

    calls = []

    class FakeJob:
        def __init__(self, cfg):
            calls.append(("here", cfg))

        @classmethod
        def resume(cls, run_dir):
            calls.append(("here, resume", str(run_dir)))
            return cls(None)

        def start(self):
            return self

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            precision = cmd[cmd.index("--mixed_precision") + 1]
            resume = cmd[cmd.index("--resume") + 1] if "--resume" in cmd else None
            calls.append(("accelerate", precision, int(cmd[cmd.index("--num_processes") + 1]), resume))
            self.pid, self.returncode = 4242, None

        def poll(self):
            return None

    cfg = TrainConfig(output_dir=str(tmp_path), mixed_precision="bf16").validate()
    run = RunFolder.create(cfg)
    real_job = job_module.TrainingJob
    monkeypatch.setattr(job_module, "TrainingJob", FakeJob)
    monkeypatch.setattr(process_job, "available_gpus", lambda: 2)
    monkeypatch.setattr(process_job.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(TrainConfig, "require_paths", lambda self: None)

    assert isinstance(jobs.start_job(cfg, 1), FakeJob) and calls.pop() == ("here", cfg)
    job = jobs.start_job(cfg, 2)
    assert isinstance(job, process_job.ProcessJob) and calls.pop() == ("accelerate", "bf16", 2, None)
    assert job.is_running() and jobs.running_job() is job
    with pytest.raises(StudioError, match="already in progress"):  # one run at a time, whatever its kind
        real_job(cfg).start()
    job.proc.poll = lambda: 0  # the launched run ends
    jobs.start_job(None, 2, resume_dir=run.path)  # the run folder's config.yaml
    assert calls.pop() == ("accelerate", "bf16", 2, str(run.path))
    jobs.current_job().proc.poll = lambda: 0
    jobs.start_job(None, 1, resume_dir=run.path)
    assert calls[-2] == ("here, resume", str(run.path))
    # Stop and Save now reach the other process through the run folder's commands/.
    job.stop()
    job.save_now()
    assert (job.run.path / "commands" / "stop").is_file() and (job.run.path / "commands" / "save").is_file()
    with pytest.raises(StudioError, match="3 GPUs were asked for but this machine has 2"):
        jobs.start_job(cfg, 3)


def test_several_gpus_on_a_machine_without_them_are_refused(client):
    from gradio_client.exceptions import AppError

    params = {**_defaults(client, "/start_training"), "max_train_steps": 2, "num_gpus": 2}
    with pytest.raises(AppError, match="GPUs were asked for"):
        client.predict(**params, api_name="/start_training")
