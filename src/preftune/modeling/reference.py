"""The reference π_ref as a strategy: where its log-probs come from.

* ``frozen copy``   — a deep copy of the in-memory policy taken before training (never reloaded from disk);
* ``checkpoint``    — an explicit reference model loaded from ``ref_model_name_or_path``;
* ``adapters off``  — under LoRA, the policy itself with its adapters disabled (no second model);
* ``precomputed``   — log-probs computed once before training, cached on disk, read from the batch;
* ``none``          — reference-free methods (SimPO, ORPO, CPO, …).

Each strategy answers ``outputs(batch) → {"logps": [S], "token_logps": [M]}`` (or ``None``) for the rows of a
collated batch (a precomputed reference holds summed log-probs only), and ``logps(batch) → [S]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from preftune.data.batching import REF_COLUMNS
from preftune.modeling.logprobs import LogProbModel, model_inputs, unwrap_causal_lm

log = logging.getLogger(__name__)

class NoReference:
    name = "none"

    def outputs(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> dict[str, Tensor] | None:
        return None

    def logps(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> Tensor | None:
        return None


class PrecomputedReference:
    """Reads the ``ref_*_logps`` columns the collator carries: ``[chosen; rejected]`` or ``[y; kl]``."""

    name = "precomputed"

    def outputs(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> dict[str, Tensor]:
        if "ref_chosen_logps" in batch:
            return {"logps": torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])}
        return {"logps": torch.cat([batch["ref_logps"], batch["ref_kl_logps"]])}

    def logps(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> Tensor:
        return self.outputs(batch, token_weights)["logps"]


class ModelReference:
    """A separate frozen model (a copy of the policy, or an explicit checkpoint)."""

    def __init__(self, model: nn.Module, chunk_size: int, name: str, autocast=contextlib.nullcontext):
        self.module = LogProbModel(model, chunk_size).eval().requires_grad_(False)
        self.name = name
        self.autocast = autocast  # the policy's mixed-precision context, so both see the same numerics

    def to(self, device: torch.device) -> ModelReference:
        self.module.to(device)
        return self

    @torch.no_grad()
    def outputs(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> dict[str, Tensor]:
        with self.autocast():
            return self.module(**model_inputs(batch), token_weights=token_weights)

    def logps(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> Tensor:
        return self.outputs(batch, token_weights)["logps"]

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO (Gorbatov et al. 2024): θ_ref ← (1−α)·θ_ref + α·θ."""
        for ref_p, p in zip(self.module.model.parameters(), unwrap_causal_lm(policy).parameters(), strict=True):
            ref_p.lerp_(p.detach().to(ref_p.dtype), alpha)


class AdaptersOffReference:
    """Under LoRA the base model *is* the reference: run the policy with its adapters disabled."""

    name = "adapters off"

    def __init__(self, policy: nn.Module, unwrap):
        self.policy = policy  # the prepared (possibly DDP-wrapped) LogProbModel
        self.unwrap = unwrap

    @torch.no_grad()
    def outputs(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> dict[str, Tensor]:
        peft_model = self.unwrap(self.policy).model
        with peft_model.disable_adapter():
            return self.policy(**model_inputs(batch), token_weights=token_weights)

    def logps(self, batch: dict[str, Tensor], token_weights: Tensor | None = None) -> Tensor:
        return self.outputs(batch, token_weights)["logps"]


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the weights that define the reference (LoRA adapter weights excluded)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(unwrap_causal_lm(model).state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key(*parts: object) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _checksum(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def load_cached(path: Path, rows: int, columns: int = 2) -> np.ndarray | None:
    """Cached reference log-probs ``[rows, columns]`` (two per pair by default), or None when absent or not to be
    trusted: unreadable or truncated, another shape, a checksum that does not match its sidecar ``.json``, or
    non-finite values. Each reason is logged; the caller recomputes and overwrites."""
    meta_path = path.with_suffix(".json")
    if not path.exists():
        return None
    try:
        values = np.load(path, allow_pickle=False)
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, EOFError) as err:
        log.warning("reference cache %s is unreadable (%s: %s); recomputing it", path, type(err).__name__, err)
        return None
    problem = None
    if values.shape != (rows, columns) or meta.get("rows") != rows:
        problem = (f"it holds shape {tuple(values.shape)} ({meta.get('rows')} rows recorded), not "
                   f"({rows}, {columns})")
    elif meta.get("checksum") != _checksum(values):
        problem = "its checksum does not match the values (changed after it was written)"
    elif not np.isfinite(values).all():
        problem = "it holds non-finite values"
    if problem:
        log.warning("reference cache %s is not used: %s; recomputing it", path, problem)
        return None
    return values


def save_cached(path: Path, values: np.ndarray) -> None:
    """Atomic write of the values and their sidecar (row count, checksum): a crash never leaves a partial cache
    under the final name, and :func:`load_cached` can tell a changed file from the one written here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, meta = path.with_suffix(".tmp.npy"), path.with_suffix(".tmp.json")
    try:
        np.save(tmp, values, allow_pickle=False)
        meta.write_text(json.dumps({"rows": int(values.shape[0]), "checksum": _checksum(values)}))
    except OSError:
        tmp.unlink(missing_ok=True)  # a partial file on a full disk keeps it full
        meta.unlink(missing_ok=True)
        raise
    meta.replace(path.with_suffix(".json"))
    tmp.replace(path)


def reference_columns(kind: str) -> tuple[str, str]:
    """Dataset columns of precomputed reference log-probs: ``[chosen, rejected]`` or ``[completion, kl]``."""
    return (REF_COLUMNS[0], REF_COLUMNS[1]) if kind == "paired" else (REF_COLUMNS[2], REF_COLUMNS[3])
