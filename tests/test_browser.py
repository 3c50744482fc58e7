"""Click through the ``--demo`` flow in a real headless Chromium, and keep the screenshots for the README.

Dataset check, captioning, training a few steps (the loss plot draws while it runs), a strength grid.
With ``LORA_STUDIO_SCREENSHOTS=1`` the README's screenshots are refreshed in ``docs/img/`` (dataset.png,
captioning.png, training.png, testing.png); otherwise they go to the test's temporary folder, so a test run
leaves the work tree as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_app_server import AppProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "img"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"Chromium not found at {CHROMIUM} (apt-get install chromium)")]


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("browser_outputs")
    app = AppProcess(["--demo", "--outputs", str(outputs)], outputs.parent / "browser_app.log")
    try:
        yield app.wait_ready()
    finally:
        app.stop()


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture()
def shots(tmp_path) -> Path:
    """Where screenshots go: docs/img when asked (LORA_STUDIO_SCREENSHOTS=1), else a temporary folder."""
    return SHOTS if os.environ.get("LORA_STUDIO_SCREENSHOTS") == "1" else tmp_path / "shots"


def _shot(page, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp.png"
    page.screenshot(path=str(tmp), full_page=True)
    shutil.move(tmp, folder / name)


def test_demo_flow_in_the_browser(demo_app, page, shots):
    """On failure the page's training numbers and the server's log tail are in the message."""
    try:
        _click_through(demo_app.url, page, shots)
    except Exception as exc:  # expect() failures and Playwright timeouts
        stats = page.locator("#train-stats").inner_text(timeout=2000) if page.locator("#train-stats").count() else ""
        toasts = " | ".join(page.locator(".toast-body").all_inner_texts())
        raise AssertionError(f"{exc}\n--- messages: {toasts}\n--- training stats on the page:\n{stats}\n"
                             f"--- app log (tail):\n"
                             f"{demo_app.output()[-4000:]}") from None


def _click_through(demo_url: str, page, shots: Path) -> None:
    from playwright.sync_api import expect

    page.goto(demo_url)
    page.get_by_role("tab", name="1. Dataset").wait_for(timeout=30_000)

    # 1. Dataset: check the demo folder; thumbnails and the summary appear.
    page.get_by_role("button", name="Check folder").click()
    expect(page.locator("#dataset-summary")).to_contain_text("images usable", timeout=30_000)
    expect(page.locator("img").first).to_be_visible()
    _shot(page, shots, "dataset.png")

    # 2. Captioning: run the miniature BLIP with the trigger word, then save.
    page.get_by_role("tab", name="2. Captioning").click()
    page.get_by_role("button", name="Run captioning").click()
    expect(page.locator("#caption-status")).to_contain_text("captioned", timeout=60_000)
    page.get_by_role("button", name="Save captions").click()
    expect(page.locator("#caption-save-status")).to_contain_text("Saved", timeout=30_000)
    _shot(page, shots, "captioning.png")

    # 3. Training: start; the progress and the loss plot update live; wait for the end.
    page.get_by_role("tab", name="3. Training").click()
    page.get_by_role("button", name="Start training").click()
    progress = page.locator("#train-progress")
    expect(progress).to_contain_text(re.compile(r"Step ([5-9]|[1-9]\d) / 100"), timeout=90_000)
    # A second browser tab re-attaches to the running job.
    second = page.context.new_page()
    second.goto(demo_url)
    second.get_by_role("tab", name="3. Training").click()
    expect(second.locator("#train-stats")).to_contain_text("demo_lora-", timeout=30_000)
    second.close()
    plot = page.locator("#loss-plot")
    expect(plot.locator("canvas, svg").first).to_be_visible(timeout=15_000)
    expect(progress).to_contain_text("finished", timeout=120_000)
    expect(page.locator("#train-stats")).to_contain_text("Loss:")
    page.wait_for_timeout(1500)  # let the last sample image and the plot settle
    _shot(page, shots, "training.png")

    # 4. Testing: the new run's LoRA is listed; render the strength grid.
    page.get_by_role("tab", name="4. Testing").click()
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Render strengths").click()
    expect(page.locator("#grid-image img")).to_be_visible(timeout=90_000)
    expect(page.locator("#a1111-tags textarea, #a1111-tags input").first).to_have_value(
        re.compile(r"<lora:demo_lora:0\.25>"), timeout=10_000)
    page.wait_for_timeout(500)
    _shot(page, shots, "testing.png")


def test_language_model_settings_follow_the_base_model(demo_app, page):
    """Picking the demo's tiny language model: its presets, its layer names as LoRA targets (q_proj and
    v_proj picked), the language-model settings unfolded, a new memory estimate; back to SD1.5 undoes it,
    and an SD1.5 preset changes the settings and the estimate."""
    from playwright.sync_api import expect

    try:
        page.goto(demo_app.url)
        page.get_by_role("tab", name="3. Training").click()
        estimate = page.locator("#memory-estimate")
        expect(estimate).to_contain_text("not yet measured on a GPU", timeout=30_000)
        image_estimate = estimate.inner_text()
        expect(page.locator("#cfg-max_seq_length")).to_be_hidden()

        _pick(page, "#base-model", "miniature-llm")
        expect(page.locator("#model-family")).to_contain_text("causal language model", timeout=30_000)
        targets = page.locator("#cfg-target_modules")
        expect(targets).to_contain_text("q_proj")
        expect(targets).to_contain_text("v_proj")
        expect(page.locator("#cfg-max_seq_length")).to_be_visible()
        expect(estimate).not_to_have_text(image_estimate, timeout=10_000)
        targets.locator("input").click()
        expect(page.get_by_role("option", name="down_proj")).to_be_visible()
        page.keyboard.press("Escape")
        page.locator("#preset input").click()
        expect(page.get_by_role("option", name=re.compile(r"^llm_12gb: "))).to_be_visible()
        expect(page.get_by_role("option", name=re.compile(r"^12gb: "))).to_have_count(0)
        page.keyboard.press("Escape")

        _pick(page, "#base-model", "miniature-sd15")
        expect(page.locator("#model-family")).to_contain_text("Stable Diffusion 1.x", timeout=30_000)
        expect(targets).not_to_contain_text("q_proj")
        expect(page.locator("#cfg-max_seq_length")).to_be_hidden()
        expect(estimate).to_have_text(image_estimate, timeout=10_000)
        # A preset sets its values, and the estimate follows them.
        _pick(page, "#preset", "24gb: ")
        expect(page.locator("#cfg-batch_size input")).to_have_value("8", timeout=10_000)
        expect(estimate).not_to_have_text(image_estimate, timeout=10_000)
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- app log (tail):\n{demo_app.output()[-3000:]}") from None


def test_flux_settings_follow_the_base_model(demo_app, page):
    """Picking the demo's FLUX model: the FLUX presets, the FLUX and Chroma settings unfolded (the
    language-model ones folded), the transformer's layer names as LoRA targets, the demo's FLUX training
    settings; back to SD1.5 folds them and puts back the SD1.5 demo settings."""
    from playwright.sync_api import expect

    try:
        page.goto(demo_app.url)
        page.get_by_role("tab", name="3. Training").click()
        expect(page.locator("#memory-estimate")).to_contain_text("not yet measured on a GPU", timeout=30_000)
        expect(page.locator("#cfg-base_quantization")).to_be_hidden()

        _pick(page, "#base-model", "-flux")  # miniature-flux (tiny-flux without its weights)
        expect(page.locator("#model-family")).to_contain_text("FLUX.1", timeout=30_000)
        expect(page.locator("#cfg-base_quantization")).to_be_visible()
        expect(page.locator("#cfg-max_seq_length")).to_be_hidden()
        page.locator("#cfg-target_modules input").click()
        expect(page.get_by_role("option", name="attn.add_q_proj")).to_be_visible()
        page.keyboard.press("Escape")
        page.locator("#preset input").click()
        expect(page.get_by_role("option", name=re.compile(r"^flux_16gb: "))).to_be_visible()
        page.keyboard.press("Escape")
        # The demo's FLUX settings: twice the SD1.5 learning rate (and no min-SNR, under the folded Advanced).
        expect(page.locator("#cfg-learning_rate input")).to_have_value("0.02", timeout=10_000)

        _pick(page, "#base-model", "miniature-sd15")
        expect(page.locator("#model-family")).to_contain_text("Stable Diffusion 1.x", timeout=30_000)
        expect(page.locator("#cfg-base_quantization")).to_be_hidden()
        expect(page.locator("#cfg-learning_rate input")).to_have_value("0.01", timeout=10_000)
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- app log (tail):\n{demo_app.output()[-3000:]}") from None


def _pick(page, dropdown: str, text: str) -> None:
    """Open a dropdown and click the option containing ``text``."""
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=re.compile(re.escape(text))).first.click()
