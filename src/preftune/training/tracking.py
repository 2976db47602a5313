"""Metrics: a window of per-example values averaged over processes, written as ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor


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

    def values(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        packed = torch.tensor([[self.sums[n] for n in names], [self.counts[n] for n in names]],
                              device=accelerator.device, dtype=torch.float64)
        packed = accelerator.reduce(packed, reduction="sum")
        self.sums.clear()
        self.counts.clear()
        return {n: (s / c if c else math.nan) for n, s, c in zip(names, packed[0].tolist(), packed[1].tolist())}


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
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        return len(lines) - len(kept)

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             step=record.get("step"))
        if self.accelerator.is_main_process:
            for listener in self.listeners:
                listener.on_log(dict(record))
