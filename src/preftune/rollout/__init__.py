"""Sampling from a policy, judging the samples and turning them into pairs; below training and evaluation.

:mod:`.sampling` (one :class:`SamplingParams`, :func:`generate`) → :mod:`.record` (the typed :class:`Rollout`)
→ :mod:`.judges` (scalar and pairwise judges, :func:`load_judge`) → :mod:`.pairs` (preference rows).
:mod:`.encoding` holds how prompts and completions become ids (as training encodes them).
"""

from preftune.rollout.judges import (
    CallableJudge,
    GoldSentimentJudge,
    ImplicitRewardJudge,
    Judge,
    PairPreferenceJudge,
    PairwiseJudge,
    RewardModelJudge,
    ScalarPairwiseJudge,
    load_judge,
    resolve_judge,
    score_rollout,
    win_rate,
)
from preftune.rollout.pairs import PairReport, build_pairs, pairs_from_rollout, save_pairs
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate

__all__ = [
    "CallableJudge", "GoldSentimentJudge", "ImplicitRewardJudge", "Judge", "PairPreferenceJudge", "PairReport",
    "PairwiseJudge", "RewardModelJudge", "Rollout", "SamplingParams", "ScalarPairwiseJudge", "build_pairs", "generate",
    "load_judge", "pairs_from_rollout", "resolve_judge", "save_pairs", "score_rollout", "win_rate",
]
