"""Image grids for testing a LoRA: one prompt and seed rendered at several strengths, and across checkpoints.

    cache = PipelineCache()                       # or the module's shared ``default_cache()``
    result = render_grid(base_model, [("final", "out/my_lora.safetensors")], RenderSettings("a cat"),
                         strengths=[0, 0.5, 1.0], out_path="grid.png")
    result.image      # one labelled PIL image: a row per LoRA file, a column per strength
    result.tags       # ["<lora:my_lora:0.5>", "<lora:my_lora:1>"]  (what to paste into A1111/Forge)

Strength 0 turns the LoRA off (``disable_lora``), so its picture is exactly the base model's. Other
strengths use diffusers' ``load_lora_weights`` + ``set_adapters`` and so load kohya/A1111 files, diffusers
files and diffusers LoRA folders alike; DoRA, LoKr and LoHa files load through PEFT
(``export.lycoris.load_into_pipeline``), applied at each strength as A1111/Forge and ComfyUI apply them.
The pipeline and the loaded LoRA files stay cached between calls. No gradio here: the app, the command line
(``generate``) and the tests all call these functions.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError, ModelLoadError, StudioError
from ..export.lycoris import load_into_pipeline
from ..families import get_family
from ..fileio import atomic_write
from ..models.load_lock import model_loading

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_CELLS = 64
Progress = Callable[[int, int, str], None]


@dataclass
class RenderSettings:
    """What every picture of a grid shares: prompt, seed and sampler settings."""

    prompt: str
    negative: str = ""
    seed: int = 42
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None   # None: the model's native size
    height: int | None = None


@dataclass
class GridResult:
    """A rendered grid: the composed image, its cells and labels, and the A1111 tags of its strengths."""

    image: Image.Image
    cells: list[list[Image.Image]]
    row_labels: list[str]
    col_labels: list[str]
    tags: list[str] = field(default_factory=list)
    path: Path | None = None


# --- small helpers --------------------------------------------------------------------------------

def parse_strengths(text: str | Sequence[float] | None) -> list[float]:
    """``"0, 0.5, 1"`` -> ``[0.0, 0.5, 1.0]``; empty gives the defaults. Raises ConfigError on bad values."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return list(DEFAULT_STRENGTHS)
    items = text.replace(";", ",").split(",") if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError("strengths", f"'{str(item).strip()}' is not a number; write e.g. 0, 0.5, 1.") from None
        if not math.isfinite(value) or not -4.0 <= value <= 4.0:
            raise ConfigError("strengths", f"{value} is out of range; use values from -4 to 4 (usually 0 to 1).")
        out.append(value)
    if not out:
        return list(DEFAULT_STRENGTHS)
    return out


def lora_display_name(lora_file: str | Path) -> str:
    """The name A1111 shows for a LoRA file: its file name without extension."""
    p = Path(lora_file)
    return p.name if p.is_dir() else p.stem


def a1111_tag(name: str, strength: float) -> str:
    """``<lora:name:0.8>``, the text to paste into an AUTOMATIC1111/Forge prompt."""
    return f"<lora:{name}:{strength:g}>"


def pick_device(half_dtype: str = "float16") -> tuple[str, Any]:
    """(device, dtype): CUDA in half precision (``half_dtype``, the family's) when available, else the CPU in
    float32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", getattr(torch, half_dtype)
    return "cpu", torch.float32


# --- the cached pipeline --------------------------------------------------------------------------

class PipelineCache:
    """Keeps one base pipeline (and the LoRA files loaded into it) between calls. Thread-safe."""

    MAX_ADAPTERS = 12

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._key: tuple | None = None
        self._pipe = None
        self._family = ""
        self._adapters: dict[tuple, str] = {}
        self._counter = 0

    def pipeline(self, base_model: str, vae: str | None = None, report: Callable[[str], None] | None = None,
                 single_file_config: str | None = None):
        """The pipeline of ``base_model`` (loaded on first use, reused while the model stays the same);
        ``report`` hears how a hub download is going; ``single_file_config`` as in ``load_diffusion_pipeline``."""
        from ..models.detect import detect_family
        from ..models.loading import load_diffusion_pipeline

        with self.lock:
            key = (str(base_model), vae or "", single_file_config or "")
            if self._key == key and self._pipe is not None:
                return self._pipe
            self.clear()
            family = detect_family(str(base_model))
            if not get_family(family).is_image:
                raise ModelLoadError(f"'{base_model}' is a language model; image grids need an image base model "
                                     "(use the language-model comparison instead).")
            device, dtype = pick_device(get_family(family).half_dtype)
            pipe = load_diffusion_pipeline(str(base_model), family, torch_dtype=dtype, vae=vae, report=report,
                                           single_file_config=single_file_config)
            _place(pipe, device)
            pipe.set_progress_bar_config(disable=True)
            self._key, self._pipe, self._family = key, pipe, family
            return pipe

    @property
    def family(self) -> str:
        return self._family

    def adapter(self, lora_file: str | Path) -> str:
        """Load ``lora_file`` into the cached pipeline (once per file version); returns its adapter name."""
        path = Path(lora_file).expanduser()
        if not path.exists():
            raise ModelLoadError(f"The LoRA file '{path}' does not exist.")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        with self.lock:
            if key in self._adapters:
                return self._adapters[key]
            pipe = self._pipe
            if pipe is None:
                raise StudioError("Load a base model before a LoRA file.")
            self._forget_old_versions(key[0])
            if len(self._adapters) >= self.MAX_ADAPTERS:
                pipe.unload_lora_weights()
                self._adapters.clear()
            self._counter += 1
            name = f"lora_{self._counter}"
            try:
                with model_loading(path.name):
                    load_into_pipeline(pipe, path, self._family, name)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise ModelLoadError(f"Could not load the LoRA '{path.name}' into this base model: {first}. "
                                     "Check that the LoRA was trained for this model family.") from None
            self._adapters[key] = name
            return name

    def _forget_old_versions(self, resolved: str) -> None:
        stale = [k for k in self._adapters if k[0] == resolved]
        for k in stale:
            try:
                self._pipe.delete_adapters(self._adapters[k])
            except Exception:  # deleting is only a memory saving
                log.debug("could not delete adapter %s", self._adapters[k], exc_info=True)
            del self._adapters[k]

    def clear(self) -> None:
        """Drop the pipeline and free its memory."""
        with self.lock:
            self._pipe, self._key, self._family = None, None, ""
            self._adapters.clear()
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def _place(pipe, device: str) -> None:
    """On the device; a pipeline the GPU cannot hold whole (FLUX.1 with T5-XXL is about 34 GB in bf16) moves
    model by model to it, and layer by layer (slow, but it renders) when even its largest model does not fit."""
    if device != "cuda":
        pipe.to(device)
        return
    import torch

    sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in pipe.components.values()
             if isinstance(m, torch.nn.Module)]
    room = 0.85 * torch.cuda.get_device_properties(0).total_memory
    if sum(sizes) <= room:
        pipe.to(device)
    elif max(sizes, default=0) <= room:
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()


def model_render_defaults(base_model: str) -> dict[str, float] | None:
    """``{"steps", "cfg"}`` a model is meant to render with when its family's registry entry sets them per model
    (``Family.render_settings``: FLUX.1-dev 28 / 3.5, schnell 4 / 0, Chroma 35 / 5); None for the other families
    (the caller keeps its own defaults) or when the model cannot be read."""
    from ..models.detect import detect_family

    try:
        return get_family(detect_family(str(base_model))).render_settings(str(base_model))
    except StudioError:
        return None


_DEFAULT_CACHE = PipelineCache()


def default_cache() -> PipelineCache:
    """The process-wide cache shared by the app's Testing tab and the command line."""
    return _DEFAULT_CACHE


# --- rendering ------------------------------------------------------------------------------------

def native_size(pipe) -> int:
    """The model's native image size in pixels (512 for SD1.5, 1024 for SDXL and FLUX)."""
    if getattr(pipe, "unet", None) is None:  # transformer pipelines: their default size (Z-Image has none: 1024)
        return int(getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor)
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def render_one(pipe, settings: RenderSettings, adapter: str | None, strength: float) -> Image.Image:
    """One picture: the base model when ``adapter`` is None or ``strength`` is 0, else the LoRA at ``strength``."""
    import torch

    if adapter is None or strength == 0:
        if getattr(pipe, "get_active_adapters", None) and _has_lora(pipe):
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([adapter], adapter_weights=[float(strength)])
    size = native_size(pipe)
    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    with torch.inference_mode():  # the prompt by name: FLUX.2's pipelines take an input image first
        out = pipe(prompt=settings.prompt, num_inference_steps=int(settings.steps), width=int(settings.width or size),
                   height=int(settings.height or size), generator=generator,
                   **guidance_kwargs(pipe, float(settings.cfg), settings.negative), **_prompt_length(pipe))
    return out.images[0]


def guidance_kwargs(pipe, cfg: float, negative: str = "") -> dict[str, Any]:
    """The pipeline's guidance arguments: ``guidance_scale``; for a family that renders with true classifier-free
    guidance (Qwen-Image: ``notes["true_cfg"]`` in its registry entry) ``true_cfg_scale`` with a negative prompt,
    blank when none is given (the guidance is on only with one). No negative prompt for a pipeline that takes none
    (FLUX.2 klein: its own empty one)."""
    import inspect

    from ..families import FAMILIES

    name = type(pipe).__name__
    if any(f.notes.get("true_cfg") and (f.pipeline or "").endswith(":" + name) for f in FAMILIES.values()):
        return {"true_cfg_scale": cfg, "negative_prompt": (negative or " ") if cfg > 1 else None}
    if "negative_prompt" not in inspect.signature(type(pipe).__call__).parameters:
        return {"guidance_scale": cfg}
    return {"guidance_scale": cfg, "negative_prompt": negative or None}


def _prompt_length(pipe) -> dict:
    """FLUX.1, Chroma, SD3 and FLUX.2: prompts as long as their (T5, Qwen3, Mistral) tokenizer allows, at most the
    pipeline's default (512; SD3's 256)."""
    name = type(pipe).__name__
    if name.startswith(("Flux", "Chroma", "StableDiffusion3")):
        from ..models.flux_loading import prompt_length

        return {"max_sequence_length": prompt_length(pipe, 256 if name.startswith("StableDiffusion3") else 512)}
    return {}


def _has_lora(pipe) -> bool:
    try:
        return bool(pipe.get_list_adapters())
    except Exception:
        return False


def render_strengths(base_model: str, lora_file: str | Path, settings: RenderSettings,
                     strengths: Sequence[float] = DEFAULT_STRENGTHS, *, vae: str | None = None,
                     cache: PipelineCache | None = None, progress: Progress | None = None) -> list[Image.Image]:
    """The same prompt and seed at each strength (0 = the base model exactly)."""
    result = render_grid(base_model, [(lora_display_name(lora_file), lora_file)], settings, strengths,
                         vae=vae, cache=cache, progress=progress)
    return result.cells[0]


def render_grid(base_model: str, loras: Sequence[tuple[str, str | Path]], settings: RenderSettings,
                strengths: Sequence[float] = DEFAULT_STRENGTHS, *, vae: str | None = None,
                cache: PipelineCache | None = None, progress: Progress | None = None,
                out_path: str | Path | None = None, single_file_config: str | None = None) -> GridResult:
    """A LoRA-by-strength grid (rows: ``loras`` as (label, file), columns: ``strengths``), labelled.

    The strength-0 picture is rendered once and reused in every row (it is the same base image).
    """
    if not settings.prompt or not settings.prompt.strip():
        raise ConfigError("prompt", "is empty; write what the picture should show.")
    if not loras:
        raise ConfigError("lora", "no LoRA file chosen.")
    strengths = [float(s) for s in strengths] or list(DEFAULT_STRENGTHS)
    if len(loras) * len(strengths) > MAX_CELLS:
        raise ConfigError("strengths", f"{len(loras)} files x {len(strengths)} strengths is more than {MAX_CELLS} "
                          "pictures; choose fewer checkpoints or strengths.")
    cache = cache or default_cache()
    total = len(loras) * len(strengths)
    done = 0
    with cache.lock:
        pipe = cache.pipeline(base_model, vae, single_file_config=single_file_config,
                              report=(lambda text: progress(0, total, text)) if progress is not None else None)
        base_image: Image.Image | None = None
        cells: list[list[Image.Image]] = []
        for label, lora_file in loras:
            adapter = cache.adapter(lora_file)
            row = []
            for s in strengths:
                if s == 0:
                    if base_image is None:
                        base_image = render_one(pipe, settings, None, 0.0)
                    image = base_image
                else:
                    image = render_one(pipe, settings, adapter, s)
                row.append(image)
                done += 1
                if progress is not None:
                    progress(done, total, f"{label} at {s:g}")
            cells.append(row)
        if _has_lora(pipe):
            pipe.disable_lora()
    row_labels = [label for label, _ in loras]
    col_labels = ["base (0)" if s == 0 else f"strength {s:g}" for s in strengths]
    name = lora_display_name(loras[-1][1])
    tags = [a1111_tag(name, s) for s in strengths if s != 0]
    image = compose_grid(cells, row_labels, col_labels, title=_title(settings))
    result = GridResult(image=image, cells=cells, row_labels=row_labels, col_labels=col_labels, tags=tags)
    if out_path is not None:
        result.path = save_png(image, out_path)
    return result


def _title(settings: RenderSettings) -> str:
    prompt = settings.prompt.strip().replace("\n", " ")
    if len(prompt) > 90:
        prompt = prompt[:87] + "..."
    return f"{prompt}   |   seed {settings.seed}, {settings.steps} steps, CFG {settings.cfg:g}"


# --- composing and saving -------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def compose_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
                 title: str | None = None, min_cell: int = 128) -> Image.Image:
    """Paste ``cells`` into one image with column labels on top, row labels on the left and a title."""
    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    w = max(max((im.width for r in cells for im in r), default=min_cell), min_cell)
    h = max(max((im.height for r in cells for im in r), default=min_cell), min_cell)
    font_size = max(12, min(28, w // 12))
    font = _font(font_size)
    pad = font_size // 2
    top = font_size * 2 + pad * 2 if title else 0
    header = font_size + pad * 2
    left = 0
    if rows > 1 or any(row_labels):
        left = max([int(font.getlength(label)) for label in row_labels] + [0]) + pad * 2
    left = min(left, w)
    grid = Image.new("RGB", (left + cols * w, top + header + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), _fit(draw, title, font, grid.width - 2 * pad), fill="black", font=font)
    for c, label in enumerate(col_labels):
        text = _fit(draw, label, font, w - pad)
        tw = draw.textlength(text, font=font)
        draw.text((left + c * w + (w - tw) / 2, top + pad), text, fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + header + r * h
        if left:
            label = _fit(draw, row_labels[r] if r < len(row_labels) else "", font, left - pad)
            draw.text((pad, y + h / 2 - font_size / 2), label, fill="black", font=font)
        for c, im in enumerate(row):
            cell = im if im.size == (w, h) else im.resize((w, h), Image.Resampling.NEAREST)
            grid.paste(cell.convert("RGB"), (left + c * w, y))
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text`` shortened with '...' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
