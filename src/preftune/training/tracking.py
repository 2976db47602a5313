"""Metrics: a window of per-example values averaged over processes, written as ``metrics.jsonl``; and the progress
bars a run shows (``disable_tqdm`` turns off the libraries' too)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from torch import Tensor

from preftune.metric_names import STEP


class MetricWindow:
    """Sums and counts since the last log; ``values()`` averages them over all processes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, values: Tensor) -> None:
        values = values.detach().float().flatten()
        if values.numel() == 0:  # e.g. a batch with no undesirable KTO example: nothing to average
            return
        self.sums[name] += values.sum().item()
        self.counts[name] += values.numel()

    def add_correlation(self, name: str, x: Tensor, y: Tensor) -> None:
        """Pearson's correlation of ``x`` and ``y`` ``[B]`` over every example of the window, all processes and
        micro-batches together (so it does not depend on how they are split): the window keeps the moments
        E[x], E[y], E[x²], E[y²], E[xy] and ``values()`` gives ρ = cov / (σ_x σ_y), or leaves ``name`` out when
        either side is constant (at step 0 every DPO margin is 0)."""
        x, y = x.detach().double().flatten(), y.detach().double().flatten()
        for moment, values in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
            self.add(f"{_MOMENT}{name}/{moment}", values)

    def values(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        packed = torch.tensor([[self.sums[n] for n in names], [self.counts[n] for n in names]],
                              device=accelerator.device, dtype=torch.float64)
        packed = accelerator.reduce(packed, reduction="sum")
        self.sums.clear()
        self.counts.clear()
        means = {n: (s / c if c else math.nan) for n, s, c in zip(names, packed[0].tolist(), packed[1].tolist())}
        out = {n: v for n, v in means.items() if not n.startswith(_MOMENT)}
        for name in {n[len(_MOMENT):].rsplit("/", 1)[0] for n in means if n.startswith(_MOMENT)}:
            m = {k: means[f"{_MOMENT}{name}/{k}"] for k in ("x", "y", "xx", "yy", "xy")}
            var_x, var_y = m["xx"] - m["x"] ** 2, m["yy"] - m["y"] ** 2
            scale = max(abs(m["xx"]), abs(m["yy"]), 1e-30)
            if var_x > 1e-10 * scale and var_y > 1e-10 * scale:  # below float noise: nothing to correlate
                out[name] = (m["xy"] - m["x"] * m["y"]) / math.sqrt(var_x * var_y)
        return out


_MOMENT = "_moment:"  # window keys of add_correlation's moments, never logged themselves


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log step (main process only), also sent to the trackers and to the
    ``listeners`` (objects with ``on_log(record)``, e.g. the trainer's callbacks)."""

    def __init__(self, path: Path, accelerator: Accelerator, listeners: list = ()):
        self.path = path
        self.accelerator = accelerator
        self.listeners = list(listeners)

    def resume_at(self, step: int) -> int:
        """Drop the records of steps after ``step`` — logged by a run that died before its next checkpoint, and
        about to be logged again by the resumed run — so the file reads as one run. Returns how many went."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get(STEP, 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        return len(lines) - len(kept)

    def records(self) -> list[dict]:
        """The records in the file (main process; ``[]`` elsewhere or before the first)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             step=record.get(STEP))
        if self.accelerator.is_main_process:
            for listener in self.listeners:
                listener.on_log(dict(record))


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Every progress bar of a run on or off: preftune's own follow ``disable_tqdm`` where they are made; this turns
    off the libraries' too — datasets' (normalising, tokenizing, saving rows), transformers' (loading and writing
    weights) and the Hub's — and restores each as it was afterwards."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    was = (datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
           hub_utils.are_progress_bars_disabled())
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if was[1]:
            transformers_logging.enable_progress_bar()
        if not was[2]:
            hub_utils.enable_progress_bars()


Method = TypeVar("Method", bound=Callable)


def obeys_disable_tqdm(method: Method) -> Method:
    """A trainer's method run under :func:`progress_bars` as its config's ``disable_tqdm`` asks."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with progress_bars(not self.cfg.disable_tqdm):
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]
