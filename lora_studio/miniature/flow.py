"""What the flow-matching miniatures share (FLUX.1, Z-Image, SD3): their recipe, the rectified-flow training loop
on cached latents (``noisy = (1 - s) x + s n``, target ``n - x``, an EMA copy kept) and the FLUX miniature's
16-channel VAE, which the later families reuse as it is (their released models use FLUX.1's VAE too)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .recipe import Recipe, ema_update, scaled_images, train_step, warmup_cosine

Log = Callable[[str], None]
# (generator, batch size) -> noise levels in (0, 1]
SigmaDraw = Callable[[torch.Generator, int], torch.Tensor]
# (model, clean latents, noise, noise levels, latent rows of the batch, generator) -> the loss
FlowLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                    torch.Tensor]


@dataclass
class FlowRecipe(Recipe):
    """A flow-matching miniature's build: transformer steps, batch, learning rate, cached latents and the check."""

    step_fields: ClassVar[tuple[str, ...]] = ("steps",)

    seed: int = 0
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    latent_images: int = 8192
    ema_decay: float = 0.998
    unknown_words: float = 0.2  # captions that start with a made-up word ("plok, a red circle")
    eval_seeds: int = 4
    eval_steps: int = 20

    def scaled(self, factor: float):
        return scaled_images(super().scaled(factor), self, factor)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow point at noise level ``sigmas``: ``(1 - s) x0 + s noise``."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def with_empty_captions(rows: torch.Tensor, uncond: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """The batch's caption rows, each one replaced by ``uncond`` (the row of the empty or blank prompt) with
    probability ``share``: the unconditional model that classifier-free guidance pushes away from."""
    return torch.where(torch.rand(len(rows), generator=gen) < share, uncond, rows)


def captioned_loss(velocity: Callable[..., torch.Tensor], conds: tuple[torch.Tensor, ...], rows: torch.Tensor,
                   empty_caption: float) -> FlowLoss:
    """The ``loss_for`` of a family whose conditioning is tensors indexed by caption row (the last row the empty
    prompt's): each batch's rows, a share ``empty_caption`` of them made empty (``with_empty_captions``), the
    family's ``velocity(model, noisy, sigmas, *conditioning)`` against the target ``noise - latents``."""
    uncond = len(conds[0]) - 1

    def loss_for(model, x0, noise, sigmas, idx, gen):
        chosen = with_empty_captions(rows[idx], uncond, empty_caption, gen)
        pred = velocity(model, noised(x0, noise, sigmas), sigmas, *(c[chosen] for c in conds))
        return torch.nn.functional.mse_loss(pred, noise - x0)

    return loss_for


def train_flow(model: torch.nn.Module, latents: torch.Tensor, draw_sigmas: SigmaDraw, loss_for: FlowLoss,
               recipe: FlowRecipe, log: Log, name: str) -> torch.nn.Module:
    """Train ``model`` for ``recipe.steps`` steps on batches of ``latents``; returns the EMA copy (eval mode,
    frozen). Each step draws the rows, the noise and the noise levels (in that order, from one seeded generator),
    then ``loss_for`` computes the loss (drawing whatever else it needs from the same generator)."""
    gen = torch.Generator().manual_seed(recipe.seed + 4)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    lr_sched = warmup_cosine(opt, recipe.steps, warmup=100, floor=0.1, after_warmup=True)
    started, b = time.time(), recipe.batch
    for step in range(recipe.steps):
        idx = torch.randint(0, len(latents), (b,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        loss = loss_for(model, x0, noise, draw_sigmas(gen, b), idx, gen)
        train_step(loss, opt, lr_sched, model.parameters())
        ema_update(ema, model, step, recipe.ema_decay)
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"{name} transformer step {step + 1}/{recipe.steps} loss {loss.item():.4f} "
                f"({time.time() - started:.0f}s)")
    return ema


def flux_miniature_vae(flux: Path):
    """The FLUX miniature's VAE (16 channels, shift and scaling factors) from its folder, in fp32 and frozen."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(flux, subfolder="vae", torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def measure_and_save(pipe, out: Path, recipe: FlowRecipe, cfg: float | None, vae=None, **call) -> dict:
    """The build's own check (the VAE's colour error, ``vae``: the VAE as it reads 4-D pictures when the pipeline's
    does not; the named colour drawn at guidance ``cfg``, ``call``: more pipeline arguments), then the transformer
    and the VAE in fp16 and the pipeline saved to ``out``. Returns what it measured."""
    from .build_sd import colour_accuracy, vae_colour_error

    report = {"vae": vae_colour_error(vae or pipe.vae),
              "colour_accuracy": colour_accuracy(pipe, recipe.eval_seeds, recipe.eval_steps, cfg=cfg, **call)}
    pipe.transformer.half()
    pipe.vae.half()
    pipe.save_pretrained(out)
    return report
