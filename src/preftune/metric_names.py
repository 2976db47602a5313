"""The names of the metrics a run writes to ``metrics.jsonl``, in one place for the code that writes them and the code
that reads them (health checks, report, demo, experiments).

They are user-visible and TRL's where TRL has one (``DPOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``PPOTrainer``
log the same keys), so a value never changes: dashboards, notebooks and TRL users read them. Each record is one
JSON object holding :data:`STEP` and metric name → number; held-out evaluation records prefix every name with
:data:`EVAL_PREFIX` (``eval_loss``, ``eval_rewards/accuracies``), as TRL's ``metric_key_prefix`` does.
"""

from __future__ import annotations

STEP = "step"  # the optimizer step a record belongs to
EVAL_PREFIX = "eval_"  # a held-out evaluation record: EVAL_PREFIX + LOSS, EVAL_PREFIX + REWARDS_ACCURACIES, …

# ---------------------------------------------------------------- training records (means over the logged window)
LOSS = "loss"
GRAD_NORM = "grad_norm"  # ‖g‖₂ before clipping

# A paired loss: r = the method's reward (β·log π/π_ref for DPO), per pair.
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"  # r(y_w) − r(y_l)
REWARDS_ACCURACIES = "rewards/accuracies"  # fraction of pairs with r(y_w) > r(y_l)
LOGPS_CHOSEN = "logps/chosen"  # log π(y|x), summed over the response's tokens (nats)
LOGPS_REJECTED = "logps/rejected"
LOGITS_CHOSEN = "logits/chosen"  # mean logit over the response's tokens
LOGITS_REJECTED = "logits/rejected"
LENGTHS_CHOSEN = "lengths/chosen"  # response tokens
LENGTHS_REJECTED = "lengths/rejected"
LENGTHS_MARGIN_CORR = "lengths/margin_corr"  # Pearson r of the reward margin and the length difference

# Online methods: the judge's scores of the sampled completions and the KL to the reference.
REWARD = "reward"  # mean judge score
REWARD_STD = "reward_std"
KL = "kl"  # per token: mean k3 estimate (TRL's GRPO ``kl``)
OBJECTIVE_KL = "objective/kl"  # per completion: Σ_t log π/π_ref (TRL's RLOO, Online DPO and PPO)
OBJECTIVE_SCORES = "objective/scores"
OBJECTIVE_NON_SCORE_REWARD = "objective/non_score_reward"  # −β·KL per completion
OBJECTIVE_RLHF_REWARD = "objective/rlhf_reward"  # score + non-score reward
COMPLETIONS_MEAN_LENGTH = "completions/mean_length"  # tokens
COMPLETIONS_CLIPPED_RATIO = "completions/clipped_ratio"  # fraction cut at the length limit, without EOS

# ---------------------------------------------------------------- sample evaluations
# What a step callback that samples the policy logs (preftune.demo.pipeline.sample_record); the health checks read
# them. REWARD, KL, LENGTH, EOS_RATE, WIN_RATE and REFERENCE_REWARD are also the keys of
# preftune.evaluation.metrics.evaluate_policy's result and of a rounds run's evaluations.
GOLD_REWARD = "gold_reward"  # mean gold-judge score of the policy's samples
KL_TO_REF = "kl_to_ref"  # sequence KL(π‖π_ref) in nats, summed over tokens
LENGTH = "length"  # mean completion tokens
EOS_RATE = "eos_rate"  # fraction of samples that ended with a stop token
REF_GOLD_REWARD = "ref_gold_reward"  # the same, of π_ref's samples on the same prompts
REF_LENGTH = "ref_length"
REF_EOS_RATE = "ref_eos_rate"
WIN_RATE = "win_rate"
REFERENCE_REWARD = "reference_reward"
