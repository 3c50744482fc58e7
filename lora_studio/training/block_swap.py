"""Block swap (``blocks_to_swap``, sd-scripts' name): the frozen weights of the transformer's last N blocks live in
CPU memory and visit the GPU only while their block computes, so a model larger than the card trains.

    swap = BlockSwap.attach(transformer, count, device)   # after the LoRA is added, before transformer.to(device)
    transformer.to(device)                                 # moves everything else; the swapped weights stay put
    swap.stored_bytes(), swap.traffic_per_step(checkpointing)

How: frozen weights never change, so "offloading" a block is only dropping its GPU copy. Each swapped frozen
parameter keeps its full tensor in CPU memory (``HostStore``: pinned slabs when the device is CUDA); at rest it is
a placeholder on the device with the parameter's shape and dtype but no memory (one shared NaN expanded with zero
strides: loaders read the shape, a computation that uses it by mistake gives NaN). The copy is loaded to the
device and dtype the placeholder names (``model.to(dtype)`` converts the placeholder, which then holds memory:
do that on the CPU only). A forward pre-hook on the block puts a new parameter with a copy on the device in each
place (``non_blocking`` from pinned memory), a forward post-hook puts the placeholders back. New parameter objects,
not new ``.data``: autograd keeps what the backward pass needs by itself (``F.linear`` saves a view of the weight,
a norm's ``x * weight`` the parameter object it saw, whose ``.data`` must not change). With gradient checkpointing
(non-reentrant, without early stop: ``checkpoint_function``) the recomputation in the backward pass goes through
the same hooks: load, compute, drop. The LoRA's weights (trainable) are never touched: they stay on the GPU.

Without gradient checkpointing autograd holds every block's weights until the backward pass, so nothing is saved;
the config asks for it. Quantizations whose weights are objects of their own (nf4's packed 4-bit tensors with
their quantization state, torchao's int8 tensors) are not swapped (the config says so): fp8 and unquantized are.

The cost: every step moves the swapped weights to the GPU once in the forward pass and once more in the
recomputation (``traffic_per_step``); on PCIe 4.0 x16 (about 25 GB/s in practice) that is 0.04 s a GB.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch

PCIE_GB_PER_S = 25.0  # PCIe 4.0 x16 host-to-device from pinned memory, about what it reaches in practice


def step_traffic(stored: float, checkpointing: bool) -> float:
    """What a step moves to the GPU when ``stored`` (bytes, or GB) are swapped: the forward pass, plus the
    recomputation with gradient checkpointing. Used by ``BlockSwap`` and by the estimate (``memory_flux``)."""
    return stored * (2 if checkpointing else 1)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks in order: the blocks of its top-level ModuleLists whose class is
    one of diffusers' ``_repeated_blocks`` (FLUX: double then single blocks; Z-Image: its refiners, then its
    layers), or, for a model that names none (SD3), of every top-level ModuleList of at least two blocks of one
    class."""
    named = set(getattr(model, "_repeated_blocks", None) or ())
    blocks: list[torch.nn.Module] = []
    for child in model.children():
        if not isinstance(child, torch.nn.ModuleList) or not len(child):
            continue
        kinds = {type(b).__name__ for b in child}
        if (named and kinds <= named) or (not named and len(kinds) == 1 and len(child) > 1):
            blocks.extend(child)
    return blocks


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A weight's stand-in at rest: its shape, dtype and device (what loaders such as diffusers' LoRA loader read),
    no memory (one NaN that every placeholder of this dtype and device shares, expanded with zero strides), and
    NaN in any computation that uses it by mistake."""
    key = (dtype, torch.device(device))
    if key not in _NAN:
        fill = float("nan") if dtype.is_floating_point else 0
        _NAN[key] = torch.full((), fill, dtype=dtype, device=device)
    return _NAN[key].expand(shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``placeholder`` (all strides zero)."""
    return tensor.dim() > 0 and all(s == 0 for s in tensor.stride()) or tensor.numel() == 0


_NAN: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def checkpoint_function(module, *args):
    """diffusers' gradient checkpointing (non-reentrant) without early stop: the recomputation runs the whole block,
    so its forward post-hook drops the weights again (with early stop it would end at the last saved tensor, before
    the hook, and leave the block's weights on the GPU)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, early_stop=False)


class HostStore:
    """The swapped weights' copies in CPU memory, packed into a few large buffers (pinned when the device is CUDA).

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two, so pinning each weight alone
    would waste up to half the pinned RAM (a 37.7 MB FLUX.1 feed-forward weight in fp8 takes 64 MB). The weights
    are laid out first-fit in slabs of one power-of-two size (256 MiB, or the largest weight's power of two), each
    slab allocated when its first weight is copied: the waste is at most the end of each slab, and a weight's
    original memory is freed as soon as it is copied.
    """

    SLAB_BYTES = 256 * 2**20
    ALIGN = 512  # bytes: every copy starts aligned (DMA, and views of any dtype)

    def __init__(self, tensors: list[torch.Tensor], pin: bool):
        self.pin = pin
        sizes = [-(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN for t in tensors]
        self.slab_bytes = max(self.SLAB_BYTES, 1 << (max(sizes, default=1) - 1).bit_length())
        used: list[int] = []
        self.places: list[tuple[int, int]] = []  # (slab, offset) of each tensor, in order
        for size in sizes:
            slab = next((i for i, u in enumerate(used) if u + size <= self.slab_bytes), len(used))
            if slab == len(used):
                used.append(0)
            self.places.append((slab, used[slab]))
            used[slab] += size
        self.used = used
        self.slabs: list[torch.Tensor | None] = [None] * len(used)

    def copy(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Tensor number ``index`` (in the order given) copied into its place; returns the copy."""
        slab, offset = self.places[index]
        if self.slabs[slab] is None:
            self.slabs[slab] = torch.empty(self.used[slab], dtype=torch.uint8, pin_memory=self.pin)
        nbytes = tensor.numel() * tensor.element_size()
        if not nbytes:
            return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin)
        out = self.slabs[slab][offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor)
        return out

    def nbytes(self) -> int:
        """Bytes the buffers take (before the allocator's rounding)."""
        return sum(self.used)


class BlockSwap:
    """The swapped blocks of one model and their hooks (``attach``; ``detach`` puts every weight back)."""

    def __init__(self, blocks: Iterable[torch.nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.blocks = list(blocks)
        # per block: (module, parameter name, the resting parameter, its full tensor in CPU memory)
        self.slots: list[list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.Tensor]]] = []
        self.loaded: set[int] = set()
        self._handles = []
        found: dict[int, torch.nn.Parameter] = {}  # a parameter two modules share is stored once
        layout = [[(m, n, p) for m in b.modules() for n, p in m._parameters.items() if p is not None
                   and not p.requires_grad] for b in self.blocks]
        for _, _, p in (slot for slots in layout for slot in slots):
            found.setdefault(id(p), p)
        self.store = HostStore([p.data for p in found.values()],
                               pin=self.device.type == "cuda" and torch.cuda.is_available())
        copies: dict[int, torch.Tensor] = {}
        for i, (key, p) in enumerate(found.items()):
            copies[key] = self.store.copy(i, p.data.to("cpu"))
            p.data = placeholder(p.shape, p.dtype, self.device)  # the original memory goes now
        for index, block in enumerate(self.blocks):
            self.slots.append([(m, n, p, copies[id(p)]) for m, n, p in layout[index]])
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre, index)))
            self._handles.append(block.register_forward_hook(functools.partial(self._post, index)))

    @classmethod
    def attach(cls, model: torch.nn.Module, count: int, device: torch.device) -> "BlockSwap":
        """Swap the frozen weights of the last ``count`` of ``model``'s repeated blocks (``repeated_blocks``)."""
        blocks = repeated_blocks(model)
        if count > len(blocks):
            raise ValueError(f"blocks_to_swap {count}: this model has {len(blocks)} blocks")
        swap = cls(blocks[len(blocks) - count:], device)
        # DistributedDataParallel broadcasts every parameter at setup, into the placeholders too (it cannot write
        # into a zero-stride tensor); the frozen weights are the same files on every process, so it skips them
        resting = {id(rest) for slots in swap.slots for _, _, rest, _ in slots}
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", None) or [])
        model._ddp_params_and_buffers_to_ignore = ignored + [n for n, p in model.named_parameters()
                                                             if id(p) in resting and n not in ignored]
        return swap

    # --- the hooks ----------------------------------------------------------------------------------
    def _pre(self, index: int, module, args) -> None:
        for other in list(self.loaded - {index}):  # a block whose post-hook did not run (an error in its forward)
            self.drop(other)
        self.load(index)

    def _post(self, index: int, module, args, output) -> None:
        self.drop(index)

    def load(self, index: int) -> None:
        """The block's frozen weights as new parameters on the device (and in the dtype) their resting
        placeholders name. New objects, not new ``.data``: an operation that saved a parameter itself for the
        backward pass (a norm's ``x * weight``) keeps the tensor it saw when the block drops its weights."""
        if index in self.loaded:
            return
        for module, name, rest, cpu in self.slots[index]:
            data = cpu.to(rest.device, rest.dtype, non_blocking=True)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
        self.loaded.add(index)

    def drop(self, index: int) -> None:
        """The block's resting parameters (placeholders) back in place."""
        for module, name, rest, _ in self.slots[index]:
            module._parameters[name] = rest
        self.loaded.discard(index)

    def detach(self) -> None:
        """Hooks removed and every swapped weight back in its own parameter, on the device its placeholder names."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index in range(len(self.blocks)):
            self.drop(index)
            for _, _, rest, cpu in self.slots[index]:
                rest.data = cpu.to(rest.device, rest.dtype)
        self.slots = [[] for _ in self.blocks]

    # --- sizes --------------------------------------------------------------------------------------
    def is_resting(self) -> bool:
        """Every swapped weight is its placeholder (none left on the device)."""
        return all(getattr(module, name) is rest and is_placeholder(rest)
                   for slots in self.slots for module, name, rest, _ in slots)

    def stored_bytes(self) -> int:
        """Bytes of the swapped weights, as stored in CPU memory."""
        unique = {id(cpu): cpu for slots in self.slots for *_, cpu in slots}
        return sum(cpu.numel() * cpu.element_size() for cpu in unique.values())

    def traffic_per_step(self, checkpointing: bool) -> int:
        """Bytes moved to the GPU per training step: the forward pass, plus the recomputation with checkpointing."""
        return int(step_traffic(self.stored_bytes(), checkpointing))

    def describe(self, checkpointing: bool) -> str:
        """One sentence for the log: how many blocks, how much stays in CPU memory, the PCIe traffic a step."""
        gb, traffic = self.stored_bytes() / 1e9, self.traffic_per_step(checkpointing) / 1e9
        return (f"blocks_to_swap: the frozen weights of the last {len(self.blocks)} blocks ({gb:.2f} GB) stay in CPU "
                f"memory and visit the GPU block by block: {traffic:.2f} GB over PCIe a step (about "
                f"{traffic / PCIE_GB_PER_S:.2f} s at {PCIE_GB_PER_S:g} GB/s).")
