"""What the Training tab shows about a run: progress bar, numbers, loss curve, log tail, sample, files.

It is built from a job's ``Snapshot`` while a job runs in this process, and from the run folder
(``training.jobs.snapshot_from_run``: ``job.json``, ``metrics.jsonl``, ``samples/``) otherwise, so a browser
refresh or an app restart shows the
same picture.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..training.jobs import Snapshot
from ..training.run_folder import list_runs

LOG_LINES = 40
STATUS_TEXT = {"created": "created", "starting": "starting", "preparing": "preparing (loading the model, reading "
               "images)", "caching": "caching latents", "training": "training", "saving": "saving a checkpoint",
               "exporting": "exporting the LoRA", "verifying export": "checking the exported file",
               "stopping": "stopping after this step", "stopped": "stopped (resumable)", "finished": "finished",
               "failed": "failed"}


def empty_loss_frame() -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")})


def loss_frame(losses: list[tuple[int, float]]) -> pd.DataFrame:
    if not losses:
        return empty_loss_frame()
    return pd.DataFrame({"step": [int(s) for s, _ in losses], "loss": [float(v) for _, v in losses]})


def progress_html(step: int, total: int, status: str, stage: str = "") -> str:
    pct = int(100 * step / total) if total else 0
    label = STATUS_TEXT.get(status, status or "idle")
    if stage and stage not in (status, "training"):
        label += f" ({html.escape(str(stage))})"
    colour = {"failed": "#d9534f", "finished": "#3a9a5b", "stopped": "#c9a227"}.get(status, "var(--color-accent)")
    return (f'<div class="ls-progress"><div class="ls-progress-label">Step {step} / {total or "?"} '
            f'&middot; {pct}% &middot; {html.escape(label)}</div><div class="ls-progress-track">'
            f'<div class="ls-progress-fill" style="width:{pct}%;background:{colour}"></div></div></div>')


def stats_markdown(snap: Snapshot) -> str:
    parts = [f"**Run:** `{snap.run or '-'}`"]
    if snap.it_per_s:
        parts.append(f"**Speed:** {snap.it_per_s:.2f} it/s")
    if snap.eta:
        parts.append(f"**ETA:** {snap.eta}")
    if snap.losses:
        parts.append(f"**Loss:** {snap.losses[-1][1]:.4f}")
    mem = snap.memory
    if "gpu_peak_gb" in mem:
        parts.append(f"**GPU memory:** {mem['gpu_peak_gb']:.1f} GB peak, "
                     f"{mem.get('gpu_reserved_gb', 0):.1f} GB reserved")
    elif "ram_gb" in mem:
        parts.append(f"**Memory:** {mem['ram_gb']:.1f} GB RAM (no GPU)")
    text = " &nbsp;|&nbsp; ".join(parts)
    if snap.error:
        text += f"\n\n**Error:** {snap.error}"
    return text


def log_text(lines: list[str]) -> str:
    return "\n".join(str(line).rstrip() for line in lines[-LOG_LINES:])


def run_choices(output_dir: str | Path, limit: int = 30) -> list[tuple[str, str]]:
    """(label, run folder) for the newest runs, e.g. ``my_lora-20250101-120000 - stopped at 40/100``."""
    out = []
    for run in list_runs(output_dir)[:limit]:
        state = run.read_state()
        status = state.get("status", "?")
        if status in ("training", "starting", "saving"):
            status = "running or interrupted"
        step, total = state.get("step", 0), state.get("total", 0)
        label = f"{run.name}  -  {status} at {step}/{total or '?'}"
        message = str(state.get("message") or "")
        if status == "failed" and message:  # why, in short: the full sentence is shown with Show
            label += ": " + (message if len(message) <= 90 else message[:87].rstrip() + "...")
        out.append((label, str(run.path)))
    return out


def existing_files(paths: list[str]) -> list[str]:
    """The files among ``paths`` (folders such as the diffusers export are left out of the download box)."""
    return [p for p in paths if Path(p).is_file()]
