"""Issue 20, item 4, in evaluation: the reference reads the policy's samples for the KL, so a sample longer than the
reference's positions is refused by sample with a message (it was GPT-2's IndexError)."""

from __future__ import annotations

import pytest

from preftune.errors import ModelError
from preftune.evaluation.metrics import evaluate_policy
from preftune.rollout.judges import CallableJudge
from preftune.rollout.sampling import SamplingParams


def test_a_sample_longer_than_the_references_positions_is_refused_by_name(tiny_model, tokenizer):
    policy, reference = tiny_model("gpt2", n_positions=64), tiny_model("gpt2", n_positions=24, seed=1)
    judge = CallableJudge(lambda prompts, completions: [0.0] * len(completions), name="zero")
    params = SamplingParams(max_new_tokens=40, seed=0)
    with pytest.raises(ModelError, match=r"the reference reads at most 24 positions but the policy's sample 0 "
                                         r"\(prompt 0\) takes \d+; evaluate with a smaller max_new_tokens"):
        evaluate_policy(policy, reference, tokenizer, ["The movie was good and the acting was great."], judge,
                        params)
    # Within the reference's positions the evaluation runs.
    short = evaluate_policy(policy, reference, tokenizer, ["The movie was"], judge, SamplingParams(max_new_tokens=4))
    assert short["n"] == 1
