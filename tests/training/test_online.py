"""Online DPO, RLOO and GRPO through the one loop: facts about their batches, their references and their runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from preftune import PreferenceTrainer
from preftune.config import build_config
from preftune.data.batching import PreferenceCollator
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, DataError
from preftune.modeling.logprobs import completion_logps, model_inputs
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.rollout.record import Rollout
from preftune.training.online import OnlineBatches

ROWS = builtin_preferences(32, seed=7)
PROMPTS = [{"prompt": r["prompt"]} for r in ROWS]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def cheerful(prompts, completions):
    """A judge users could write: exclamation marks and the word 'Sure' are good."""
    return [float(c.count("!") + ("Sure" in c)) for c in completions]


def trainer(tmp_path, tok, method, judge=cheerful, rows=PROMPTS, name="run", **overrides):
    config = dict(method=method, output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0,
                  max_completion_length=8, bf16=False) | overrides
    return PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                             train_dataset=rows, judge=judge)


def records(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_group_shares_its_prompt_and_scores_like_separate_sequences(tok):
    model = build_tiny_model(tok, seed=1).eval()
    prompts = [tok("Tell me about the sea.")["input_ids"], tok("What of my garden?")["input_ids"]]
    completions = [tok(t, add_special_tokens=False)["input_ids"] for t in
                   (" Sure!", " No.", " It is lovely.", " Great", " Fine, fine.", " Whatever")]
    shared = PreferenceCollator(tok.pad_token_id, prefix_sharing=True, padding_free=True).groups(
        prompts, completions, 3)
    separate = PreferenceCollator(tok.pad_token_id, prefix_sharing=False).groups(prompts, completions, 3)
    assert int(shared["num_input_tokens"]) == sum(map(len, prompts)) + sum(map(len, completions))  # prompts once
    a, b = completion_logps(model, **model_inputs(shared)), completion_logps(model, **model_inputs(separate))
    torch.testing.assert_close(a["logps"], b["logps"], rtol=0, atol=1e-5)
    torch.testing.assert_close(a["token_logps"], b["token_logps"], rtol=0, atol=1e-5)
    assert a["tokens"].tolist() == [len(c) for c in completions]


def test_online_dpo_pairs_prefer_the_higher_score_and_weigh_ties_zero(tmp_path, tok):
    source = trainer(tmp_path, tok, "online_dpo")
    online = OnlineBatches(source.cfg, "paired", tok, PreferenceCollator(tok.pad_token_id), None, source.accelerator)
    out = Rollout(prompts=["a", "b", "c"], prompt_ids=[[1, 7], [1, 8], [1, 9]], group_size=2,
                  completion_ids=[[10], [11], [12], [13], [14], [15]])
    batch = online._pairs(out, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.3]))
    chosen = batch["score_target"][batch["score_seq"] < 3].tolist()
    rejected = batch["score_target"][batch["score_seq"] >= 3].tolist()
    assert chosen == [11, 12, 14] and rejected == [10, 13, 15]
    assert batch["example_weights"].tolist() == [1.0, 1.0, 0.0]  # the tie carries no preference


def test_the_missing_eos_penalty_is_taken_from_completions_that_never_ended(tmp_path, tok):
    run = trainer(tmp_path, tok, "grpo", num_generations=4, missing_eos_penalty=2.0, max_completion_length=3)
    online = OnlineBatches(run.cfg, "groups", tok, PreferenceCollator(tok.pad_token_id), _constant(1.0),
                           run.accelerator)
    rows = [{"prompt": r["prompt"], "prompt_ids": tok(r["prompt"])["input_ids"]} for r in ROWS[:6]]
    out = online.rollout(rows, build_tiny_model(tok, seed=3), online.sampling(seed=0))
    assert len(out.scores) == 24 and not all(out.ended_with_eos)  # 3 tokens rarely reach EOS
    assert out.scores == [1.0 if ended else -1.0 for ended in out.ended_with_eos]


def _constant(value):
    from preftune.rollout.judges import CallableJudge

    return CallableJudge(lambda prompts, completions: [value] * len(completions), name="constant")


def test_grpo_at_beta_zero_loads_no_reference_and_logs_what_a_user_needs(tmp_path, tok):
    result = trainer(tmp_path, tok, "grpo", num_generations=4).train()
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["reference"] == "none"
    assert summary["online"]["generated_tokens"] > 0 and summary["online"]["generation_s"] > 0
    first = records(result)[0]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                 "completions/clipped_ratio", "entropy", "clip_ratio/region", "completions_per_second"):
        assert name in first, name
    assert first["clip_ratio/region"] == 0.0  # one step per generation: the ratio is 1, nothing is clipped
    with_kl = trainer(tmp_path, tok, "grpo", name="kl", num_generations=4, beta=0.04).train()
    assert json.loads((with_kl.output_dir / "summary.json").read_text())["reference"] == "frozen copy"
    assert records(with_kl)[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref at the first step


def test_an_online_run_resumes_as_if_never_interrupted(tmp_path, tok):
    settings = dict(max_steps=4, save_steps=2, num_generations=2, beta=0.05)
    whole = trainer(tmp_path, tok, "rloo", name="whole", **settings).train()
    (tmp_path / "resumed").mkdir()
    import shutil

    shutil.copytree(whole.output_dir / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = trainer(tmp_path, tok, "rloo", name="resumed", resume_from_checkpoint=True, **settings).train()
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert [r["reward"] for r in records(resumed) if r["step"] > 2] == [r["reward"] for r in records(whole)
                                                                        if r["step"] > 2]


def test_online_methods_need_a_judge_and_offline_methods_need_completions(tmp_path, tok):
    with pytest.raises(ConfigError, match="score their samples with a judge"):
        PreferenceTrainer(build_config({"method": "grpo", "output_dir": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="num_generations must be 2"):
        build_config({"method": "online_dpo", "num_generations": 4})
    with pytest.raises(ConfigError, match="online=true samples pairs for paired methods"):
        build_config({"method": "kto", "online": True})
    with pytest.raises(DataError, match="holds prompts only.*online_dpo"):
        trainer(tmp_path, tok, "dpo").train()
