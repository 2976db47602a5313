"""Checkpoints that are complete or absent, resumes that are the same run, and the final Hugging Face export.

* Atomic: a checkpoint is written to ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` once every file is on
  disk (``trainer_state.json``, then ``checksums.json`` last), so a crash mid-write never leaves a folder that looks
  complete; a failed write (a full disk, whatever the library that hit it raises) removes its ``.tmp`` folder
  instead of leaving it to fill the disk, and says which folder failed.
* Verified: ``checksums.json``, the checkpoint's manifest, lists every file of it with its size and content digest
  (:mod:`preftune.digest`); a resume re-hashes every file and refuses, naming the file, one that is missing, added,
  edited (a flipped byte, a changed weight, another ``global_step``) or damaged on disk.
* Safe to load: the states preftune owns are JSON (``trainer_state.json``) and safetensors (the TR-DPO
  reference's weights); Accelerate's own files (optimizer, scheduler, RNG) are read with ``weights_only`` —
  a pickle that would run code is refused — and a resume whose state does not load fails, naming the file.
  Nothing is registered with ``register_for_checkpointing``, whose files Accelerate loads with full pickle.
* The same run: ``trainer_state.json`` stores the run's fingerprint (:func:`run_fingerprint`); a resume whose
  config, data or model folders differ (by content, not by name or time) is refused, naming what changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as weights_only_load
from safetensors.torch import load_model, save_model
from torch import nn

from preftune.digest import ALGORITHM, file_digest
from preftune.errors import ResumeError, TrainingError
from preftune.modeling.loading import folder_digests, is_peft_model, is_quantized
from preftune.training.card import write_card

log = logging.getLogger("preftune")

STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "reference.safetensors"
CHECKSUMS_FILE = "checksums.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys that change how a run is watched or stored, not what it computes: a resume may change these.
OPERATIONAL_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "run_name", "disable_tqdm", "health_checks", "cache_dir",
    "per_device_eval_batch_size", "precompute_ref_log_probs", "logprob_chunk_size", "eval_dataset", "eval_split",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_token",
})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


# Config keys that may name a local folder the run reads a model (or tokenizer) from.
MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "value_model", "judge")
# The config key that names each split's data (rounds read prompts), for messages.
_DATA_KEYS = {"train": "dataset", "prompts": "dataset", "eval": "eval_dataset", "eval_prompts": "eval_dataset"}


def run_fingerprint(config: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """What makes two runs the same run: every config key that changes the computation (resolved values, so
    ``bf16: null`` and the ``bf16: true`` it became on this machine compare equal), the fingerprints of the
    prepared data (by content, see :func:`preftune.data.formats.load_rows`) and the content digest of every file of
    each local model folder the config names (:data:`MODEL_KEYS`): weights overwritten in place change it."""
    by_path: dict[str, dict[str, str]] = {}  # a folder named twice (model and tokenizer) is read once
    for path in {config[key] for key in MODEL_KEYS if isinstance(config.get(key), str)}:
        by_path[path] = folder_digests(path)
    models = {key: by_path[config[key]] for key in MODEL_KEYS if isinstance(config.get(key), str)}
    return {"config": {k: v for k, v in sorted(config.items()) if k not in OPERATIONAL_KEYS}, "data": dict(data),
            "models": {key: files for key, files in models.items() if files}}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when the runs are the same)."""
    changes = []
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"{key}: {old_cfg.get(key)!r} → {new_cfg.get(key)!r}")
    old_data, new_data = saved.get("data", {}), current.get("data", {})
    for split in sorted(set(old_data) | set(new_data)):
        if old_data.get(split) != new_data.get(split):
            source = new_cfg.get(_DATA_KEYS.get(split, ""))
            changes.append(f"the {split} data{f' {source}' if source else ''} (other rows, or the same file with "
                           "other contents)")
    old_models, new_models = saved.get("models", {}), current.get("models", {})
    for key in sorted(set(old_models) | set(new_models)):
        old, new = old_models.get(key, {}), new_models.get(key, {})
        files = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        if files:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            changes.append(f"the {key} folder {new_cfg.get(key, old_cfg.get(key))}: {shown} (files added, removed "
                           "or overwritten in place)")
    return changes


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int | None, reference: nn.Module | None = None) -> Path:
    """Save model, optimizer, scheduler, RNG and loop state (and a moving reference's weights); every process
    must call this. ``state`` is JSON: the loop's position and the run's fingerprint."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _removed_on_failure(tmp, final, accelerator.is_main_process):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are in before checksums.json
        if accelerator.is_main_process:
            if reference is not None:
                save_model(reference, str(tmp / REFERENCE_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            write_checksums(tmp)  # last: lists every file above with its checksum
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, target: Path, main: bool) -> Iterator[None]:
    """Remove the partial folder ``tmp`` on any exception. An OSError with an errno stays one (the CLI names its file
    and cause: no space left, permission denied), naming ``target`` when it named no file; another error (what
    safetensors or torch.save raise on a full disk) becomes a TrainingError naming ``target``."""
    try:
        yield
    except BaseException as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint on a full disk keeps it full
        if isinstance(err, OSError) and err.errno is not None:
            if err.filename is None:
                err.filename = str(target)
            raise
        if not isinstance(err, Exception):  # an interrupt stays an interrupt
            raise
        cause = str(err).splitlines()[0] if str(err) else ""
        raise TrainingError(f"{target} could not be written ({type(err).__name__}: {cause}); disk full? Free space "
                            f"on the disk of {target.parent} (the partial {tmp.name} was removed) or point output_dir "
                            "at a disk with room, then run again (resume_from_checkpoint=true continues from the "
                            "last complete checkpoint)") from err


def write_checksums(folder: Path) -> None:
    """``checksums.json``: every other file under ``folder`` (relative POSIX path) with its size and content digest."""
    files = {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "digest": file_digest(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=2))


def verify_checkpoint(path: Path) -> None:
    """ResumeError naming the first file of checkpoint ``path`` that is missing, not written with it, or whose
    size or content digest differs from its ``checksums.json`` (cost: one read of every file, see the README)."""
    record_file = path / CHECKSUMS_FILE
    if not record_file.exists():
        raise ResumeError(f"{path} has no {CHECKSUMS_FILE} (written by an older preftune?): its files cannot be "
                          "checked against the checksums written with them, so it is not resumed; resume from "
                          "another checkpoint or start over")
    try:
        record = json.loads(record_file.read_text())
        listed, algorithm = dict(record["files"]), record["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(f"{record_file} could not be read ({type(err).__name__}: {err}); resume from another "
                          "checkpoint or start over") from None
    if algorithm != ALGORITHM:
        raise ResumeError(f"{record_file}: checksums by {algorithm!r}, this preftune writes {ALGORITHM!r}; resume from "
                          "another checkpoint or start over")
    present = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()} - {CHECKSUMS_FILE}
    added = sorted(present - set(listed))
    if added:
        raise ResumeError(f"{path / added[0]}: not written with the checkpoint (absent from its {CHECKSUMS_FILE}); "
                          "remove it, or resume from another checkpoint")
    for name, entry in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            raise ResumeError(f"{file}: missing (listed in {CHECKSUMS_FILE}); the checkpoint is incomplete, resume "
                              "from another checkpoint or start over")
        if file.stat().st_size != entry.get("bytes") or file_digest(file) != entry.get("digest"):
            raise ResumeError(f"{file}: its contents differ from when the checkpoint was written (the checksum in "
                              f"{CHECKSUMS_FILE} does not match: edited, or damaged on disk); resume from another "
                              "checkpoint or start over")


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, after every file of the checkpoint is checked against its
    ``checksums.json`` (:func:`verify_checkpoint`); ResumeError when the checkpoint is incomplete, altered or
    unreadable."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise ResumeError(f"{path} is not a complete preftune checkpoint (no {STATE_FILE}); resume from another "
                          "checkpoint or start over")
    verify_checkpoint(path)
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{path / STATE_FILE} could not be read ({err}); resume from another checkpoint") from None


def check_same_run(path: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse to resume ``path`` (whose state is ``state``) under a run that differs from the one that wrote it."""
    if "run" not in state:
        raise ResumeError(f"{path} has no run fingerprint (written by an older preftune?); it cannot be checked "
                          "to belong to this run, so it is not resumed")
    changes = fingerprint_changes(state["run"], fingerprint)
    if changes:
        raise ResumeError(f"{path} belongs to another run; changed since: {'; '.join(changes)}. Resume with the "
                          "original settings (the run folder's config.yaml) or start a new run in another output_dir")


def load_checkpoint(accelerator: Accelerator, path: str | Path, reference: nn.Module | None = None) -> dict:
    """Restore every process's state from ``path``; ResumeError when any part does not load."""
    path = Path(path)
    state = read_state(path)
    # Accelerate skips an unreadable RNG file with an info line; a resume must not silently differ.
    rng = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    try:
        weights_only_load(rng)
    except Exception as err:
        raise ResumeError(f"{rng}: the random-number state does not load safely ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); the resume would not continue the same "
                          "run. Resume from another checkpoint") from None
    try:
        accelerator.load_state(str(path), strict=_strict_model_load(accelerator, path))
    except Exception as err:
        raise ResumeError(f"{path}: the training state does not load ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); resume from another checkpoint") from None
    if reference is not None:
        file = path / REFERENCE_FILE
        try:
            missing, unexpected = load_model(reference, str(file), strict=False)
        except Exception as err:
            raise ResumeError(f"{file}: the moving reference's weights do not load ({type(err).__name__}: {err})") \
                from None
        if missing or unexpected:
            raise ResumeError(f"{file}: the moving reference's weights do not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return state


# What bitsandbytes adds to a quantized layer's state dict beside its packed weight (4-bit: the blocks' scales and
# codebook, nested ones under double quantization; 8-bit: the rows' scales and the weight layout).
_QUANT_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$|"
                          r"\.(SCB|weight_format)$")


def _strict_model_load(accelerator: Accelerator, path: Path) -> bool:
    """Whether the model state must load key for key: yes, except for a quantized base (QLoRA), whose saved state
    holds bitsandbytes' quantization state, which ``load_state_dict`` does not take back. The base is frozen and
    loads from model_name_or_path as before; the checkpoint must still hold every parameter of the model, and
    nothing but quantization state beside them — else ResumeError."""
    models = [accelerator.unwrap_model(m) for m in accelerator._models]
    if not any(is_quantized(getattr(m, "model", m)) for m in models):
        return True
    file = path / "model.safetensors"
    if not file.exists():
        return True
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as saved:
        saved_keys = set(saved.keys())
    expected = set(models[0].state_dict())
    missing = sorted(expected - saved_keys)
    extra = sorted(k for k in saved_keys - expected if not _QUANT_STATE.search(k))
    if missing or extra:
        raise ResumeError(f"{file}: the model state does not match this model (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}); resume from another checkpoint")
    return False


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """``True`` → the latest complete checkpoint in ``output_dir``; a path → that checkpoint."""
    if resume in (None, False):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ResumeError(f"resume_from_checkpoint=true but {output_dir} has no complete checkpoint; start "
                              "without resume_from_checkpoint")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ResumeError(f"resume_from_checkpoint={resume}: no such checkpoint folder")
    return path


def export_final(accelerator: Accelerator, policy, tokenizer, output_dir: str | Path, merged: bool,
                 config: dict[str, Any] | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Write ``final/`` (HF model or PEFT adapter, plus tokenizer) atomically; ``final-merged/`` on request.

    Given the run's resolved ``config`` (``training.loop.effective_config``) and its ``summary`` (what goes to
    ``summary.json``), each folder also gets its model card, ``README.md`` (:mod:`preftune.training.card`), written
    before the folder is renamed into place: a published ``final/`` always has its card."""
    card = (config, summary) if config is not None and summary is not None else None
    final = save_pretrained(accelerator, policy, tokenizer, Path(output_dir) / "final", card=card)
    if merged:
        save_pretrained(accelerator, policy, tokenizer, final.with_name("final-merged"), merge=True, card=card)
    return final


def save_pretrained(accelerator: Accelerator, policy, tokenizer, target: Path, merge: bool = False,
                    card: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """The prepared policy in Hugging Face format (a PEFT adapter under LoRA; merged into the base with ``merge``)
    with its tokenizer, written to ``target.tmp`` and renamed when complete; every process must call this.
    ``card``: the run's resolved config and summary, rendered as the folder's model card (README.md; under LoRA it
    replaces PEFT's empty template)."""
    state_dict = accelerator.get_state_dict(policy)
    inner = accelerator.unwrap_model(policy).model
    model_config = getattr(inner, "config", None)
    if (model_config is not None and getattr(model_config, "pad_token_id", None) is None
            and tokenizer.pad_token_id is not None):
        # A tokenizer without a pad token got one for training (EOS): the saved config must name it too, as the
        # saved tokenizer does, or a sequence classifier loaded from final/ refuses batches of more than one.
        model_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with _removed_on_failure(tmp, target, main=True):
            if merge:
                import copy

                copy.deepcopy(inner).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                # The wrapper's state dict prefixes the model's keys with "model."; HF expects them bare. Other
                # keys belong to modules trained beside it (PPO's critic) and are not the model's.
                weights = ({k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
                           if state_dict else None)
                inner.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if card is not None:
                write_card(tmp, *card, adapter=is_peft_model(inner), merged=merge)
        if target.is_symlink():
            # A link (a user's, to a folder elsewhere) is replaced, never followed: what it points at stays, and
            # the model is not stranded in target.tmp by rmtree refusing a link.
            log.warning("%s was a link to %s; the link is replaced by the model's folder (what it pointed at is "
                        "left as it is)", target, target.resolve())
            target.unlink()
        elif target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    accelerator.wait_for_everyone()
    return target
