"""A run folder is the run's alone: what a run writes, the lock that keeps a second run out, and the only
files ``overwrite_output_dir`` may delete.

Guarantees (the README's "What a run folder holds" states them for users):

* a run writes only the entries of :func:`is_run_entry` (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
  ``logs/``, ``checkpoint-N/``, ``final/``, ``final-merged/`` and their ``.tmp`` forms, the lock file; a run of
  rounds also ``rounds.json`` and ``round-K/``); everything
  else in the folder is the user's and is never deleted, not even by ``overwrite_output_dir``;
* the folder is never the current directory or one of its parents, and never holds the run's own inputs
  (dataset, model, reference, tokenizer), which an overwrite could otherwise destroy;
* one run at a time: the first takes an exclusive lock (``.preftune.lock``, an ``flock`` the kernel releases
  when the process dies), a second is refused with the first one's process id;
* a fresh start never mixes with an earlier run: a folder holding another run's files is refused unless
  ``overwrite_output_dir`` (replace that run) or ``resume_from_checkpoint`` (continue it) says what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from preftune.errors import PreftuneError, RunDirError

log = logging.getLogger("preftune")

LOCK_FILE = ".preftune.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "rounds.json")
RUN_FOLDERS = ("logs", "final", "final-merged")
_RUN_ENTRY = re.compile(r"^(checkpoint-\d+|round-\d+|final|final-merged)(\.tmp)?$")


def is_run_entry(name: str) -> bool:
    """Whether a top-level entry of an output folder was written by a run (and so may be replaced by one)."""
    return name in RUN_FILES or name in RUN_FOLDERS or name == LOCK_FILE or bool(_RUN_ENTRY.match(name))


def earlier_run_entries(out: Path) -> list[str]:
    """The run entries an earlier run left in ``out`` (the lock file aside), sorted."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if is_run_entry(p.name) and p.name != LOCK_FILE)


def check_location(out: Path, inputs: dict[str, str | None]) -> Path:
    """``out`` resolved, or RunDirError when it is a file, the current directory or one of its parents, or when
    it holds one of the run's ``inputs`` (name → path; paths that do not exist locally, such as Hub ids, are
    skipped)."""
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
    """Delete what an earlier run wrote in ``out`` and nothing else; returns the names deleted."""
    deleted = []
    for name in earlier_run_entries(out):
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        deleted.append(name)
    return deleted


class RunLock:
    """An exclusive ``flock`` on ``out/.preftune.lock`` holding the owner's process id.

    The file itself is never removed (removing a lock file others may have opened would let two runs in);
    the lock, not the file, is what counts, and the kernel drops it when the process ends, however it ends.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._file = None

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
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def run_inputs(cfg) -> dict[str, str | None]:
    """The paths a run reads (name → path), which its output folder must not hold."""
    return {"dataset": cfg.dataset, "eval dataset": cfg.eval_dataset, "model": cfg.model_name_or_path,
            "reference model": cfg.ref_model_name_or_path, "tokenizer": cfg.tokenizer_name_or_path}


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
            earlier = earlier_run_entries(out) if resume is None else []
            if earlier and not cfg.overwrite_output_dir:
                raise RunDirError(f"{cfg.output_dir} holds an earlier run ({', '.join(earlier[:4])}"
                                  f"{', …' if len(earlier) > 4 else ''}); continue it with "
                                  "resume_from_checkpoint=true, replace it with overwrite_output_dir=true (only the "
                                  "run's own files are deleted), or choose another output_dir")
            if earlier:
                log.info("overwrite_output_dir: deleted the earlier run's %s", ", ".join(delete_run_entries(out)))
        except BaseException:
            lock.release()
            raise
        held.append(lock)
        return out, resume

    out, resume = on_main_process(accelerator, decide)
    return out, resume, held[0] if held else None
