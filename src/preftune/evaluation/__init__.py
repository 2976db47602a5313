"""Generation, judges, metrics and on-policy preference pairs (plots live in :mod:`.report`)."""

from preftune.evaluation.generate import Samples, generate
from preftune.evaluation.judges import (
    GoldSentimentJudge,
    ImplicitRewardJudge,
    Judge,
    RewardModelJudge,
    win_rate,
)
from preftune.evaluation.metrics import evaluate_policy, format_table, implicit_reward_accuracy, sequence_kl
from preftune.evaluation.pairs import PairReport, build_pairs, pairs_from_samples, save_pairs

__all__ = [
    "GoldSentimentJudge", "ImplicitRewardJudge", "Judge", "PairReport", "RewardModelJudge", "Samples",
    "build_pairs", "evaluate_policy", "format_table", "generate", "implicit_reward_accuracy", "pairs_from_samples",
    "save_pairs", "sequence_kl", "win_rate",
]
