"""The ``--demo``'s training, family by family: how long the Training tab's demo settings take, and how far
the Testing tab's strength grid moves the background toward the concept's pink.

For each image family the demo offers (``lora_studio.ui.demo.DEMO_FAMILIES``), a LoRA is trained by the real
``TrainingJob`` with ``demo_train_settings(family)`` (sample images and checkpoints included, as in the app)
on the demo's concept pictures (captioned as the Captioning tab captions them: trigger first), then rendered
with ``demo_render_settings(family)`` at strengths 0, 0.5 and 1 for four prompts and two seeds.

    python benchmarks/demo_families.py [--families flux,z_image] [--threads 1]

On a 2-core machine that other jobs share, ``--threads 1`` measures the work without the waiting: two torch
threads that wait for each other there made a demo run up to 50 times slower (SD1.5: 6 s with one thread,
17 to 340 s with two while 3 to 5 other processes ran).

Prints one line per family: the training wall time (start to finished, model loading, sample images,
checkpoints and the export included), the process's CPU time over it (every thread together), and the mean
background distance to the pink at each strength (white is about 97 away; under 50 is pink).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SEEDS = (1, 2)
STRENGTHS = (0.0, 0.5, 1.0)


def measure_family(family: str, work: Path) -> tuple[float, float, list[float]]:
    """(training wall seconds, training CPU seconds, background distance at each strength) for the demo settings
    of ``family``."""
    from lora_studio.config import TrainConfig
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_strengths
    from lora_studio.miniature import measure, world
    from lora_studio.training.job import TrainingJob
    from lora_studio.ui.demo import DEMO_TRIGGER, build_demo, demo_render_settings, demo_train_settings

    assets = build_demo(work / "demo")
    data = work / "data"
    if not data.is_dir():
        world.write_dataset(data, world.concept_scenes(12, trigger=DEMO_TRIGGER))
    base = str(assets.models[family])
    cfg = TrainConfig(base_model=base, train_data_dir=str(data), output_dir=str(work / f"runs-{family}"),
                      **demo_train_settings(family)).validate()
    started, cpu = time.perf_counter(), time.process_time()
    job = TrainingJob(cfg).start()
    job.wait(1800)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if job.status != "finished":
        raise RuntimeError(f"{family}: {job.status} {job.error}")
    lora = job.run.path / f"{cfg.output_name}.safetensors"
    render = demo_render_settings(family)
    cache, totals = PipelineCache(), [0.0] * len(STRENGTHS)
    for prompt in PROMPTS:
        for seed in SEEDS:
            settings = RenderSettings(f"{DEMO_TRIGGER}, {prompt}", seed=seed, steps=render["steps"],
                                      cfg=render["cfg"], width=render["size"], height=render["size"])
            for i, image in enumerate(render_strengths(base, lora, settings, STRENGTHS, cache=cache)):
                totals[i] += measure.concept_distance(image)
    cache.clear()
    return seconds, cpu, [round(t / (len(PROMPTS) * len(SEEDS)), 1) for t in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma separated (default: every family the demo offers)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, also in the training thread (OMP_NUM_THREADS); 0: torch's default")
    args = parser.parse_args()
    if args.threads:  # before torch is imported: the training job's thread reads it too
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from lora_studio.ui.demo import DEMO_FAMILIES

    with tempfile.TemporaryDirectory() as tmp:
        for family in (args.families.split(",") if args.families else DEMO_FAMILIES):
            seconds, cpu, curve = measure_family(family, Path(tmp))
            print(f"{family:<11} training {seconds:5.1f} s (CPU {cpu:5.1f} s)   background distance to pink at 0 / 0.5 / 1: "
                  f"{curve[0]:.0f} / {curve[1]:.0f} / {curve[2]:.0f}", flush=True)


if __name__ == "__main__":
    main()
