"""Upload ``final/`` (the model or adapter, its tokenizer and its model card) to the Hugging Face Hub.

Config keys as in transformers' ``TrainingArguments``: ``push_to_hub``, ``hub_model_id`` ("name" or "org/name"),
``hub_private_repo`` and ``hub_token`` (by default the ``HF_TOKEN`` environment variable, else the token saved by
``hf auth login``). The Hub is the one at ``HF_ENDPOINT`` when set (read at each call: a mirror, or a local stand-in
set after import). :func:`check_push` runs before training (``PreferenceTrainer.train``, every method), so that a run
that cannot upload — offline mode, no token, no network, a read-only token — fails in seconds rather than after hours
of training; :func:`push_final` runs after the export (the end of ``PreferenceTrainer._finish``; a run of rounds
pushes its last round's model once). Every failure is a :class:`~preftune.errors.HubError` saying what to do; after
training it also says where the local copy is and how to upload it by hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.config import TrainConfig
from preftune.errors import HubError
from preftune.training import card

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger("preftune")

_TRUE = {"1", "on", "yes", "true"}


def offline() -> bool:
    """Whether the Hub's offline mode is on (``HF_HUB_OFFLINE``, as read now or when huggingface_hub loaded)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE or constants.HF_HUB_OFFLINE


def resolve_token(cfg: TrainConfig) -> str | None:
    """``hub_token`` if given, else ``HF_TOKEN``, else the token ``hf auth login`` saved (None: none of them)."""
    if cfg.hub_token:
        return cfg.hub_token
    from huggingface_hub import get_token

    return get_token()


def _afterwards(cfg: TrainConfig, final_dir: Path | None) -> str:
    if final_dir is None:
        return "or set push_to_hub: false"
    return (f"the model is saved in {final_dir}: upload it later with `hf upload {cfg.hub_model_id} {final_dir}`, "
            "or set push_to_hub: false")


def _ready(cfg: TrainConfig, final_dir: Path | None) -> str:
    """The token to upload with; HubError now when offline mode is on or there is no token."""
    if offline():
        raise HubError(f"push_to_hub: the Hugging Face Hub's offline mode is on (HF_HUB_OFFLINE=1), so nothing can be "
                       f"uploaded to {cfg.hub_model_id}; unset HF_HUB_OFFLINE, {_afterwards(cfg, final_dir)}")
    token = resolve_token(cfg)
    if not token:
        raise HubError(f"push_to_hub: no Hugging Face token to upload to {cfg.hub_model_id}; set the HF_TOKEN "
                       f"environment variable (a token with write access), run `hf auth login`, or give hub_token; "
                       f"{_afterwards(cfg, final_dir)}")
    return token


def endpoint() -> str:
    """The Hub's URL: ``HF_ENDPOINT`` as set now (huggingface_hub reads it once, at import), else its default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or constants.ENDPOINT


def _api(token: str) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _failed(cfg: TrainConfig, what: str, err: Exception, final_dir: Path | None) -> HubError:
    cause = " ".join(str(err).split())[:300]
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        advice = "the token was refused: use a token with write access to that namespace"
    elif status is None:
        advice = f"the Hub at {endpoint()} could not be reached: check the network connection (and HF_ENDPOINT)"
    else:
        advice = f"the Hub answered HTTP {status}"
    return HubError(f"push_to_hub: {what} {cfg.hub_model_id} failed ({type(err).__name__}: {cause}); {advice}; "
                    f"{_afterwards(cfg, final_dir)}")


def check_push(cfg: TrainConfig) -> None:
    """Before training (main process): offline mode, the token and the connection are checked, so that the upload
    at the end cannot fail for a reason known now. Nothing is created or uploaded."""
    if not cfg.push_to_hub:
        return
    token = _ready(cfg, None)
    try:
        user = _api(token).whoami()
    except Exception as err:  # network errors (httpx), HTTP errors: all mean the upload would fail too
        raise _failed(cfg, "checking the token for", err, None) from None
    user = user if isinstance(user, dict) else {}
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":  # a fine-grained token's rights per repository are not known before it writes
        raise HubError(f"push_to_hub: the Hugging Face token of {user.get('name', '?')} is read-only, so nothing can "
                       f"be uploaded to {cfg.hub_model_id}; use a token with write access (HF_TOKEN, `hf auth "
                       "login` or hub_token), or set push_to_hub: false")
    log.info("push_to_hub: final/ will be uploaded to %s as %s at the end of the run", cfg.hub_model_id,
             user.get("name", "?"))


def push_final(cfg: TrainConfig, final_dir: str | Path) -> str:
    """Create ``hub_model_id`` (if needed; ``hub_private_repo``) and upload ``final_dir`` to it as one commit; the
    URL of that commit. Call it on the main process, after ``export_final``."""
    final_dir = Path(final_dir)
    api = _api(_ready(cfg, final_dir))
    try:
        repo = api.create_repo(cfg.hub_model_id, private=cfg.hub_private_repo, exist_ok=True, repo_type="model")
    except Exception as err:
        raise _failed(cfg, "creating the repository", err, final_dir) from None
    card.name_repository(final_dir, repo.repo_id)  # a bare hub_model_id: the namespace is known now
    try:
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(final_dir), repo_type="model",
                                   commit_message=f"preftune: {'+'.join(cfg.methods)} ({final_dir.parent.name})")
    except Exception as err:
        raise _failed(cfg, "uploading final/ to", err, final_dir) from None
    url = getattr(commit, "commit_url", None) or str(commit)
    log.info("pushed %s to %s", final_dir, url)
    return url
