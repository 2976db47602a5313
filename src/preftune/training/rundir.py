"""A run folder is the run's alone: what a run writes, the lock that keeps a second run out, and the only
files ``overwrite_output_dir`` may delete.

Guarantees (the README's "What a run folder holds" states them for users):

* a run writes only the entries of :func:`is_run_entry` (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
  ``logs/``, ``checkpoint-N/``, ``final/``, ``final-merged/`` and their ``.tmp`` forms, the lock file; a run of
  rounds also ``rounds.json`` and ``round-K/``), and records them in the folder's manifest, ``.preftune-run.json``:
  written when the run claims the folder (the names it may write, ``checkpoint-*`` for the numbered ones) and
  rewritten when it lets the folder go (the entries it wrote, a nested path such as ``round-1/pairs.jsonl`` too);
* ``overwrite_output_dir`` deletes only entries the manifest lists, and nothing in a folder without one: there a
  name a run writes (a ``config.yaml``, a ``logs/`` of the user's, or a run of a preftune older than the
  manifest) is refused, and everything else is left alone and named in the log. A listed folder that is itself a
  run folder (a round's, with its own manifest) loses only what the two manifests list, so a user's notes in it
  stay;
* the folder is never the current directory or one of its parents, and never holds a path the config names (the
  dataset, eval dataset, model, reference, tokenizer, chat template, judge or reward model, value model), which an
  overwrite could otherwise destroy; paths are compared after ``expanduser().resolve()`` (symlinks followed);
* one run at a time: the first takes an exclusive lock (``.preftune.lock``, an ``flock`` the kernel releases
  when the process dies), a second is refused with the first one's process id;
* a fresh start never mixes with an earlier run: a folder holding another run's files is refused unless
  ``overwrite_output_dir`` (replace that run) or ``resume_from_checkpoint`` (continue it, manifest or not) says
  what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from preftune.config import TrainConfig
from preftune.errors import PreftuneError, RunDirError
from preftune.methods.registry import METHODS, get_method

log = logging.getLogger("preftune")

LOCK_FILE = ".preftune.lock"
MANIFEST = ".preftune-run.json"
_BOOKKEEPING = (LOCK_FILE, MANIFEST, MANIFEST + ".tmp")  # the folder's own records, never a user's nor deleted
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "rounds.json")
RUN_FOLDERS = ("logs", "final", "final-merged")
_RUN_ENTRY = re.compile(r"^(checkpoint-\d+|round-\d+|final|final-merged)(\.tmp)?$")
# What a run claims before it has written anything: every name it may write (``*``: a step or round number).
CLAIMED = (*RUN_FILES, *RUN_FOLDERS, "checkpoint-*", "round-*")


def is_run_entry(name: str) -> bool:
    """Whether a top-level name of an output folder is one a run writes (and so may be replaced by one)."""
    return name in RUN_FILES or name in RUN_FOLDERS or name == LOCK_FILE or bool(_RUN_ENTRY.match(name))


def _covers(entry: str, name: str) -> bool:
    """Whether a manifest entry covers ``name``: the same name or its ``.tmp`` form; ``*`` stands for a number."""
    pattern = re.escape(entry).replace(r"\*", r"\d+")
    return re.fullmatch(rf"{pattern}(\.tmp)?", name) is not None


def read_manifest(out: Path) -> dict[str, list[str]] | None:
    """``out``'s manifest, ``{"entries": [...], "kept": [...]}``, or None when there is none (a folder no run
    claimed, or one of a preftune older than the manifest). ``kept``: names a run writes that the claim found
    there and left alone (a round's folder that keeps a user's notes). Names that would leave the folder (``..``,
    absolute paths) are dropped."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        lists = {key: record.get(key, []) for key in ("entries", "kept")}
        if "entries" not in record or not all(isinstance(v, list) and all(isinstance(e, str) for e in v)
                                              for v in lists.values()):
            raise ValueError("'entries' is not a list of names")
    except (OSError, ValueError, AttributeError) as err:
        raise RunDirError(f"{path} is not a readable run manifest ({err}); it says which files a run may delete "
                          "there, so nothing is deleted: remove it if the folder holds no run, or choose another "
                          "output_dir") from None
    return {key: [e for e in v if e and not Path(e).is_absolute() and ".." not in Path(e).parts]
            for key, v in lists.items()}


def write_manifest(out: Path, entries: Iterable[str], kept: Iterable[str] = ()) -> None:
    """Write ``out``'s manifest whole or not at all (a torn manifest would hide what may be deleted)."""
    record = {"written_by": "preftune", "about": "the entries a preftune run wrote here: overwrite_output_dir "
              "deletes these and nothing else", "entries": sorted(set(entries)), "kept": sorted(set(kept))}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)


def record_entries(out: Path, entries: Iterable[str]) -> None:
    """Add ``entries`` (names or nested paths such as ``round-1/pairs.jsonl``) to ``out``'s manifest."""
    manifest = read_manifest(out) or {"entries": [], "kept": []}
    write_manifest(out, [*manifest["entries"], *entries], manifest["kept"])


def _top_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def earlier_run_entries(out: Path) -> list[str]:
    """The top-level entries of ``out`` its manifest lists (an earlier run's own), sorted; none without one."""
    manifest = read_manifest(out)
    if manifest is None:
        return []
    top = [e for e in manifest["entries"] if "/" not in e]
    return [name for name in _top_entries(out)
            if name not in _BOOKKEEPING and _listed(out, name, top, manifest["kept"])]


def _listed(out: Path, name: str, entries: list[str], kept: list[str]) -> bool:
    # A kept folder is the user's again, unless a run has since claimed it (its own manifest says what is whose).
    if name in kept and not (out / name / MANIFEST).is_file():
        return False
    return any(_covers(e, name) for e in entries)


def unrecorded_run_entries(out: Path) -> list[str]:
    """The names of ``out`` a run writes that no manifest there lists (a user's ``config.yaml`` or ``logs/``, or a
    run of a preftune older than the manifest), nor names as kept: a run must not write over them, nor delete
    them."""
    mine = set(earlier_run_entries(out)) | set((read_manifest(out) or {"kept": []})["kept"])
    return [name for name in _top_entries(out) if is_run_entry(name) and name != LOCK_FILE and name not in mine]


def check_location(out: Path, inputs: dict[str, str | None]) -> Path:
    """``out`` resolved, or RunDirError when it is a file, the current directory or one of its parents, or when
    it holds one of the run's ``inputs`` (name → path; paths that do not exist locally, such as Hub ids, are
    skipped). Both sides are compared after ``expanduser().resolve()``, so a symlink does not hide either."""
    resolved = out.expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise RunDirError(f"output_dir {out} is a file, not a folder; choose a folder for the run")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise RunDirError(f"output_dir {out} is the current directory or one of its parents; a run needs a folder "
                          "of its own (e.g. output_dir=runs/my-run)")
    for name, value in inputs.items():
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists() and path.resolve().is_relative_to(resolved):
            raise RunDirError(f"output_dir {out} holds the run's {name} ({value}); a run folder must not contain "
                              "the run's inputs: move them out or choose another output_dir")
    return resolved


def delete_run_entries(out: Path) -> list[str]:
    """Delete what ``out``'s manifest lists and nothing else; returns the names deleted (a folder that keeps
    something of the user's is named with what it kept)."""
    entries = (read_manifest(out) or {"entries": []})["entries"]
    deleted = []
    for name in earlier_run_entries(out):
        nested = [e.split("/", 1)[1] for e in entries if "/" in e and e.split("/", 1)[0] == name]
        path = out / name
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a link is removed, never followed
        elif nested or (path / MANIFEST).is_file():
            kept = _delete_recorded(path, nested)
            if kept:
                name = f"{name} (kept {', '.join(kept[:4])}{', …' if len(kept) > 4 else ''}: not a run's)"
        else:
            shutil.rmtree(path)
        deleted.append(name)
    return deleted


def _delete_recorded(folder: Path, nested: list[str]) -> list[str]:
    """Empty a run folder inside a run folder (a round's) of what its manifest and the parent's (``nested``) list;
    remove it when nothing else is left; returns what it keeps."""
    if (folder / MANIFEST).is_file():
        lock = RunLock(folder).acquire()  # no run may be writing there while its files and record go
        try:
            delete_run_entries(folder)
            for name in _BOOKKEEPING:
                (folder / name).unlink(missing_ok=True)
        finally:
            lock.release()
    for path in (folder / name for entry in nested for name in (entry, entry + ".tmp")):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    kept = _top_entries(folder)
    if not kept:
        folder.rmdir()
    return kept


class RunLock:
    """An exclusive ``flock`` on ``out/.preftune.lock`` holding the owner's process id.

    The file itself is never removed while the folder is a run's (removing a lock file others may have opened
    would let two runs in); the lock, not the file, is what counts, and the kernel drops it when the process ends,
    however it ends. The lock :func:`open_run_folder` hands a run also records, on release, what the run wrote
    (:meth:`claim`).
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._file = None
        self._kept: list[str] | None = None  # set by claim(): the run's own entries are recorded on release

    def claim(self, entries: Iterable[str], kept: Iterable[str]) -> None:
        """Write the folder's manifest as the run starts (``entries``: what it has and may write; ``kept``: run
        names found there that are not its own) and rewrite it with what it wrote when the lock is released."""
        self._kept = sorted(kept)
        write_manifest(self.path.parent, entries, self._kept)

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 — held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(f"{self.path.parent} is in use by another preftune run (process {owner}); wait for it "
                              "to finish or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is None:
            return
        try:
            if self._kept is not None:
                self._record()
        except OSError as err:  # a full disk must not hide why the run stopped; the claim's manifest stays
            log.warning("%s: the run's manifest could not be updated (%s); it still lists what the run may have "
                        "written", self.path.parent / MANIFEST, err)
        finally:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def _record(self) -> None:
        """The manifest as the run leaves the folder: every name a run writes that is there now (nothing else
        could write them while the lock was held), the nested entries recorded that still exist, and the kept
        names still there."""
        out = self.path.parent
        manifest = read_manifest(out) or {"entries": [], "kept": []}
        kept = [name for name in self._kept if (out / name).exists() and not (out / name / MANIFEST).is_file()]
        written = [name for name in _top_entries(out) if is_run_entry(name) and name != LOCK_FILE
                   and name not in kept]
        nested = [e for e in manifest["entries"] if "/" in e and (out / e).exists()]
        write_manifest(out, [*written, *nested], kept)


def run_inputs(cfg) -> dict[str, str | None]:
    """Every path the config names that a run reads (name → path), which its output folder must not hold: data,
    models, the chat template file, and a judge's reward-model folder or ``file.py`` (``file.py:function``)."""
    judge = cfg.judge
    if isinstance(judge, str) and ":" in judge and not Path(judge).exists():
        judge = judge.rsplit(":", 1)[0]  # file.py:function → file.py (a module name is no path and is skipped)
    return {"dataset": cfg.dataset, "eval dataset": cfg.eval_dataset, "model": cfg.model_name_or_path,
            "reference model": cfg.ref_model_name_or_path, "tokenizer": cfg.tokenizer_name_or_path,
            "chat template": cfg.chat_template if isinstance(cfg.chat_template, str) else None,
            "judge (reward model)": judge if isinstance(judge, str) else None,
            "value model": cfg.value_model if isinstance(cfg.value_model, str) else None}


def _make_room(cfg, out: Path, lock: RunLock) -> None:
    """A fresh start: refuse names a run writes that no manifest lists, refuse or delete (``overwrite_output_dir``)
    an earlier run's recorded entries, name what is left alone, and claim the folder."""
    unrecorded = unrecorded_run_entries(out)
    if unrecorded:
        raise RunDirError(f"{cfg.output_dir} holds {_shown(unrecorded)}, which no preftune run recorded as its own "
                          f"(no {MANIFEST} lists them: your files, or a run of an older preftune); the run would "
                          "write over them, and overwrite_output_dir deletes only what a run recorded: move them "
                          "away or choose another output_dir (an older run can still be continued with "
                          "resume_from_checkpoint=true)")
    earlier = earlier_run_entries(out)
    if earlier and not cfg.overwrite_output_dir:
        raise RunDirError(f"{cfg.output_dir} holds an earlier run ({_shown(earlier)}); continue it with "
                          "resume_from_checkpoint=true, replace it with overwrite_output_dir=true (only the files "
                          "the run recorded as its own are deleted), or choose another output_dir")
    if earlier:
        log.info("overwrite_output_dir: deleted the earlier run's %s", ", ".join(delete_run_entries(out)))
    left = [name for name in _top_entries(out) if name not in _BOOKKEEPING]
    if left:
        log.info("output_dir %s: left alone (not a run's): %s", out, _shown(left))
    lock.claim(CLAIMED, [name for name in left if is_run_entry(name)])


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", …" if len(names) > 4 else "")


def on_main_process(accelerator, fn):
    """``fn()`` on the main process only, its result given to every process. A :class:`PreftuneError` raised there
    is raised on every process, so none waits forever for a process that stopped."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except PreftuneError as err:
            failure = (type(err), str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [(result, failure)]
        broadcast_object_list(box)
        result, failure = box[0]
    if failure is not None:
        raise failure[0](failure[1])
    return result


def open_run_folder(cfg, accelerator, resume_from: Callable[[Path], Path | None] | None = None,
                    ) -> tuple[Path, Path | None, RunLock | None]:
    """Check and lock the output folder (main process); ``(folder, what to resume from or None, the lock)``.

    ``resume_from(folder)`` checks a resume and returns what it continues (default: the checkpoint
    ``resume_from_checkpoint`` names, :func:`~preftune.training.checkpoint.resolve_resume`). Without a resume a
    folder holding an earlier run's files is refused unless ``overwrite_output_dir``, which deletes those files
    only. Other processes get the folder and the resume; only the main process holds the lock.
    """
    from preftune.training.checkpoint import resolve_resume

    held: list[RunLock] = []

    def decide() -> tuple[Path, Path | None]:
        out = check_location(Path(cfg.output_dir), run_inputs(cfg))
        lock = RunLock(out).acquire()
        try:
            resume = (resume_from or partial(resolve_resume, cfg.resume_from_checkpoint))(out)
            if resume is None:
                _make_room(cfg, out, lock)
            else:  # continuing: what is there is the run's, manifest or not (a run of an older preftune)
                manifest = read_manifest(out) or {"entries": [], "kept": []}
                lock.claim([*CLAIMED, *manifest["entries"]], manifest["kept"])
        except BaseException:
            lock.release()
            raise
        held.append(lock)
        return out, resume

    out, resume = on_main_process(accelerator, decide)
    return out, resume, held[0] if held else None


@dataclass
class RunResult:
    """What a run leaves: its folder, ``final/`` (None when nothing was exported), the optimizer steps (updates)
    taken, the last logged training and evaluation records, and the first micro-batch's loss."""

    output_dir: Path
    final_dir: Path | None
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None


def effective_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as the run computes with it: each loss hyper-parameter of the run's methods left at None holds
    the value used (the first method's registry default), so ``beta: null`` and ``beta: 0.1`` under DPO are the
    same run; hyper-parameters of methods the run does not use are left out."""
    values = cfg.to_dict()
    used = {k for m in cfg.methods for k in get_method(m).hparams}
    for unused in {k for m in METHODS.values() for k in m.hparams} - used:
        values.pop(unused, None)
    for name in cfg.methods:
        for key, default in get_method(name).defaults.items():
            if values.get(key) is None:
                values[key] = default
    return values
