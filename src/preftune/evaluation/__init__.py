"""Metrics of a policy against its reference (plots live in :mod:`.report`, the CLI commands in :mod:`.commands`).

Sampling, judges and pair building live in :mod:`preftune.rollout`.
"""

from preftune.evaluation.metrics import evaluate_policy, format_table, implicit_reward_accuracy, sequence_kl

__all__ = ["evaluate_policy", "format_table", "implicit_reward_accuracy", "sequence_kl"]
