"""A pairwise judge in online training: Online DPO compares its two samples of a prompt with it (the preferred one is
chosen), GRPO, RLOO and PPO, whose advantages read one score per completion, refuse it before anything loads."""

from __future__ import annotations

import json

import pytest

from preftune import PreferenceTrainer
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

ROWS = builtin_preferences(16, seed=7)
PROMPTS = [{"prompt": r["prompt"]} for r in ROWS]


class LongerWins:
    """A pairwise judge: the longer completion wins surely, equal lengths tie."""

    name = "longer_wins"

    def __init__(self):
        self.pairs = 0

    def prefer(self, prompts, completions_a, completions_b):
        self.pairs += len(prompts)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
                for a, b in zip(completions_a, completions_b)]


def config(tmp_path, method, **overrides):
    return build_config(dict(method=method, output_dir=str(tmp_path / method), cache_dir=str(tmp_path / "cache"),
                             max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                             disable_tqdm=True, seed=0, max_completion_length=8, bf16=False) | overrides)


def test_online_dpo_trains_on_the_pairs_a_pairwise_judge_prefers(tmp_path):
    tok, judge = default_tokenizer(ROWS), LongerWins()
    result = PreferenceTrainer(config(tmp_path, "online_dpo"), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                               train_dataset=PROMPTS, judge=judge).train()
    assert judge.pairs == 2 * 4  # one verdict per pair: two steps of four prompts
    first = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward"] == pytest.approx(0.5)  # each pair's scores are P(a ≻ b) and 1 − P(a ≻ b)


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_methods_that_read_a_score_per_completion_refuse_a_pairwise_judge(tmp_path, method):
    with pytest.raises(ConfigError, match=f"judge 'longer_wins' is pairwise .* method {method} needs one score per "
                                          "completion"):
        PreferenceTrainer(config(tmp_path, method), train_dataset=PROMPTS, judge=LongerWins())
    assert not (tmp_path / method).exists()  # refused before anything loads


def test_online_dpo_with_a_pairwise_judge_refuses_held_out_evaluation_before_training(tmp_path):
    """Held-out evaluation judges one sample of a prompt alone, which a pairwise judge cannot score: refused when the
    run is prepared, not at its first evaluation."""
    tok = default_tokenizer(ROWS)
    trainer = PreferenceTrainer(config(tmp_path, "online_dpo", eval_split_size=0.25), model=build_tiny_model(tok),
                                tokenizer=tok, train_dataset=PROMPTS, judge=LongerWins())
    with pytest.raises(ConfigError, match="is pairwise, and held-out evaluation judges one sample"):
        trainer.train()
    assert not (tmp_path / "online_dpo" / "metrics.jsonl").exists()
