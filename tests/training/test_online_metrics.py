"""Issue 20, item 5: every online method logs the KL to its reference under one name with one meaning — ``kl``, the
per-token k3 mean (TRL's GRPO ``kl``) — and the per-completion Σ log π/π_ref as ``objective/kl`` (TRL's Online
DPO, RLOO and PPO); Online DPO logs both, with TRL's ``objective/rlhf_reward`` and ``objective/non_score_reward``."""

from __future__ import annotations

import json

import pytest
import torch

import preftune
from preftune.data.builtin import builtin_preferences
from preftune.methods import losses
from preftune.methods.registry import compute_loss
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

ROWS = builtin_preferences(32, seed=7)


def groups() -> losses.GroupLogps:
    """Two prompts, two completions each, of 3, 1, 2 and 2 tokens, with known log-ratios u = log π − log π_ref."""
    token_seq = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    ref = -torch.linspace(1.0, 2.4, 8)
    u = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, 0.6])
    return losses.GroupLogps(ref + u, token_seq, torch.tensor([3, 1, 2, 2]), torch.tensor([1.0, 0.0, 0.5, 0.2]),
                             torch.tensor([0, 0, 1, 1]), ref)


def test_rloo_and_grpo_log_the_same_kl_and_rloo_its_sequence_kl_as_objective_kl():
    lp = groups()
    u = lp.token_logps - lp.ref_token_logps
    k3_mean = float((torch.exp(-u) - 1 + u).mean())
    sequence_k1 = [0.3 - 0.2 + 0.5, 0.1, -0.4 + 0.2, 0.0 + 0.6]
    rloo = compute_loss(["rloo"], [1.0], lp, {"beta": 0.05}).metrics
    grpo = compute_loss(["grpo"], [1.0], lp, {"beta": 0.04}).metrics
    assert float(rloo["kl"]) == pytest.approx(k3_mean, rel=1e-6)
    assert float(grpo["kl"]) == pytest.approx(k3_mean, rel=1e-6)
    assert float(rloo["objective/kl"]) == pytest.approx(sum(sequence_k1) / 4, rel=1e-6)


def test_online_dpo_logs_the_kl_to_its_reference_and_trls_objective_through_train(tmp_path):
    tok = default_tokenizer(ROWS)
    config = dict(method="online_dpo", output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                  max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
                  seed=0, max_completion_length=8, bf16=False, beta=0.1)
    judge = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731 (longer is better)
    result = preftune.train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok,
                            train_dataset=[{"prompt": r["prompt"]} for r in ROWS], judge=judge)
    first, second = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()][:2]
    # At the first step π = π_ref: both KLs are 0, and the RLHF reward is the judge's score.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-5)
    assert first["objective/scores"] == pytest.approx(first["reward"], rel=1e-6)  # the same samples
    # After one step the policy has moved: k3 is positive, and TRL's identities hold.
    assert second["kl"] > 1e-6
    assert second["objective/non_score_reward"] == pytest.approx(-0.1 * second["objective/kl"], rel=1e-5)
    assert second["objective/rlhf_reward"] == pytest.approx(
        second["objective/scores"] + second["objective/non_score_reward"], rel=1e-5)
