"""Probing the real app on 127.0.0.1 as a hostile or hurried visitor would (issue 19): a server started with a
login (``--auth``), driven through its API by several ``gradio_client`` clients at once.

- caption names from the page never write outside the captioned folder;
- two clients pressing Start in the same moment start one run (the other is told why), and training
  alongside a strength grid still works afterwards (model loads take turns);
- user errors are one line in the terminal, not a traceback;
- files another Gradio app left in Gradio's shared temp folder are not served.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_app_server import AppProcess, _defaults, _wait_for_training

AUTH = ("prober", "s3cret-pass")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    proc = AppProcess(["--demo", "--auth", ":".join(AUTH), "--outputs", str(outputs)], outputs.parent / "faults_app.log")
    try:
        yield proc.wait_ready(), outputs
    finally:
        proc.stop()


def client_for(app):
    from gradio_client import Client

    return Client(app.url, auth=AUTH, verbose=False, httpx_kwargs={"timeout": 120})  # 2 busy CPU cores


def _table(rows: list[list[str]]) -> dict:
    """The Captioning tab's table: image, file, caption, tokens."""
    return {"headers": ["image", "file", "caption", "tokens"], "data": [r + [""] for r in rows], "metadata": None}


def test_caption_names_from_the_page_stay_inside_the_folder(app, tmp_path):
    from gradio_client.exceptions import AppError

    server, outputs = app
    client = client_for(server)
    images = outputs / "demo" / "images"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious", encoding="utf-8")
    climb = os.path.relpath(victim / "notes.png", images)
    assert climb.startswith("..")
    for name in (str(victim / "abs.png"), climb):
        for formats in (["metadata.csv", ".txt files"], [".txt files"], ["metadata.csv"]):
            with pytest.raises(AppError, match="outside the image folder"):
                client.predict(str(images), _table([["", "img_000.png", "fine"], ["", name, "pwned"]]), formats,
                               api_name="/save_captions")
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]
    assert (victim / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert not (images / "metadata.csv").exists()  # a bad name stops the save before anything is written
    # Names from the page are not read either: no thumbnail of an image outside the folder comes back.
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(victim / "secret.png")
    table, _ = client.predict(str(images), _table([["", os.path.relpath(victim / "secret.png", images), "x"]]),
                              "sd15", "", "", "", "", "", "", "", False, False, False, api_name="/apply_caption_edit")
    assert table["data"][0][0] == "(outside the folder)"
    saved = client.predict(str(images), _table([["", "img_000.png", "demo style, fine"]]), [".txt files"],
                           api_name="/save_captions")
    assert "Saved 1 caption" in saved
    assert (images / "img_000.txt").read_text(encoding="utf-8") == "demo style, fine"


def _at_once(*calls):
    """Run the calls on threads released together; each result is its value or the exception it raised."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def go(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_two_starts_at_once_start_one_run(app):
    """Two clients press Start in the same moment, three times: each time exactly one run starts and the other
    client hears why; every run finishes (no 'meta tensor' breakage). The last round renders a strength
    grid while the run loads its model."""
    from gradio_client.exceptions import AppError

    server, outputs = app
    for image in (outputs / "demo" / "images").glob("*.png"):  # the demo's images come uncaptioned
        image.with_suffix(".txt").write_text("demo style, a shape", encoding="utf-8")
    clients = [client_for(server), client_for(server)]
    params = {**_defaults(clients[0], "/start_training"), "max_train_steps": 3, "save_steps": 0,
              "sample_steps": 0}
    runs_before = len(list((outputs / "runs").iterdir()))
    lora = None
    for round_no in range(3):
        starts = [lambda c=c: c.predict(**params, api_name="/start_training") for c in clients]
        if round_no == 2:  # Start on one client and Render strengths on the other, at the same moment
            starts = [starts[0], lambda lora=lora: clients[1].predict(lora, "", "demo style, a red circle", "", 1, 2,
                                                                      5.0, 32, "0, 1", api_name="/render_strengths")]
        results = _at_once(*starts)
        if round_no < 2:
            refused = [r for r in results if isinstance(r, AppError)]
            assert len(refused) == 1 and "already in progress" in str(refused[0]), results
        else:
            assert not any(isinstance(r, Exception) for r in results), results
            assert Path(results[1][0]).is_file()
        status = _wait_for_training(clients[0], timeout=240)
        assert status["status"] == "finished", status.get("error")
        lora = next(f for f in status["files"] if f.endswith(".safetensors"))
    assert len(list((outputs / "runs").iterdir())) == runs_before + 3
    assert "meta tensor" not in server.output()


def test_user_errors_are_one_line_in_the_terminal(app, tmp_path):
    from gradio_client.exceptions import AppError

    server, outputs = app
    client = client_for(server)
    time.sleep(1)
    before = len(server.output())
    missing = tmp_path / "no-such-folder-19"
    with pytest.raises(AppError, match="does not exist"):
        client.predict(str(missing), 32, 4.0, api_name="/scan_dataset")
    with pytest.raises(AppError, match="No training is running"):
        client.predict(api_name="/stop_training")
    time.sleep(1)
    new = server.output()[before:]
    assert "Traceback" not in new, new
    lines = [line for line in new.splitlines() if "user error in" in line]
    assert len(lines) == 2 and str(missing) in lines[0] and "No training is running" in lines[1], new


def test_files_of_other_gradio_apps_are_not_served(app):
    from gradio_client import handle_file

    server, outputs = app
    other = Path(tempfile.gettempdir()) / "gradio" / f"other-app-{os.getpid()}"
    other.mkdir(parents=True, exist_ok=True)
    secret = other / "secret.txt"
    secret.write_text("another app's upload", encoding="utf-8")
    try:
        with httpx.Client(base_url=server.url) as http:
            assert http.post("/login", data={"username": AUTH[0], "password": AUTH[1]}).status_code == 200
            assert http.get(f"/gradio_api/file={secret}").status_code == 403
            mine = outputs / "mine.txt"
            mine.write_text("ok", encoding="utf-8")
            assert http.get(f"/gradio_api/file={mine}").status_code == 200
            # This app's own uploads still arrive (through its temp folder inside the outputs folder).
            image = next((outputs / "demo" / "images").glob("*.png"))
            folder = client_for(server).predict([handle_file(str(image))], api_name="/upload_images")
            uploaded = Path(folder) / image.name
            assert uploaded.is_file() and Path(folder).parent == outputs / "uploads"
            assert http.get(f"/gradio_api/file={uploaded}").status_code == 200
            assert (outputs / ".gradio").is_dir()
    finally:
        secret.unlink(missing_ok=True)
        other.rmdir()
