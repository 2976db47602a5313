"""The health checks (:mod:`preftune.health`) live in a training run: a callback fed every record the run logs.

Every record written to ``metrics.jsonl`` (training, ``eval_`` and step-callback records, already averaged over
processes) reaches :meth:`HealthCallback.on_log` on the main process; a check that trips warns once, in the log and
the progress bar, and the run's ``summary.json`` lists the warnings under ``health``. The trainer installs it when
the config says ``health_checks: true`` (the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from preftune.health import HealthMonitor


class HealthCallback:
    """The trainer's built-in callback: a :class:`HealthMonitor` fed every record the run logs (``on_log``).

    Evaluation records reach it through ``on_log`` too (the loop writes them to ``metrics.jsonl``), so it has no
    ``on_evaluate``: an ``evaluate()`` outside training logs nothing and is not part of the run's streams. A resumed
    run first replays the records kept in ``metrics.jsonl`` (:meth:`replay`, silently: a check that had tripped
    counts as warned and is not repeated). :meth:`summary` is what ``summary.json`` records under ``health``.
    """

    def __init__(self, monitor: HealthMonitor):
        self.monitor = monitor

    @classmethod
    def from_config(cls, cfg) -> HealthCallback:
        return cls(HealthMonitor.from_config(cfg))

    def replay(self, records: Iterable[Mapping]) -> None:
        logging_on, self.monitor.log_warnings = self.monitor.log_warnings, False
        try:
            for record in records:
                self.monitor.update(record)
        finally:
            self.monitor.log_warnings = logging_on

    def on_log(self, record: Mapping) -> None:
        self.monitor.update(record)

    def postfix(self) -> dict[str, str]:
        return self.monitor.postfix()

    def summary(self) -> dict:
        """``{"warnings": [{check, step, evidence, suggestion}], "records": n}``, in the order they tripped."""
        return {"warnings": [{"check": r.name, "step": r.step, "evidence": r.evidence, "suggestion": r.suggestion}
                             for r in self.monitor.warned.values()],
                "records": self.monitor.records}
