"""Training the miniature Stable Diffusion models from scratch on the CPU (``python -m
lora_studio.miniature.build``).

``sd15``: a byte-level CLIP tokenizer with the world's words as single tokens and a frozen, randomly initialised
2-layer CLIP text encoder whose token embeddings are made distinct (kept in fp32); a VAE (16, 32, 64 channels,
/4) trained alone on world pictures and random colours until it reproduces colours, its latents then rescaled so
the real SD scaling factor 0.18215 gives them unit spread; a UNet (32, 64, 64) trained with epsilon prediction
on the cached latents of world pictures (min-SNR weighted, 10 % empty captions for classifier-free guidance, an
EMA copy saved); a DDPM scheduler.

``sd15_v``: the sd15 miniature's VAE, tokenizer and text encoder, its UNet fine-tuned to v-prediction.

``sdxl``: the sd15 miniature's VAE; two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, 32
wide each, concatenated to 64 as SDXL does), a UNet with SDXL's added conditioning (pooled text embedding and
size/crop time ids) started from the sd15 UNet's weights where shapes match and trained on.

Same seed, same torch version and thread count: same weights. Progress goes to the ``log`` callback."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from . import world
from .recipe import Recipe, ema_update, scaled_images, train_step, warmup_cosine

SCALING_FACTOR = 0.18215
MAX_TOKENS = 20  # the captions are short: 20 positions instead of CLIP's 77 make every step cheaper
Log = Callable[[str], None]


@dataclass
class SDRecipe(Recipe):
    """Steps and sizes of one build. ``scaled(f)`` is the same recipe with every step count times ``f``."""

    step_fields: ClassVar[tuple[str, ...]] = ("vae_steps", "unet_steps", "finetune_steps", "sdxl_steps")

    seed: int = 1300
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    latent_images: int = 8192
    unet_steps: int = 2600
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    empty_caption: float = 0.1
    unknown_words: float = 0.2  # captions that start with a made-up word ("plok, a red circle")
    min_snr_gamma: float = 5.0
    finetune_steps: int = 900  # sd15_v: v-prediction steps on top of the sd15 UNet
    sdxl_steps: int = 1500  # sdxl: steps on top of the sd15 UNet (new text encoders, added conditioning)
    eval_seeds: int = 4  # the build's own check: pictures per colour, and sampling steps
    eval_steps: int = 20

    def scaled(self, factor: float) -> "SDRecipe":
        return scaled_images(super().scaled(factor), self, factor)


# --- components --------------------------------------------------------------------------------------------
def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=world.SIZE,
                         scaling_factor=SCALING_FACTOR)


def new_unet(sdxl: bool = False):
    """The miniature UNet: attention at 8x8 and 4x4 latents (cheap), 64-wide cross-attention."""
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8, **extra)


def new_text_encoder(tokenizer, hidden: int, projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder at seeded random weights (it stays frozen), its token embeddings made
    distinct: every row as long as a layer-normalised vector (sqrt(hidden)), the world's words orthogonal.

    With CLIP's own small random embeddings, two random layers make "orange" and "yellow" (or "purple" and
    "green") 0.9-0.95 alike at the colour's position, and the UNet mixes them up."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size = len(tokenizer)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            projection_dim=hidden, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    spread_word_embeddings(model, [[tokenizer.convert_tokens_to_ids(w + "</w>")] for w in world.WORDS], seed)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def spread_word_embeddings(model, word_tokens: list[list[int]], seed: int) -> None:
    """Make a frozen random text encoder's words distinct: every token embedding as long as a layer-normalised
    vector (sqrt(hidden)) and the words (``word_tokens``: the token ids of each word, which get the same row)
    orthogonal."""
    table = model.get_input_embeddings().weight
    hidden = table.shape[1]
    gen = torch.Generator().manual_seed(seed)
    orthogonal, _ = torch.linalg.qr(torch.randn(hidden, len(word_tokens), generator=gen))
    table.mul_(math.sqrt(hidden) / table.norm(dim=1, keepdim=True).clamp(min=1e-12))  # a zero padding row stays
    for ids, row in zip(word_tokens, orthogonal.T):
        table[ids] = row * math.sqrt(hidden)


def new_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type, steps_offset=1)


# --- the VAE -------------------------------------------------------------------------------------------------
def train_vae(recipe: SDRecipe, log: Log):
    """Reconstruction (L1 + MSE) with a tiny KL term, on world pictures and random colours."""
    torch.manual_seed(recipe.seed + 1)
    vae = fit_vae(new_vae(), recipe, log)
    vae.eval().requires_grad_(False)
    rescale_latents(vae, torch.from_numpy(world.pixels(world.world_scenes(256, seed=recipe.seed + 2))))
    return vae


def fit_vae(vae, recipe, log: Log):
    """Train ``vae`` (``encode(x).latent_dist``, ``decode(z).sample`` of 4-D pictures) for ``recipe.vae_steps`` steps
    of reconstruction (L1 + MSE) with a tiny KL term, on world pictures and random colours; returns it."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps,
                                                pct_start=0.05)
    started = time.time()
    full_size_from = int(recipe.vae_steps * 0.9)
    for step in range(recipe.vae_steps):
        x = _vae_batch(recipe, step, crop=step < full_size_from)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        train_step(loss, opt, sched, vae.parameters())
        if (step + 1) % 200 == 0:
            error = f", colour error {vae_colour_error(vae)}" if (step + 1) % 400 == 0 else ""
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f} ({time.time() - started:.0f}s){error}")
    return vae


def _vae_batch(recipe, step: int, crop: bool) -> torch.Tensor:
    """Pictures for one VAE step: 32 px crops (a quarter of the cost) until the last tenth of the steps, then
    whole 64 px pictures (a quarter as many), so normalisation and attention also see the real size."""
    seed = recipe.seed * 100_003 + step
    if not crop:
        return torch.from_numpy(world.pixels(world.vae_scenes(max(1, recipe.vae_batch // 4), seed=seed)))
    x = torch.from_numpy(world.pixels(world.vae_scenes(recipe.vae_batch, seed=seed)))
    gen = torch.Generator().manual_seed(seed)
    half = world.SIZE // 2
    corners = torch.randint(0, world.SIZE - half + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([img[:, y:y + half, x0:x0 + half] for img, (y, x0) in zip(x, corners)])


@torch.no_grad()
def rescale_latents(vae, sample: torch.Tensor) -> float:
    """Scale the latent space (encoder out, decoder in) so that ``scaling_factor`` gives unit spread.

    An exact re-parametrisation: the means are multiplied by k, the log-variances raised by 2 ln k and the
    decoder's first layer divided by k, so decoded pictures do not change.
    """
    std = float(vae.encode(sample).latent_dist.mean.std())
    k = (1.0 / vae.config.scaling_factor) / std
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight[:, :c] /= k
    return k


@torch.no_grad()
def vae_colour_error(vae, count: int = 64, seed: int = 7) -> dict[str, float]:
    """Mean absolute error in 0-255 units of the pixels and of each picture's mean colour (random colours)."""
    x = torch.from_numpy(world.pixels(world.vae_scenes(count, seed=seed)))
    training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixel = float((recon - x).abs().mean()) * 127.5
    mean = float((recon.mean((2, 3)) - x.mean((2, 3))).abs().mean()) * 127.5
    vae.train(training)
    return {"pixel_mae": round(pixel, 2), "mean_colour_mae": round(mean, 2)}


@torch.no_grad()
def encode_world(vae, recipe: SDRecipe, normalize=None) -> tuple[torch.Tensor, list[str]]:
    """Latents (minus the VAE's shift factor if it has one, times its scaling factor; or ``normalize`` of the
    VAE's means) and captions of ``recipe.latent_images`` world pictures.

    A share of the captions (``recipe.unknown_words``) starts with a made-up word, so the base learns to
    ignore words it does not know, as real models mostly do: "zubi, a red circle" (never one of those
    words) is then a red circle until a LoRA teaches it more."""
    scenes = world.world_scenes(recipe.latent_images, seed=recipe.seed + 3)
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # a FLUX-shaped VAE's
    normalize = normalize or (lambda mean: (mean - shift) * vae.config.scaling_factor)
    chunks = []
    for start in range(0, len(scenes), 256):
        x = torch.from_numpy(world.pixels(scenes[start:start + 256]))
        chunks.append(normalize(vae.encode(x).latent_dist.mean))
    rng = random.Random(recipe.seed + 6)
    captions = [f"{_unknown_word(rng)}, {s.caption}" if rng.random() < recipe.unknown_words else s.caption
                for s in scenes]
    return torch.cat(chunks), captions


def _unknown_word(rng: random.Random) -> str:
    """A made-up word of 3-6 letters that is neither a word of the world nor the concept's trigger."""
    while True:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if word != world.CONCEPT_TRIGGER and word not in world.WORDS:
            return word


# --- text conditioning ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_captions(tokenizers: list, encoders: list, captions: list[str], sdxl: bool) -> dict[str, torch.Tensor]:
    """What the pipeline gives the UNet for each caption, plus one last row for "no caption".

    SD1.x: the text encoder's last hidden states; the unconditional row is the empty prompt's.
    SDXL: both encoders' penultimate hidden states concatenated and the second's pooled projection; the
    unconditional row is zeros (``force_zeros_for_empty_prompt``, as the SDXL pipeline does).
    """
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if sdxl else out[0])
        if sdxl and out[0].ndim == 2:
            pooled.append(out[0])
    cond = {"hidden": torch.cat(hidden, dim=-1)}
    if sdxl:
        cond["pooled"] = pooled[-1]
        for value in cond.values():
            value[-1] = 0
    return cond


# --- the UNet --------------------------------------------------------------------------------------------------
def train_unet(unet, latents: torch.Tensor, caption_rows: torch.Tensor, cond: dict[str, torch.Tensor], steps: int,
               prediction_type: str, recipe: SDRecipe, log: Log):
    """Denoising training on cached latents; returns the EMA copy of the UNet (eval mode, frozen).

    ``caption_rows[i]`` is the row of ``cond`` for latent i; the last row of ``cond`` is "no caption"."""
    from diffusers.training_utils import compute_snr

    scheduler = new_scheduler(prediction_type)
    uncond = len(cond["hidden"]) - 1
    gen = torch.Generator().manual_seed(recipe.seed + 4)
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.0)
    lr_sched = warmup_cosine(opt, steps, warmup=100, floor=0.1, after_warmup=True)
    time_ids = torch.tensor([[world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE]], dtype=torch.float32)
    started, b = time.time(), recipe.unet_batch
    for step in range(steps):
        idx = torch.randint(0, len(latents), (b,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        rows_b = torch.where(torch.rand(b, generator=gen) < recipe.empty_caption, uncond, caption_rows[idx])
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
        kwargs = {"encoder_hidden_states": cond["hidden"][rows_b]}
        if "pooled" in cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"][rows_b], "time_ids": time_ids.expand(b, 6)}
        pred = unet(noisy, t, **kwargs).sample
        snr = compute_snr(scheduler, t)
        weight = snr.clamp(max=recipe.min_snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        loss = (F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * weight).mean()
        train_step(loss, opt, lr_sched, unet.parameters())
        ema_update(ema, unet, step, recipe.ema_decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet ({prediction_type}) step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.time() - started:.0f}s)")
    return ema


# --- checking what it draws ------------------------------------------------------------------------------------
@torch.no_grad()
def colour_accuracy(pipe, seeds: int = 4, steps: int = 20, cfg: float | None = 5.0, **call) -> float:
    """Share of pictures whose dominant colour is the one the prompt names (each colour, ``seeds`` seeds);
    ``call``: more arguments for the pipeline (``cfg`` None: no ``guidance_scale``, Qwen-Image's true guidance is
    in ``call``)."""
    from .measure import dominant_colour

    if cfg is not None:
        call["guidance_scale"] = cfg
    pipe.set_progress_bar_config(disable=True)
    hits = total = 0
    for colour in world.COLOURS:
        gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
        images = pipe(prompt=[f"a {colour} circle"] * seeds, num_inference_steps=steps, generator=gens,
                      height=world.SIZE, width=world.SIZE, **call).images
        hits += sum(dominant_colour(im) == colour for im in images)
        total += len(images)
    return hits / total


# --- the families ------------------------------------------------------------------------------------------------
def _save(pipe, out: Path) -> None:
    """UNet and VAE in fp16; the text encoders stay fp32 (transformers 5 would load them as fp16, and the
    pipeline would then mix Half and Float)."""
    pipe.unet.half()
    pipe.vae.half()
    pipe.save_pretrained(out)


def _sd15_parts(recipe: SDRecipe, out: Path, log: Log):
    from .vocab import write_world_clip_tokenizer

    tokenizer = write_world_clip_tokenizer(out / "tokenizer", world.WORDS, MAX_TOKENS)
    text_encoder = new_text_encoder(tokenizer, 64, seed=recipe.seed)
    vae = train_vae(recipe, log)
    return tokenizer, text_encoder, vae


def _caption_rows(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([row[c] for c in captions])


def build_sd15(out: Path, recipe: SDRecipe, log: Log) -> dict:
    """The SD1.x miniature, epsilon prediction. Returns what the build measured."""
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, vae = _sd15_parts(recipe, out, log)
    latents, captions = encode_world(vae, recipe)
    unique, rows = _caption_rows(captions)
    cond = encode_captions([tokenizer], [text_encoder], unique, sdxl=False)
    torch.manual_seed(recipe.seed + 5)
    unet = train_unet(new_unet(), latents, rows, cond, recipe.unet_steps, "epsilon", recipe, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=new_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    report = {"vae": vae_colour_error(vae),
              "colour_accuracy": colour_accuracy(pipe, recipe.eval_seeds, recipe.eval_steps)}
    _save(pipe, out)
    return report


def _base_pipe(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.unet.to(torch.float32)
    pipe.vae.to(torch.float32)
    return pipe


def build_sd15_v(out: Path, recipe: SDRecipe, log: Log, base: Path) -> dict:
    """The sd15 miniature (in ``base``) with its UNet fine-tuned to v-prediction."""
    pipe = _base_pipe(base)
    latents, captions = encode_world(pipe.vae, recipe)
    unique, rows = _caption_rows(captions)
    cond = encode_captions([pipe.tokenizer], [pipe.text_encoder], unique, sdxl=False)
    pipe.unet = train_unet(pipe.unet, latents, rows, cond, recipe.finetune_steps, "v_prediction", recipe, log)
    pipe.scheduler = new_scheduler("v_prediction")
    report = {"colour_accuracy": colour_accuracy(pipe, recipe.eval_seeds, recipe.eval_steps)}
    _save(pipe, out)
    return report


def build_sdxl(out: Path, recipe: SDRecipe, log: Log, base: Path) -> dict:
    """The SDXL-shaped miniature: the sd15 miniature's VAE, two new text encoders, a UNet with added
    conditioning started from the sd15 UNet (the shapes that match) and trained on."""
    from diffusers import StableDiffusionXLPipeline

    from .vocab import write_world_clip_tokenizer

    sd = _base_pipe(base)
    tokenizers = [write_world_clip_tokenizer(out / name, world.WORDS, MAX_TOKENS)
                  for name in ("tokenizer", "tokenizer_2")]
    encoders = [new_text_encoder(tokenizers[0], 32, seed=recipe.seed + 10),
                new_text_encoder(tokenizers[1], 32, projection=True, seed=recipe.seed + 11)]
    latents, captions = encode_world(sd.vae, recipe)
    unique, rows = _caption_rows(captions)
    cond = encode_captions(tokenizers, encoders, unique, sdxl=True)
    torch.manual_seed(recipe.seed + 12)
    unet = new_unet(sdxl=True)
    missing = unet.load_state_dict(sd.unet.state_dict(), strict=False).missing_keys
    log(f"sdxl unet: {len(missing)} weights new (the added conditioning), the rest from the sd15 miniature")
    unet = train_unet(unet, latents, rows, cond, recipe.sdxl_steps, "epsilon", recipe, log)
    pipe = StableDiffusionXLPipeline(vae=sd.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=new_scheduler("epsilon"), force_zeros_for_empty_prompt=True)
    report = {"colour_accuracy": colour_accuracy(pipe, recipe.eval_seeds, recipe.eval_steps)}
    _save(pipe, out)
    return report
