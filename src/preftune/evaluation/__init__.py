"""Metrics of a policy against its reference (plots live in :mod:`.report`, the CLI commands in :mod:`.commands`).

Sampling, judges and pair building live in :mod:`preftune.rollout`.
"""

from preftune.evaluation.metrics import evaluate_policy, implicit_reward_accuracy, sequence_kl
from preftune.evaluation.table import format_table

__all__ = ["evaluate_policy", "format_table", "implicit_reward_accuracy", "sequence_kl"]
