"""Training speed: LoRA Studio's trainer against a plain loop, on the same small model and data.

The plain loop is what the diffusers example script does: each step it loads the images from disk, encodes
them with the VAE and the captions with the text encoder, then runs the UNet. Ours encodes latents and
text once (cache) and then only runs the UNet. Each variant runs in its own process so peak memory (RSS;
CUDA peak when there is a GPU) is measured separately.

    python benchmarks/bench_train.py [--steps 30] [--size 256] [--images 8] [--family flux]

``--family flux`` compares the FLUX trainer (latents and CLIP + T5 conditioning cached, encoders off) with the
uncached loop of diffusers' ``train_dreambooth_lora_flux.py`` (VAE, CLIP and T5 every step), on a small
FLUX-shaped model (``FLUX_MODEL``).

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
# A small FLUX-shaped model: 2 double + 4 single blocks of width 128, CLIP and T5 of width 128, the SD bench's VAE.
FLUX_MODEL = dict(width=128, transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=32,
                                              num_attention_heads=4, axes_dims_rope=(8, 12, 12)),
                  vae_channels=(32, 64, 128, 128), vae_layers=2)
FLUX_TOKENS = 64  # T5 sequence length of both loops


def prepare(root: Path, images: int, size: int, family: str = "sd15") -> tuple[Path, Path]:
    from lora_studio.models.tiny import build_tiny_sd15, make_demo_images
    from lora_studio.models.tiny_flux import build_tiny_flux

    model = build_tiny_flux(root / "flux", **FLUX_MODEL) if family == "flux" else build_tiny_sd15(root / "model", **MODEL)
    return model, make_demo_images(root / "data", count=images, size=size)


def run_ours(model: Path, data: Path, out: Path, steps: int, size: int) -> dict:
    from lora_studio.config import TrainConfig
    from lora_studio.training.job import TrainingJob

    from lora_studio.training.events import Progress

    cfg = TrainConfig(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=size,
                      batch_size=2, max_train_steps=steps, save_steps=0, lora_rank=8, mixed_precision="bf16",
                      lr_scheduler="constant", max_sequence_length=FLUX_TOKENS).validate()  # export check on: ours
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


class _Clock:
    """Backward and optimizer step of a plain loop, and its timing: from process start to the end of step 1,
    then steps/s, then to the LoRA written."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0
        self.first = self.t0 = 0.0

    def step(self, loss, opt) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad()
        self.done += 1
        if self.done == 1:
            self.first = since_start(time.perf_counter())
            self.t0 = time.perf_counter()

    def result(self, save) -> dict:
        steady = (time.perf_counter() - self.t0) / max(self.steps - 1, 1)
        save()  # the script's save at the end
        return {"steps_per_s": 1 / steady, "first_step_s": self.first, "lora_s": since_start(time.perf_counter())}


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
    clock = _Clock(steps)
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
        clock.step(F.mse_loss(pred.float(), noise.float()), opt)
    from peft.utils import get_peft_model_state_dict

    return clock.result(lambda: StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=get_peft_model_state_dict(unet)))


def run_plain_flux(model: Path, data: Path, out: Path, steps: int, size: int) -> dict:
    """The uncached loop of diffusers' train_dreambooth_lora_flux.py: images through the VAE, captions through
    CLIP and T5 at every step, then the transformer (packed latents, sigmoid noise levels, guidance 1)."""
    import numpy as np
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig

    from lora_studio.data.captions import load_captions
    from lora_studio.data.images import list_images, load_image_rgb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(model)
    vae, tr = pipe.vae, pipe.transformer
    for m in (tr, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
        m.to(device, dtype)
    tr.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    paths = list_images(data)
    captions = load_captions(data, paths)
    clock = _Clock(steps)
    for step in range(steps):
        batch = [paths[(2 * step + i) % len(paths)] for i in range(2)]
        px = torch.stack([torch.from_numpy(np.asarray(load_image_rgb(p).resize((size, size)), dtype="float32")
                                           / 127.5 - 1).permute(2, 0, 1) for p in batch]).to(device, dtype)
        with torch.no_grad():
            latents = (vae.encode(px).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
            embeds, pooled, text_ids = pipe.encode_prompt([captions[p] for p in batch], prompt_2=None, device=device,
                                                          max_sequence_length=FLUX_TOKENS)
        b, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigmas = torch.sigmoid(torch.randn(b, device=device)).view(b, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - sigmas) * latents + sigmas * noise, b, c, h, w)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = tr(hidden_states=noisy, timestep=sigmas.flatten(), guidance=torch.ones(b, device=device),
                      pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
                      return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)
        clock.step(torch.nn.functional.mse_loss(pred.float(), (noise - latents).float()), opt)
    from peft.utils import get_peft_model_state_dict

    return clock.result(lambda: FluxPipeline.save_lora_weights(
        str(out), transformer_lora_layers=get_peft_model_state_dict(tr)))


def child(args) -> None:
    import torch

    model, data = Path(args.model), Path(args.data)
    if args.variant == "ours":
        result = run_ours(model, data, Path(args.out), args.steps, args.size)
    elif args.family == "flux":
        result = run_plain_flux(model, data, Path(args.out) / "plain", args.steps, args.size)
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
    ap.add_argument("--family", choices=["sd15", "flux"], default="sd15")
    ap.add_argument("--variant", choices=["ours", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model, data = prepare(Path(tmp), args.images, args.size, args.family)
        results = {}
        for variant in ("ours", "plain"):
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--data", str(data),
                   "--out", str(Path(tmp) / "out"), "--steps", str(args.steps), "--size", str(args.size),
                   "--family", args.family]
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
    shape = f"small FLUX-shaped model {FLUX_MODEL}, T5 {FLUX_TOKENS} tokens" if args.family == "flux" else \
        f"small SD1.5-shaped model {MODEL}"
    print(f"{shape}, {args.images} images at {args.size}px, batch 2, {args.steps} steps\n")
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
