"""PPO in its own loop: facts about its experience, its KL control, its memory, its resumes and its runs.

The mathematics (GAE, KL estimators, whitening, the clipped losses) are tested in tests/methods/test_rl.py; these
tests state what the loop builds from them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from preftune import PreferenceTrainer, train
from preftune.cli import main
from preftune.config import build_config, load_config
from preftune.data.batching import PreferenceCollator
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.methods import rl
from preftune.modeling.loading import as_reward_model
from preftune.modeling.logprobs import LogProbModel, model_inputs
from preftune.modeling.reward import sequence_rewards
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.modeling.value import PolicyAndValue, critic_from_policy
from preftune.rollout.judges import RewardModelJudge
from preftune.training import ppo
from preftune.training.ppo import make_experience

ROWS = builtin_preferences(32, seed=7)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the experience ----------------------------------------------------------------------------------


def test_the_experience_puts_the_score_at_the_last_token_and_each_value_before_its_token(tok):
    policy, reference = build_tiny_model(tok, seed=1).eval(), build_tiny_model(tok, seed=2).eval()
    critic = critic_from_policy(policy).eval()
    torch.nn.init.normal_(critic.score.weight, std=0.5)  # a head that reads the hidden state, not zeros
    prompts = [tok("Tell me about the sea.")["input_ids"], tok("What of my garden?")["input_ids"]]
    words = [tok(" It is blue.", add_special_tokens=False)["input_ids"],
             tok(" Green and wild and", add_special_tokens=False)["input_ids"]]
    completions = [words[0] + [tok.eos_token_id], words[1]]  # the first ended, the second was cut
    batch = PreferenceCollator(tok.pad_token_id, prefix_sharing=True, padding_free=True).groups(prompts, completions, 1)
    with torch.no_grad():
        out = PolicyAndValue(policy, critic).eval()(**model_inputs(batch))
        ref = LogProbModel(reference)(**model_inputs(batch))["token_logps"]
        policy_logps = LogProbModel(policy)(**model_inputs(batch))["token_logps"]
        # V(x, y_<t): the critic's head on the last hidden state of prompt + the completion before token t alone
        expected = torch.cat([torch.stack([critic.score(critic.base_model(torch.tensor([p + c[:t]])).last_hidden_state
                                                        [0, -1]).squeeze() for t in range(len(c))])
                              for p, c in zip(prompts, completions)])
    m = sum(map(len, completions))
    assert out["token_logps"].shape == out["values"].shape == (m,)  # completion tokens only: no prompt, no padding
    torch.testing.assert_close(out["values"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["token_logps"], policy_logps, rtol=0, atol=1e-6)

    scores = torch.tensor([0.7, -0.3])
    exp = make_experience(prompts, completions, scores, torch.tensor([True, False]), batch["seq_tokens"],
                          out["token_logps"], ref, out["values"], kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0)
    kl = out["token_logps"] - ref
    last = torch.cumsum(batch["seq_tokens"], 0) - 1
    assert completions[0][-1] == tok.eos_token_id  # the first sequence's score sits on its EOS
    expected_rewards = -0.1 * kl
    expected_rewards[last] += scores
    torch.testing.assert_close(exp.rewards, expected_rewards, rtol=0, atol=1e-6)
    # γ = λ = 1: the value target of token t is the reward still to come in its sequence (score included)
    starts = torch.cumsum(batch["seq_tokens"], 0) - batch["seq_tokens"]
    for start, n in zip(starts.tolist(), batch["seq_tokens"].tolist()):
        to_go = expected_rewards[start : start + n].flip(0).cumsum(0).flip(0)
        torch.testing.assert_close(exp.returns[start : start + n], to_go, rtol=0, atol=1e-5)
    assert abs(exp.advantages.mean().item()) < 1e-5 and exp.advantages.std().item() == pytest.approx(1, abs=1e-4)
    torch.testing.assert_close(exp.sequence_kl(), torch.stack([kl[: len(completions[0])].sum(),
                                                               kl[len(completions[0]) :].sum()]))
    assert exp.token_index(torch.tensor([1])).tolist() == list(range(len(completions[0]), m))


def test_a_reward_model_on_the_sampled_ids_scores_what_it_scores_on_the_text(tok):
    rm = as_reward_model(build_tiny_model(tok, seed=5)).train()  # PPO's judge may be left in training mode
    judge = RewardModelJudge(rm, tok)
    prompts, texts = ["Tell me about the sea.", "What of my garden?"], [" It is blue.", " Green and wild."]
    ids = [tok(p)["input_ids"] for p in prompts]
    completions = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    collate = PreferenceCollator(tok.pad_token_id, prefix_sharing=True, padding_free=True)
    batches = [collate.groups(ids[i : i + 1], completions[i : i + 1], 1) for i in range(2)]  # as PPO batches them
    on_ids = judge.score_batches(batches)  # what PPO calls on the sampled ids
    assert rm.training  # handed back in the mode it came in
    torch.testing.assert_close(on_ids, torch.tensor(judge.score(prompts, texts)), rtol=0, atol=1e-5)
    with torch.no_grad():  # and it is the score head at the EOS, in evaluation mode
        rm.eval()
        direct = torch.cat([sequence_rewards(rm, *(b[k] for k in ("input_ids", "attention_mask", "seq_last_index",
                                                                  "seq_tokens", "position_ids")))["logps"]
                            for b in batches])
    torch.testing.assert_close(on_ids, direct, rtol=0, atol=0)


# ---- a run from YAML with a user's reward model -------------------------------------------------------


@pytest.fixture(scope="module")
def yaml_run(tmp_path_factory, tok):
    """`preftune train run.yaml` with method: ppo and a user's reward-model folder: 4 updates, a checkpoint at 2,
    the adaptive KL controller (k3, a tiny target, a short horizon) and running score normalisation."""
    root = tmp_path_factory.mktemp("ppo")
    build_tiny_model(tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    as_reward_model(build_tiny_model(tok, seed=5)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in ROWS))
    (root / "run.yaml").write_text(
        f"model_name_or_path: {root / 'sft'}\ndataset: {root / 'prompts.jsonl'}\nmethod: ppo\n"
        f"reward_model_path: {root / 'rm'}\nmax_steps: 4\nsave_steps: 2\nlogging_steps: 1\n"
        f"per_device_train_batch_size: 4\nnum_ppo_epochs: 2\nmax_completion_length: 6\nlearning_rate: 1.0e-3\n"
        f"kl_estimator: k3\ntarget_kl: 0.001\nkl_horizon: 8\nuse_score_scaling: true\nuse_score_norm: true\n"
        f"score_clip: 3\nmissing_eos_penalty: 0.5\ndisable_tqdm: true\nbf16: false\nseed: 0\n"
        f"cache_dir: {root / 'cache'}\noutput_dir: {root / 'run'}\n")
    assert main(["train", str(root / "run.yaml")]) == 0
    return root


def test_ppo_trains_from_yaml_with_a_users_reward_model_on_the_policys_ids(yaml_run):
    summary = json.loads((yaml_run / "run" / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["optimizer_steps"] == 8  # 4 updates × 2 passes × 1 step
    assert summary["ppo"]["reward"].endswith("(on the policy's ids)")  # same tokenizer: no decode, no re-encode
    assert summary["ppo"]["value_model"].startswith("a copy of the reward model")
    first = _records(yaml_run / "run")[0]
    assert first["objective/kl"] == 0.0 and first["objective/non_score_reward"] == 0.0  # π = π_ref at update 1
    for name in ("objective/scores", "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
                 "val/clipfrac_avg", "loss/value_avg", "val/explained_variance", "entropy", "completions/mean_length",
                 "completions/eos_rate", "time/generation", "time/scoring", "time/experience", "time/optimisation"):
        assert name in first, name
    assert (yaml_run / "run" / "final" / "model.safetensors").exists()
    weights = load_file(yaml_run / "run" / "final" / "model.safetensors")
    assert not any(k.startswith(("critic", "value_head")) for k in weights)  # the policy alone, loadable as it was


def test_the_adaptive_controller_moves_the_logged_coefficient_by_the_logged_kl(yaml_run):
    records = _records(yaml_run / "run")
    coefs, kls = [r["objective/kl_coef"] for r in records], [r["objective/kl"] for r in records]
    assert coefs[0] == pytest.approx(0.05)
    for k in range(len(records) - 1):  # e = clip(KL/target − 1, ±0.2); c ← c·(1 + e·4 samples / horizon 8)
        assert coefs[k + 1] == pytest.approx(rl.adaptive_kl_coef(coefs[k], kls[k], 0.001, 4, 8), rel=1e-5)
    assert coefs[1] < coefs[0]  # KL 0 at the first update: below the target, the coefficient falls
    assert any(b > a for a, b in zip(coefs[1:], coefs[2:]))  # once π has moved, k3 > 0.001: it rises
    # the logged KL is the one in the reward: the non-score reward is −(the coefficient used)·(the logged KL)
    for r in records:
        assert r["objective/non_score_reward"] == pytest.approx(-r["objective/kl_coef"] * r["objective/kl"], rel=1e-5)
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] + r["objective/non_score_reward"],
                                                           rel=1e-5, abs=1e-7)
    assert any(r["objective/kl"] > 0 for r in records)


def test_a_resumed_ppo_run_equals_the_uninterrupted_one(yaml_run):
    resumed = yaml_run / "resumed"
    resumed.mkdir()
    shutil.copytree(yaml_run / "run" / "checkpoint-2", resumed / "checkpoint-2")
    train(load_config(yaml_run / "run.yaml", [f"output_dir={resumed}", "resume_from_checkpoint=true"]))
    a, b = (load_file(d / "final" / "model.safetensors") for d in (yaml_run / "run", resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    names = ("objective/kl_coef", "objective/scores", "objective/kl", "loss/value_avg")
    later = lambda run: [r[n] for r in _records(run) if r["step"] > 2 for n in names]  # noqa: E731
    assert later(resumed) == pytest.approx(later(yaml_run / "run"), rel=1e-6, abs=1e-7)


# ---- four models against two ---------------------------------------------------------------------------


def test_memory_ppo_holds_four_models_and_dpo_with_a_precomputed_reference_one(yaml_run, tok, tmp_path):
    held = json.loads((yaml_run / "run" / "summary.json").read_text())["memory"]
    roles = held["roles"]
    assert held["models_held"] == 4 and list(roles) == ["policy", "reference", "reward", "value"]
    policy = build_tiny_model(tok, seed=0)
    n, tensors = sum(p.numel() for p in policy.parameters()), len(list(policy.parameters()))
    assert roles["policy"]["weights"] == roles["reference"]["weights"] == 4 * n  # fp32
    assert roles["policy"]["gradients"] == 4 * n and roles["reference"]["gradients"] == 0
    assert roles["policy"]["optimizer"] == 2 * 4 * n + 4 * tensors  # AdamW: exp_avg, exp_avg_sq, a step count each
    rm = as_reward_model(build_tiny_model(tok, seed=5))
    assert roles["reward"]["weights"] == roles["value"]["weights"] == 4 * sum(p.numel() for p in rm.parameters())
    assert roles["reward"]["optimizer"] == 0 and roles["value"]["optimizer"] > 0  # the critic trains, the RM not
    assert roles["reward"]["trainable_parameters"] == roles["reward"]["gradients"] == 0  # frozen, as it is

    dpo = train(dict(method="dpo", output_dir=str(tmp_path / "dpo"), cache_dir=str(tmp_path / "cache"), max_steps=1,
                     per_device_train_batch_size=4, disable_tqdm=True, bf16=False),
                model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)
    held = json.loads((dpo.output_dir / "summary.json").read_text())["memory"]
    assert held["models_held"] == 1 and held["roles"]["reference"]["kind"] == "cache"
    assert held["roles"]["reference"]["other"] == len(ROWS) * 2 * 8  # two float64 log-probs per pair
    assert held["roles"]["policy"]["weights"] == 4 * n


def test_the_reward_model_is_frozen_and_gets_no_gradient_while_its_copy_the_critic_trains(tok, tmp_path):
    rm = as_reward_model(build_tiny_model(tok, seed=5))
    start = {k: v.clone() for k, v in rm.state_dict().items()}
    trainer = PreferenceTrainer(
        build_config(dict(method="ppo", max_steps=1, per_device_train_batch_size=4, max_completion_length=6,
                          bf16=False, disable_tqdm=True, output_dir=str(tmp_path / "run"),
                          cache_dir=str(tmp_path / "cache"))),
        model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        judge=RewardModelJudge(rm, tok))
    trainer.train()
    assert not any(p.requires_grad for p in rm.parameters())
    assert all(p.grad is None for p in rm.parameters())  # scored without a graph: no backward reaches it
    assert all(torch.equal(v, start[k]) for k, v in rm.state_dict().items())
    critic = trainer.accelerator.unwrap_model(trainer.session.policy).critic  # the reward model's copy trains
    assert all(p.requires_grad for p in critic.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in critic.state_dict().items())


def test_a_value_head_on_the_policys_trunk_and_a_users_function_as_the_reward(tok, tmp_path):
    """value_model: shared — a zero-initialised head on the policy's last hidden states, trained with it (one body
    fewer than the default critic); the reward a plain function of the text, less the missing-EOS penalty."""

    def always_one(prompts, completions):
        return [1.0] * len(completions)

    result = train(dict(method="ppo", value_model="shared", missing_eos_penalty=0.5, max_steps=2, logging_steps=1,
                        per_device_train_batch_size=4, max_completion_length=6, learning_rate=1e-2, bf16=False,
                        disable_tqdm=True, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")),
                   model=build_tiny_model(tok, seed=0), tokenizer=tok,
                   train_dataset=[{"prompt": r["prompt"]} for r in ROWS], judge=always_one)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["ppo"]["value_model"] == "a value head on the policy's trunk"
    assert summary["ppo"]["reward"].endswith("(on decoded text)")
    held = summary["memory"]
    hidden = build_tiny_model(tok, seed=0).config.hidden_size
    assert held["models_held"] == 2 and held["roles"]["reward"]["kind"] == "function"
    assert held["roles"]["value"]["kind"] == "head" and held["roles"]["value"]["weights"] == 4 * (hidden + 1)
    records = _records(result.output_dir)
    for r in records:  # 1 for an ended completion, 1 − 0.5 for one cut at the length limit
        assert r["reward"] == pytest.approx(1 - 0.5 * (1 - r["completions/eos_rate"]), rel=1e-6)
        assert r["objective/scores"] == pytest.approx(r["reward"], rel=1e-6)  # no scaling asked for
    assert records[0]["val/value_mean"] == 0.0  # the head starts at zero (Ziegler et al.'s init_scale=0)
    assert records[1]["val/value_mean"] != 0.0  # and it was trained by the first update


def test_the_trainer_api_on_ppo_evaluate_save_model_model_and_callbacks(tok, tmp_path):
    """PreferenceTrainer(method: ppo) is PPO's trainer with the one loop's API: evaluate() judges one sample of each
    held-out prompt, save_model() writes the policy alone, ``model`` is the policy, callbacks hear every record."""
    heard = {"log": [], "evaluate": [], "end": None}

    class Recorder:
        def on_log(self, record):
            heard["log"].append(record)

        def on_evaluate(self, record):
            heard["evaluate"].append(record)

        def on_train_end(self, result):
            heard["end"] = result

    policy = build_tiny_model(tok, seed=0)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    prompts = [{"prompt": r["prompt"]} for r in ROWS]
    trainer = PreferenceTrainer(
        build_config(dict(method="ppo", value_model="shared", max_steps=1, logging_steps=1, eval_steps=1,
                          per_device_train_batch_size=4, max_completion_length=6, bf16=False, disable_tqdm=True,
                          output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))),
        model=policy, tokenizer=tok, train_dataset=prompts[:24], eval_dataset=prompts[24:],
        judge=lambda p, c: [1.0] * len(c), callbacks=[Recorder()])
    assert isinstance(trainer.algorithm, ppo.PPO)  # the registry names PPO's algorithm; the trainer is the driver
    before = trainer.evaluate()
    assert before["eval_reward"] == 1.0 and before["eval_runtime"] > 0  # the judge's score of every sample
    assert type(trainer.model) is type(policy)  # the policy, not the policy-and-critic module
    saved = load_file(trainer.save_model(tmp_path / "saved") / "model.safetensors")
    assert set(saved) <= set(start) and not any(k.startswith(("critic", "value_head")) for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)
    result = trainer.train()
    assert [r["step"] for r in heard["log"] if "objective/kl" in r] == [1]
    assert heard["evaluate"] and heard["evaluate"][-1]["eval_reward"] == 1.0
    assert heard["end"] is result


def test_ppo_config_is_checked():
    with pytest.raises(ConfigError, match="one completion per prompt"):
        build_config({"method": "ppo", "num_generations": 4})
    with pytest.raises(ConfigError, match="cannot combine"):
        build_config({"method": ["ppo", "sft"]})
    with pytest.raises(ConfigError, match="use_score_scaling=true too"):
        build_config({"method": "ppo", "use_score_norm": True})
    with pytest.raises(ConfigError, match="cliprange must be in"):
        build_config({"method": "ppo", "cliprange": 0})
    assert build_config({"method": "ppo", "ppo_epochs": 2, "reward_model_path": "rm"}).num_ppo_epochs == 2


# ---- on the demo world -----------------------------------------------------------------------------------


def test_ppo_raises_the_gold_reward_on_a_reduced_demo_world(tmp_path):
    from transformers import AutoModelForCausalLM

    from preftune.demo.pipeline import DemoSettings, build_world, train_stage
    from preftune.evaluation.metrics import evaluate_policy
    from preftune.rollout.judges import GoldSentimentJudge
    from preftune.rollout.sampling import SamplingParams

    settings = DemoSettings.quick(str(tmp_path / "world"))
    world, judge = build_world(settings), GoldSentimentJudge()
    # 24 steps gained 0.07–0.09 gold reward over two seeds (256 samples); 12 steps gained ≈ 0.04
    final = train_stage(settings, "runs/ppo_gt", method="ppo", judge=judge, kl_coef=0.05, max_steps=24,
                        per_device_train_batch_size=16, learning_rate=3e-4,
                        max_completion_length=settings.max_new_tokens,
                        model=AutoModelForCausalLM.from_pretrained(world.sft_dir), tokenizer=world.tokenizer,
                        train_dataset=[{"prompt": p} for p in world.train_prompts])
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, n=8, seed=5)  # 256 samples
    before = evaluate_policy(world.sft, world.sft, world.tokenizer, world.eval_prompts, judge, params)
    after = evaluate_policy(AutoModelForCausalLM.from_pretrained(final).eval(), world.sft, world.tokenizer,
                            world.eval_prompts, judge, params)
    assert after["reward"] > before["reward"] + 0.03, (before["reward"], after["reward"])
    assert after["kl"] > 0
