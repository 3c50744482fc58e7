"""Training speed: LoRA Studio's trainer against a plain loop, on the same small model and data.

The plain loop is what the diffusers example script does: each step it loads the images from disk, encodes
them with the VAE and the captions with the text encoder, then runs the UNet. Ours encodes latents and
text once (cache) and then only runs the UNet. Each variant runs in its own process so peak memory (RSS;
CUDA peak when there is a GPU) is measured separately.

    python benchmarks/bench_train.py [--steps 30] [--size 256] [--images 8]

Prints a table: steps/s, the time from process start to the first training step and to the written LoRA
(imports, model loading, caching, the export and its reload check included), peak memory, and the ratios
ours/plain for the steady speed and for the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A small model whose VAE/UNet cost ratio is closer to SD1.5's than the test model's.
MODEL = dict(unet_channels=(64, 128), vae_channels=(32, 64, 128, 128), vae_layers=2)


def prepare(root: Path, images: int, size: int) -> tuple[Path, Path]:
    from lora_studio.models.tiny import build_tiny_sd15, make_demo_images

    return build_tiny_sd15(root / "model", **MODEL), make_demo_images(root / "data", count=images, size=size)


def run_ours(model: Path, data: Path, out: Path, steps: int, size: int) -> dict:
    from lora_studio.config import TrainConfig
    from lora_studio.training.job import TrainingJob

    from lora_studio.training.events import Progress

    cfg = TrainConfig(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=size,
                      batch_size=2, max_train_steps=steps, save_steps=0, lora_rank=8, mixed_precision="bf16",
                      lr_scheduler="constant").validate()  # the export and its reload check stay on: they are ours
    marks: dict[str, float] = {}

    def on_event(event) -> None:
        if isinstance(event, Progress) and event.total and event.step in (1, 2, steps):
            marks.setdefault(f"step{event.step}", time.perf_counter())

    job = TrainingJob(cfg)
    job.bus.subscribe(on_event)
    job.start().wait()
    if job.status != "finished":
        raise SystemExit(f"training failed: {job.error}")
    done = time.perf_counter()
    steady = (marks[f"step{steps}"] - marks["step2"]) / max(steps - 2, 1)
    return {"steps_per_s": 1 / steady, "first_step_s": since_start(marks["step1"]), "lora_s": since_start(done)}


def since_start(moment: float) -> float:
    """Seconds from this process's start (as the OS recorded it) to ``moment`` (a perf_counter value)."""
    import psutil

    now_wall, now_perf = time.time(), time.perf_counter()
    return (now_wall - (now_perf - moment)) - psutil.Process().create_time()


def run_plain(model: Path, data: Path, out: Path, steps: int, size: int) -> dict:
    """The uncached loop of diffusers' train_text_to_image_lora.py, reduced to its core."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from lora_studio.data.captions import load_captions
    from lora_studio.data.images import list_images, load_image_rgb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
        m.to(device, dtype)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    paths = list_images(data)
    captions = load_captions(data, paths)
    first = None
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [paths[(2 * step + i) % len(paths)] for i in range(2)]
        px = []
        for p in batch:
            img = load_image_rgb(p).resize((size, size))
            px.append(torch.from_numpy(__import__("numpy").asarray(img, dtype="float32") / 127.5 - 1).permute(2, 0, 1))
        pixels = torch.stack(px).to(device, dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tok([captions[p] for p in batch], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            cond = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = since_start(time.perf_counter())
            t0 = time.perf_counter()
    steady = (time.perf_counter() - t0) / max(steps - 1, 1)
    from peft.utils import get_peft_model_state_dict  # and the script's save at the end

    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet))
    return {"steps_per_s": 1 / steady, "first_step_s": first, "lora_s": since_start(time.perf_counter())}


def child(args) -> None:
    import torch

    model, data = Path(args.model), Path(args.data)
    if args.variant == "ours":
        result = run_ours(model, data, Path(args.out), args.steps, args.size)
    else:
        result = run_plain(model, data, Path(args.out) / "plain", args.steps, args.size)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if torch.cuda.is_available():
        result["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--variant", choices=["ours", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model, data = prepare(Path(tmp), args.images, args.size)
        results = {}
        for variant in ("ours", "plain"):
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--data", str(data),
                   "--out", str(Path(tmp) / "out"), "--steps", str(args.steps), "--size", str(args.size)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - started
            line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = {**json.loads(line[7:]), "process_s": wall}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nTraining benchmark, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}")
    print(f"small SD1.5-shaped model {MODEL}, {args.images} images at {args.size}px, batch 2, {args.steps} steps\n")
    cuda = torch.cuda.is_available()
    print(f"| {'loop':<29} | steps/s | to first step (s) | to LoRA written (s) | whole process (s) | peak RSS (GB) |"
          + (" CUDA peak (GB) |" if cuda else ""))
    print("|" + "-" * 31 + "|---------|-------------------|---------------------|-------------------|---------------|"
          + ("----------------|" if cuda else ""))
    names = {"ours": "LoRA Studio (cached)", "plain": "plain loop (encode each step)"}
    for k in ("ours", "plain"):
        r = results[k]
        extra = f" {r.get('cuda_peak_gb', 0):14.2f} |" if cuda else ""
        print(f"| {names[k]:<29} | {r['steps_per_s']:7.2f} | {r['first_step_s']:17.1f} | {r['lora_s']:19.1f} | "
              f"{r['process_s']:17.1f} | {r['peak_rss_gb']:13.2f} |{extra}")
    ratio = results["ours"]["steps_per_s"] / results["plain"]["steps_per_s"]
    whole = results["plain"]["process_s"] / results["ours"]["process_s"]
    print(f"\nsteady speed ours/plain: {ratio:.2f}x; whole process plain/ours: {whole:.2f}x (goal: at least 1.5x)")


if __name__ == "__main__":
    main()
