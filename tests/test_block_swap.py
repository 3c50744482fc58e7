"""Block swap (``blocks_to_swap``): the frozen weights of the last blocks live in CPU memory and visit the device
only while their block computes.

On the CPU a swapped weight at rest is a placeholder of its shape whose every element is NaN (one shared NaN, no
memory), so any computation that touches it outside its block's hooks gives NaN: a step that matches the unswapped
one to the last bit proves the hooks load every weight when it is used, in the forward pass and in the
recomputation of gradient checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.errors import ConfigError
from lora_studio.training.block_swap import BlockSwap, checkpoint_function, is_placeholder, repeated_blocks
from helpers import flow_config, run_job, stop_then_resume
from test_flux import flux_config, tiny_flux  # noqa: F401  (fixture)
from test_flux2 import tiny_klein  # noqa: F401  (fixture)
from test_qwen_image import tiny_qwen_image  # noqa: F401  (fixture)
from test_sd3 import tiny_sd3  # noqa: F401  (fixture)
from test_z_image import tiny_z_image  # noqa: F401  (fixture)


def _tiny_flux_transformer_with_lora():
    from diffusers import FluxTransformer2DModel

    from lora_studio.models.tiny_flux import TRANSFORMER_SHAPE
    from lora_studio.networks import add_network, peft_config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TRANSFORMER_SHAPE, pooled_projection_dim=32, guidance_embeds=True)
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "blocks." in n and n.rsplit(".", 1)[-1] in ("to_q", "to_v")]
    add_network(model, "lora", peft_config("lora", 4, 4.0, targets, dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:  # lora_B starts at zero: random, so every LoRA weight gets a gradient
            p.data.normal_(std=0.1)
    return model


def _flux_inputs(batch: int = 2, tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, tokens, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.rand(batch, generator=g),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.ones(batch),
                return_dict=False)


def _step(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**inputs)[0].pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_is_full(model) -> bool:
    lora = [p for p in model.parameters() if p.requires_grad]
    return bool(lora) and not any(is_placeholder(p) for p in lora)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_swapped_transformer_gives_the_same_loss_and_lora_gradients(checkpointing):
    model = _tiny_flux_transformer_with_lora()
    swapped = copy.deepcopy(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing(checkpoint_function)
        model.train(), swapped.train()
    blocks = repeated_blocks(swapped)
    assert len(blocks) == 4  # 2 double + 2 single blocks, in that order
    swap = BlockSwap.attach(swapped, 3, torch.device("cpu"))
    assert swap.blocks == blocks[1:] and swap.is_resting()
    frozen = [p for b in blocks[1:] for p in b.parameters() if not p.requires_grad]
    assert frozen and all(is_placeholder(p) and p.untyped_storage().nbytes() == 4 for p in frozen)
    assert not any(is_placeholder(p) for p in blocks[0].parameters())
    assert [p.shape for b in blocks for p in b.parameters()] == [p.shape for b in repeated_blocks(model)
                                                                 for p in b.parameters()]  # what loaders read
    inputs = _flux_inputs()
    for _ in range(2):  # twice: the hooks put back what the first step took
        expected_loss, expected = _step(model, inputs)
        loss, grads = _step(swapped, inputs)
        assert loss == expected_loss
        assert grads.keys() == expected.keys() and all(torch.equal(grads[k], expected[k]) for k in expected)
        assert any(g.abs().sum() > 0 for g in grads.values())
        # between steps: every swapped frozen weight is its placeholder, the LoRA is whole
        assert swap.is_resting() and not swap.loaded and _lora_is_full(swapped)
        model.zero_grad(), swapped.zero_grad()
    frozen = sum(p.numel() * p.element_size() for b in repeated_blocks(model)[1:] for p in b.parameters()
                 if not p.requires_grad)
    assert swap.stored_bytes() == frozen and swap.traffic_per_step(checkpointing) == frozen * (1 + checkpointing)


def test_the_placeholders_catch_a_weight_used_outside_its_block_hooks():
    """Without the hooks, the NaN placeholders spoil the output: the equality above is not luck."""
    model = _tiny_flux_transformer_with_lora()
    with torch.no_grad():
        assert torch.isfinite(model(**_flux_inputs())[0]).all()
        swap = BlockSwap.attach(model, 1, torch.device("cpu"))
        assert torch.isfinite(model(**_flux_inputs())[0]).all()
        for handle in swap._handles:
            handle.remove()
        assert torch.isnan(model(**_flux_inputs())[0]).all()


def test_diffusers_early_stop_checkpointing_would_leave_a_block_loaded():
    """Why ``checkpoint_function``: with diffusers' default (non-reentrant, early stop) the recomputation ends at the
    last saved tensor, before the block's post-hook, and the block's weights stay on the device after backward."""
    model = _tiny_flux_transformer_with_lora()
    model.enable_gradient_checkpointing()
    model.train()
    swap = BlockSwap.attach(model, 3, torch.device("cpu"))
    _step(model, _flux_inputs())
    assert swap.loaded and not swap.is_resting()
    model.zero_grad()
    model.enable_gradient_checkpointing(checkpoint_function)
    _step(model, _flux_inputs())
    assert swap.is_resting()


def test_the_weights_follow_the_model_dtype_and_detach_restores_them():
    model = _tiny_flux_transformer_with_lora()
    reference = copy.deepcopy(model)
    swap = BlockSwap.attach(model, 4, torch.device("cpu"))
    model.to(torch.bfloat16)  # as the export check's dtype changes do: the placeholders carry the dtype
    reference.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _flux_inputs().items()}
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference(**inputs)[0])
    swap.detach()
    assert not any(is_placeholder(p) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def _prepared(make_config, model, data, out, **changes):
    from lora_studio.training.events import EventBus
    from lora_studio.training.job import make_trainer
    from lora_studio.training.run_folder import RunFolder

    cfg = make_config(model, data, out, gradient_checkpointing=True, **changes)
    trainer = make_trainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    trainer.prepared_models = [trainer.accelerator.prepare(trainer.denoiser)]  # as the loop does (moves to device)
    return trainer


@pytest.mark.parametrize(("model_fixture", "count", "quantization"),
                         [("tiny_flux", 3, "none"), ("tiny_flux", 4, "fp8"), ("tiny_qwen_image", 2, "none"),
                          ("tiny_z_image", 3, "fp8"), ("tiny_sd3", 2, "none"), ("tiny_klein", 2, "none")])
def test_a_training_step_with_blocks_to_swap_matches_the_one_without(model_fixture, count, quantization, demo_images,
                                                                    tmp_path, request):
    """The trainer's own step (prepare, accelerate's prepare, compute_loss, backward) of every flow family: same loss
    and same LoRA gradients; after accelerate moved the model to the device the swapped weights are still
    placeholders."""
    model, make = request.getfixturevalue(model_fixture), flow_config
    mp = "bf16" if quantization == "fp8" else "no"
    plain = _prepared(make, model, demo_images, tmp_path / "a", base_quantization=quantization, mixed_precision=mp)
    swapped = _prepared(make, model, demo_images, tmp_path / "b", base_quantization=quantization, mixed_precision=mp,
                        blocks_to_swap=count)
    assert plain.block_swap is None and len(swapped.block_swap.blocks) == count
    swapped.load_trainable_state(plain.trainable_state())  # the same LoRA initialisation (the global generator's)
    assert swapped.block_swap.is_resting() and _lora_is_full(swapped.denoiser)
    if quantization == "fp8":
        assert {cpu.dtype for slots in swapped.block_swap.slots for *_, cpu in slots} >= {torch.float8_e4m3fn}
    for step in range(2):
        batch = plain.batches(0)[step]
        expected, loss = plain.compute_loss(batch), swapped.compute_loss(batch)
        expected.backward(), loss.backward()
        assert loss.item() == expected.item()
        want = {n: p.grad for n, p in plain.denoiser.named_parameters() if p.requires_grad}
        got = {n: p.grad for n, p in swapped.denoiser.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys() and any(g is not None for g in want.values())
        assert all(torch.equal(got[k], want[k]) if want[k] is not None else got[k] is None for k in want)
        assert swapped.block_swap.is_resting() and _lora_is_full(swapped.denoiser)
        for t in (plain, swapped):
            for p in t.denoiser.parameters():
                if p.grad is not None:
                    p.data -= 0.1 * p.grad
                    p.grad = None


def test_a_run_with_blocks_to_swap_renders_exports_and_resumes_exactly(tiny_flux, demo_images, tmp_path):  # noqa: F811
    changes = dict(blocks_to_swap=3, gradient_checkpointing=True, max_train_steps=4, save_steps=2,
                   validation_split=0.25)
    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "a", sample_prompt="a red circle", sample_steps=4,
                              **changes))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("blocks_to_swap: the frozen weights of the last 3 blocks" in line for line in log), log
    passed = [line for line in log if "Export check passed" in line]
    # strength 0 against the base within float32 rounding: the swapped weights are copies at other addresses, and
    # the CPU's matrix kernels round by alignment (the unswapped model's weights are views of the loaded file)
    assert passed and float(passed[0].split("strength 0 vs base ")[1].split()[0].rstrip(")")) < 1e-5, log
    assert (job.run.samples_dir / "step_000004.png").is_file()
    full = [loss for _, loss in job.snapshot().losses]

    from lora_studio.training.run_folder import RunFolder

    resumed = stop_then_resume(flux_config(tiny_flux, demo_images, tmp_path / "b", verify_export=False, **changes),
                               stop_at=2)
    assert [m["loss"] for m in RunFolder(resumed.run.path).read_metrics()] == pytest.approx(full, rel=1e-6)


def test_blocks_to_swap_says_what_it_needs():
    base = dict(base_model="m", train_data_dir="d", blocks_to_swap=4)
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        TrainConfig(**base).validate()
    for mode in ("nf4", "int8"):
        with pytest.raises(ConfigError, match=f"cannot swap {mode} weights.*fp8"):
            TrainConfig(**base, gradient_checkpointing=True, base_quantization=mode).validate()
    for mode in ("none", "fp8"):
        assert TrainConfig(**base, gradient_checkpointing=True, base_quantization=mode).validate().blocks_to_swap == 4
    with pytest.raises(ConfigError, match="out of range"):
        TrainConfig(base_model="m", train_data_dir="d", blocks_to_swap=-1).validate()


def test_a_family_without_transformer_blocks_and_too_many_blocks_are_said(tiny_flux, tiny_llm,  # noqa: F811
                                                                                      demo_images, tmp_path):
    from lora_studio.training.events import EventBus
    from lora_studio.training.job import make_trainer
    from lora_studio.training.run_folder import RunFolder

    cfg = TrainConfig(base_model=str(tiny_llm), train_data_dir=str(demo_images), output_dir=str(tmp_path),
                      blocks_to_swap=2, gradient_checkpointing=True).validate()
    with pytest.raises(ConfigError, match="causal language model has no transformer blocks to swap: set it to 0"):
        make_trainer(cfg, RunFolder.create(cfg), EventBus())
    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "out", blocks_to_swap=41, gradient_checkpointing=True,
                              max_train_steps=1, verify_export=False))  # the 12 GB preset's count on the tiny model
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("blocks_to_swap 41 is more than this transformer's 4 blocks: all 4 are swapped." in line
               for line in log), log


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_the_export_check_on_the_swapped_training_pipeline(quantization, tiny_flux, demo_images, tmp_path,  # noqa: F811
                                                           monkeypatch):
    """On a GPU a swapping run checks its export on the training pipeline (no room for a second transformer): the
    file is loaded as a second adapter into the swapped transformer, in bf16 as training held it."""
    from lora_studio.training.flux import FluxTrainer

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    monkeypatch.setattr(FluxTrainer, "fresh_pipeline_fits", lambda self, pipe: False)
    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "out", max_train_steps=2, mixed_precision="bf16",
                              base_quantization=quantization, blocks_to_swap=4, gradient_checkpointing=True))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("on the training pipeline" in line for line in log), log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0], log  # the same (swapped) weights on both sides


def test_data_parallel_skips_the_swapped_weights_when_it_broadcasts(tmp_path):
    """DistributedDataParallel broadcasts every parameter at setup; the placeholders are left out (one gloo
    process here: the broadcast happens all the same)."""
    import torch.distributed as dist

    model = _tiny_flux_transformer_with_lora()
    model.enable_gradient_checkpointing(checkpoint_function)
    model.train()
    reference = copy.deepcopy(model)
    swap = BlockSwap.attach(model, 3, torch.device("cpu"))
    assert len(model._ddp_params_and_buffers_to_ignore) == sum(len(slots) for slots in swap.slots)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'group'}")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss, grads = _step(ddp, _flux_inputs())
    finally:
        dist.destroy_process_group()
    expected_loss, expected = _step(reference, _flux_inputs())
    assert loss == expected_loss and all(torch.equal(grads[f"module.{k}"], g) for k, g in expected.items())
    assert swap.is_resting()


def test_a_swapping_run_on_a_gpu_checks_its_export_on_the_training_pipeline():
    """No second transformer is loaded onto a GPU whose run had to swap blocks (the placeholders hold no memory,
    so counting the pipeline's weights would wrongly say a second one fits)."""
    from types import SimpleNamespace

    from lora_studio.training.flux import FluxTrainer

    run = SimpleNamespace(block_swap=object(), accelerator=SimpleNamespace(device=torch.device("cuda")))
    assert FluxTrainer.fresh_pipeline_fits(run, pipe=None) is False


def test_out_of_memory_advice_names_blocks_to_swap_for_the_transformer_families():
    from lora_studio.training.loop import out_of_memory_advice

    cfg = TrainConfig(base_quantization="fp8", gradient_checkpointing=True, blocks_to_swap=41).validate()
    assert "a larger blocks_to_swap keeps more of the transformer in CPU memory (now 41)" in out_of_memory_advice(
        cfg, "flux")
    assert "blocks_to_swap" not in out_of_memory_advice(TrainConfig(), "sd15")


def test_the_host_copies_are_packed_into_few_power_of_two_slabs():
    """Pinned memory is allocated in powers of two: the copies share slabs of one power-of-two size, first fit,
    each copy aligned, equal to its original."""
    from lora_studio.training.block_swap import HostStore

    torch.manual_seed(0)
    tensors = [torch.randn(1000, 70), torch.randn(3), torch.randn(300, 300).to(torch.bfloat16), torch.randn(()),
               torch.zeros(0), torch.randn(5, 7).to(torch.float8_e4m3fn)]
    store = HostStore(tensors, pin=False)
    assert store.slab_bytes == HostStore.SLAB_BYTES and len(store.used) == 1  # all fit one 256 MiB slab
    copies = [store.copy(i, t) for i, t in enumerate(tensors)]
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c.float(), t.float())
        assert c.numel() == 0 or (c.data_ptr() - store.slabs[0].data_ptr()) % HostStore.ALIGN == 0
    assert store.nbytes() == sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)

    mb = 2**20
    big = HostStore([torch.empty(n * mb, dtype=torch.uint8, device="meta") for n in (300, 100, 300, 100)], pin=False)
    assert big.slab_bytes == 512 * mb  # the largest weight's power of two
    assert big.places == [(0, 0), (0, 300 * mb), (1, 0), (0, 400 * mb)]  # first fit
    assert big.used == [500 * mb, 300 * mb]
