"""Share a finished run on the Hugging Face Hub: upload the LoRA, its card and its preview.

    push_to_hub("output/my_lora-20250101-120000")                 # repo id from HF_REPO_ID, token from HF_TOKEN
    push_to_hub(run_dir, "me/my_lora", token="hf_...", private=False)

Uploaded: the exported LoRA files, the diffusers/PEFT folder, ``README.md`` (the LoRA card, whose YAML
header is the Hub's model card metadata), the A1111 sidecar and preview, and ``config.yaml``. Not uploaded:
checkpoints, logs, samples, metrics, the run state and anything hidden. Every failure (offline, no token,
no access) is a ``StudioError`` with one sentence saying what to do; offline mode is detected before any
network attempt.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StudioError

IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "samples/*", "commands/*", "job.json", "metrics.jsonl",
                   "train.log", "*.tmp", ".*", "*/.*"]


def hub_offline() -> bool:
    """True when huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``), read now, not at import time."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers
        return False


def push_to_hub(folder: str | os.PathLike, repo_id: str | None = None, token: str | None = None, *,
                private: bool = True, commit_message: str | None = None) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload the run ``folder``; returns the repo URL.

    ``repo_id`` defaults to ``$HF_REPO_ID`` and ``token`` to ``$HF_TOKEN``. New repos are private unless
    ``private=False``.
    """
    folder = Path(folder)
    repo_id = repo_id or os.environ.get("HF_REPO_ID", "").strip()
    token = token or os.environ.get("HF_TOKEN", "").strip()
    if not folder.is_dir():
        raise StudioError(f"'{folder}' is not a folder; give the run folder that holds the exported LoRA.")
    if not (folder / "README.md").is_file():
        raise StudioError(f"'{folder}' has no README.md (LoRA card); finish or export the run first.")
    if not repo_id or "/" not in repo_id:
        raise StudioError("Give the Hub repository as 'user/name' (or set HF_REPO_ID), e.g. 'me/my_style_lora'.")
    if not token:
        raise StudioError("No Hugging Face token: set HF_TOKEN to a token with write access "
                          "(huggingface.co/settings/tokens).")
    if hub_offline():
        raise StudioError(f"Cannot upload to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1). Unset it "
                          f"and connect to the internet, or copy '{folder}' by hand; nothing was uploaded.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or f"Upload LoRA {folder.name} (LoRA Studio)",
                          ignore_patterns=IGNORE_PATTERNS)
    except OfflineModeIsEnabled:
        raise StudioError("Cannot upload to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1); "
                          "nothing was uploaded.") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise StudioError(f"The Hub refused the upload to '{repo_id}' (HTTP {status}): the token in HF_TOKEN "
                              "needs write access to that repository.") from None
        raise StudioError(f"The Hub refused the upload to '{repo_id}': {str(exc).splitlines()[0]}") from None
    except (OSError, ConnectionError) as exc:
        raise StudioError(f"Cannot reach the Hugging Face Hub ({exc.__class__.__name__}); check the internet "
                          "connection or proxy and try again. Nothing was uploaded.") from None
    except Exception as exc:  # httpx transport errors are not OSError subclasses
        if exc.__class__.__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise StudioError(f"Cannot reach the Hugging Face Hub ({exc.__class__.__name__}); check the internet "
                              "connection or proxy and try again. Nothing was uploaded.") from None
        raise
    return f"https://huggingface.co/{repo_id}"
