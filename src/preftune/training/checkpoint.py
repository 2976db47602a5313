"""Checkpoints that are either complete or absent, and the final Hugging Face export.

A checkpoint is written to ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only once every file is
on disk, so a crash mid-write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int | None
) -> Path:
    """Save model, optimizer, scheduler, RNG and loop state; every process must call this."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete preftune checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """``True`` → the latest complete checkpoint in ``output_dir``; a path → that checkpoint."""
    if resume in (None, False):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=true but {output_dir} has no complete checkpoint")
        return found[-1]
    return Path(resume)


def export_final(accelerator: Accelerator, policy, tokenizer, output_dir: str | Path, merged: bool) -> Path:
    """Write ``final/`` (HF model or PEFT adapter, plus tokenizer) atomically; ``final-merged/`` on request."""
    final = Path(output_dir) / "final"
    targets = [(final, False)] + ([(final.with_name("final-merged"), True)] if merged else [])
    state_dict = accelerator.get_state_dict(policy)
    inner = accelerator.unwrap_model(policy).model
    config = getattr(inner, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        # A tokenizer without a pad token got one for training (EOS): the saved config must name it too, as the
        # saved tokenizer does, or a sequence classifier loaded from final/ refuses batches of more than one.
        config.pad_token_id = tokenizer.pad_token_id
    for target, merge in targets:
        tmp = target.with_name(target.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if merge:
                import copy

                copy.deepcopy(inner).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                # The wrapper's state dict prefixes every key with "model."; HF expects them bare.
                weights = {k.removeprefix("model."): v for k, v in state_dict.items()} if state_dict else None
                inner.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        accelerator.wait_for_everyone()
    return final
