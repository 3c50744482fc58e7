"""Several GPUs for one run: the process-group helpers the engine uses, and the launcher the UI calls.

The same command trains on one GPU or on several:

    python -m lora_studio train --config my.yaml                                   # one process
    accelerate launch --multi_gpu --num_processes 2 -m lora_studio train --config my.yaml

Under ``accelerate launch`` (torchrun underneath) every process runs the whole ``train`` command. What
keeps them one run:

- ``process_state()`` is the one place that creates accelerate's ``PartialState``. On a machine without
  CUDA but with several processes it asks for the CPU ("gloo") backend; without that, accelerate treats each
  CPU process as a separate single-process run, and N processes would train N unrelated LoRAs.
- ``broadcast_from_main`` gives every process the run folder that the main process created (each process
  would otherwise name its own folder from its own clock).
- ``any_process`` turns a per-process flag (stop requested, NaN loss) into one decision, so no process
  leaves the loop while the others wait for it in a gradient all-reduce.
- ``accelerator_kwargs`` picks the CPU backend and the DDP options (``find_unused_parameters`` only when
  a text encoder is trained: SDXL conditions on the penultimate layer, so the last layer's LoRA is unused).

- ``mean_over_processes`` makes the logged loss the loss of the whole step, not of process 0's share.

Elsewhere: ``data.train_set.epoch_batches`` gives each process its slice of every global batch (equal
counts), ``latent_cache.encode_latents_shared`` splits the VAE encoding over the processes (no image is
encoded twice), per-sample noise is seeded by the sample's place in the epoch (``Batch.generators``), and
only the main process writes ``job.json``, metrics, TensorBoard, checkpoints, samples and the export.

The app starts such a run with ``process_job.ProcessJob`` and steers it through command files in the run
folder (``RunFolder.request_command``), which the loop's main process takes at every step.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import StudioError

# A run folder chosen before the processes start (the UI's launcher sets it; see RunFolder.create).
ENV_RUN_DIR = "LORA_STUDIO_RUN_DIR"
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


# --- the process group -----------------------------------------------------------------------------
def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value:
            try:
                return max(int(value), 1)
            except ValueError:
                continue
    return 1


def is_distributed() -> bool:
    return world_size() > 1


def use_cpu_backend() -> bool:
    """Several processes and no CUDA: accelerate must be told to use the CPU (gloo) backend."""
    return is_distributed() and not torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` for this process, created the right way the first time.

    The collective timeout is raised to ``COLLECTIVE_TIMEOUT`` (torch's NCCL default is 10 minutes): the
    other processes wait in the next all-reduce while the main process saves a checkpoint or renders a
    sample, which on a slow GPU can take minutes. A process that dies is still noticed at once: the
    launcher then stops the others.
    """
    from accelerate import PartialState

    if not is_distributed():
        return PartialState()
    return PartialState(cpu=use_cpu_backend(), timeout=COLLECTIVE_TIMEOUT)


def is_main_process() -> bool:
    """True in a single-process run and in the main process (rank 0) of a multi-process run."""
    return not is_distributed() or process_state().is_main_process


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` in every process (a picklable value; a no-op with one process)."""
    if not is_distributed():
        return obj
    from accelerate.utils import broadcast_object_list

    process_state()
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def any_process(accelerator, flag: bool) -> bool:
    """True in every process if ``flag`` is true in at least one (one tiny all-reduce)."""
    if accelerator.num_processes <= 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def mean_over_processes(accelerator, value: float) -> float:
    """The mean of ``value`` over all processes (each process's loss -> the loss of the whole step)."""
    if accelerator.num_processes <= 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="mean").item())


def accelerator_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Extra ``Accelerator(...)`` arguments for a multi-process run (none for one process)."""
    if not is_distributed():
        return {}
    from accelerate.utils import DistributedDataParallelKwargs

    process_state()  # the first call decides the backend; make sure it is ours
    return {"cpu": use_cpu_backend(),
            "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=bool(config.train_text_encoder))]}


def check_world(accelerator) -> None:
    """Refuse to run when the launcher started several processes but they did not join one group."""
    if is_distributed() and accelerator.num_processes != world_size():
        raise StudioError(f"{world_size()} processes were started, but accelerate set up {accelerator.num_processes}: "
                          "they would train separate LoRAs. Launch with 'accelerate launch --multi_gpu "
                          "--num_processes N -m lora_studio train ...' (see README, Several GPUs).")


# --- launching (for the UI) ------------------------------------------------------------------------
def available_gpus() -> int:
    """CUDA GPUs this machine has (the Training tab offers a GPU count when there are two or more)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A free local TCP port for the process group's rendezvous (two runs at once must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
