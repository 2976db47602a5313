"""One generation batch, several updates: GRPO's num_iterations and steps_per_generation, GSPO, DAPO's dynamic
sampling — from YAML through `preftune train`, and the loss against TRL 1.16's on the same tensors with π_old ≠ π."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import PreferenceTrainer
from preftune.cli import main
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.logprobs import model_inputs
from preftune.modeling.reference import ModelReference
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.objective import LossSpec, batch_loss
from preftune.training.tracking import MetricWindow

ROWS = builtin_preferences(32, seed=7)
PROMPTS = [{"prompt": r["prompt"]} for r in ROWS]

JUDGES = '''
def lengthy(prompts, completions):
    return [float(len(c) % 7) + 0.5 * c.count(" ") for c in completions]


def only_questions(prompts, completions):
    """Scores spread only for prompts with a question mark: every other prompt's group ties."""
    return [float(len(c) % 5) if "?" in str(p) else 1.0 for p, c in zip(prompts, completions)]


def constant(prompts, completions):
    return [1.0] * len(completions)
'''


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """A user's SFT model, prompts and judges on disk."""
    root = tmp_path_factory.mktemp("generation")
    build_tiny_model(tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (root / "judges.py").write_text(JUDGES)
    return root


def _run(files, name: str, **keys) -> tuple[list[dict], dict]:
    settings = dict(model_name_or_path=files / "sft", dataset=files / "prompts.jsonl", method="grpo",
                    num_generations=4, per_device_train_batch_size=2, max_completion_length=6, logging_steps=1,
                    disable_tqdm="true", bf16="false", seed=0, cache_dir=files / "cache",
                    output_dir=files / name) | keys
    config = files / f"{name}.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    assert main(["train", str(config)]) == 0
    out = files / name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def test_grpo_with_two_iterations_over_four_steps_per_generation_trains_from_yaml_and_clips(files):
    """num_iterations 2 × steps_per_generation 4: one generation batch (4 micro-batches of 2 prompts) feeds 8
    optimizer steps; the first sees π_old = π (ratio 1, nothing clipped), later ones a moved policy, clipped."""
    records, summary = _run(files, "mu2", judge=f"{files / 'judges.py'}:lengthy", num_iterations=2,
                            steps_per_generation=4, max_steps=8, learning_rate=0.05, epsilon=0.02)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9)) and summary["global_step"] == 8
    sampled = [r["step"] for r in train if "reward" in r]
    assert sampled == [1]  # one generation batch for all 8 steps
    assert summary["online"]["generated_tokens"] == pytest.approx(train[0]["completions/mean_length"] * 4 * 2 * 4)
    assert train[0]["clip_ratio/region"] == 0.0 and train[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert max(r["clip_ratio/region"] for r in train[1:]) > 0  # the ratio left 1 and the clip acted
    assert any(abs(r["ratio"] - 1) > 1e-4 for r in train[4:])  # the second pass: every micro-batch moved since


def test_dynamic_sampling_drops_tied_groups_samples_more_and_logs_them(files):
    records, summary = _run(files, "dapo", judge=f"{files / 'judges.py'}:only_questions", dynamic_sampling="true",
                            max_num_gen_batches=3, max_steps=2)
    train = [r for r in records if "loss" in r]
    counts = summary["online"]["dynamic_sampling"]
    assert counts["dropped_groups"] > 0 and counts["generation_batches"] >= 3  # at least one top-up per step
    assert all("dynamic_sampling/dropped_groups" in r for r in train)
    for record in train:  # what was trained on has signal, unless the cap left the batch to be filled
        if record["dynamic_sampling/filled_groups"] == 0:
            assert record["frac_reward_zero_std"] == 0.0


def test_dynamic_sampling_fills_a_batch_it_cannot_fill_with_signal_and_says_so(files):
    records, summary = _run(files, "tied", judge=f"{files / 'judges.py'}:constant", dynamic_sampling="true",
                            max_num_gen_batches=2, max_steps=1)
    counts = summary["online"]["dynamic_sampling"]
    # every group ties: the batch of 2 prompts is 2 dropped groups put back, after the cap of 2 generation batches
    assert counts == {"dropped_groups": 4, "filled_groups": 2, "generation_batches": 2}
    assert [r["frac_reward_zero_std"] for r in records if "loss" in r] == [1.0]


def test_the_generation_keys_are_checked():
    with pytest.raises(ConfigError, match="positive multiple of gradient_accumulation_steps"):
        build_config({"method": "grpo", "steps_per_generation": 3, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match="not both"):
        build_config({"method": "grpo", "steps_per_generation": 2, "generation_batch_size": 8})
    with pytest.raises(ConfigError, match="for GRPO, GSPO and RLOO"):
        build_config({"method": "online_dpo", "dynamic_sampling": True})
    with pytest.raises(ConfigError, match="train on a fixed dataset"):
        build_config({"method": "dpo", "num_iterations": 2})
    with pytest.raises(ConfigError, match="num_ppo_epochs"):
        build_config({"method": "ppo", "num_iterations": 2})


# --------------------------------------------------------------------------------------------------
# Against TRL 1.16: GRPOTrainer._compute_loss, transcribed, on the same tensors with π_old ≠ π
# --------------------------------------------------------------------------------------------------


def _padded(flat: torch.Tensor, seq_tokens: torch.Tensor) -> torch.Tensor:
    """Flat per-token values ``[M]`` → ``[S, T]`` right-padded with zeros (TRL's completion layout)."""
    out = flat.new_zeros(len(seq_tokens), int(seq_tokens.max()))
    for i, (start, n) in enumerate(zip((torch.cumsum(seq_tokens, 0) - seq_tokens).tolist(), seq_tokens.tolist())):
        out[i, :n] = flat[start : start + n]
    return out


def _trl_loss(logps, old, ref, mask, advantages, *, loss_type, level, beta, eps_low, eps_high, bias_correction,
              num_items_in_batch, grad_accum, steps_per_generation, processes, max_completion_length):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py), the branches a GRPO or GSPO run
    takes, in its ``[B, T]`` layout: log-ratio per token or per sequence (``importance_sampling_level``), the
    two-sided clip, the k3 KL times the ratio (``use_bias_correction_kl``), then the loss type's normaliser."""
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
        if bias_correction:
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / grad_accum
    normalizer = num_items_in_batch / processes * grad_accum / steps_per_generation  # dapo
    return (per_token_loss * mask).sum() / normalizer


@pytest.mark.parametrize(("method", "loss_type", "level"), [("grpo", "dapo", "token"), ("grpo", "grpo", "token"),
                                                            ("grpo", "dr_grpo", "token"), ("gspo", "grpo", "sequence")])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_each_micro_batch_loss_and_gradient_equal_trls_with_a_moved_policy(tmp_path, tok, method, loss_type, level,
                                                                           beta):
    """A generation batch of 4 micro-batches (steps_per_generation 4, num_iterations 2): its π_old is the sampler's;
    after the policy moves, each micro-batch's loss — what the driver backpropagates — and its gradient equal
    TRL's on the same per-token log-probs, advantages and counts, at temperature 0.7."""
    keys = dict(method=method, output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=1,
                steps_per_generation=4, num_iterations=2, temperature=0.7, max_completion_length=6, seed=0,
                bf16=False, beta=beta, epsilon=0.05, epsilon_high=0.08, scale_rewards="group")
    if method == "grpo":
        keys["grpo_loss_type"] = loss_type
    cfg = build_config(keys)
    trainer = PreferenceTrainer(cfg, model=build_tiny_model(tok, seed=2).double(), tokenizer=tok,
                                train_dataset=PROMPTS, judge=lambda p, c: [float(len(x) % 7) for x in c])
    session, online = trainer._prepare(), trainer.algorithm
    rows = [{"prompt": r["prompt"], "prompt_ids": tok(r["prompt"])["input_ids"], "source_row": i}
            for i, r in enumerate(ROWS[:4])]
    with torch.no_grad():
        batches, _ = online.generation_batch(iter([[r] for r in rows]), 0, MetricWindow())
        for p in session.policy.parameters():  # the policy moves away from the sampler
            p.add_(torch.randn_like(p), alpha=0.02)
    assert all("old_token_logps" in b for b in batches)
    reference = ModelReference(build_tiny_model(tok, seed=3).double().eval(), 1024, "other")
    spec = LossSpec.from_config(trainer.cfg)
    params = [p for p in session.policy.parameters() if p.requires_grad]
    num_items = sum(int(b["seq_tokens"].sum()) for b in batches)
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != "ref_token_logps"}  # scored by `reference` below
        ours = batch_loss(session.policy, reference, batch, spec, MetricWindow())
        out = session.policy(**model_inputs(batch))
        seq_tokens = batch["seq_tokens"]
        pad = lambda t, n=seq_tokens: _padded(t, n)  # noqa: E731
        with torch.no_grad():
            ref = reference.outputs(batch)["token_logps"]
        rewards = batch["rewards"].view(-1, 4)  # fp32, as TRL's rewards and advantages are
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        advantages = advantages.double()
        mask = pad(torch.ones_like(out["token_logps"]))
        theirs = _trl_loss(pad(out["token_logps"]), pad(batch["old_token_logps"]), pad(ref), mask, advantages,
                           loss_type=loss_type, level=level, beta=beta, eps_low=0.05, eps_high=0.08,
                           bias_correction=True, num_items_in_batch=num_items, grad_accum=1, steps_per_generation=4,
                           processes=1, max_completion_length=6)
        assert float(seq_tokens.sum()) > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
        for mine, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
            torch.testing.assert_close(mine, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()) + 1e-15)


# --------------------------------------------------------------------------------------------------
# Resume inside and at the end of a generation batch
# --------------------------------------------------------------------------------------------------


def _trainer(tmp_path, tok, name, **keys):
    config = dict(method="grpo", output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), num_generations=4,
                  per_device_train_batch_size=2, max_completion_length=6, learning_rate=0.02, logging_steps=1,
                  disable_tqdm=True, bf16=False, seed=0, num_iterations=2, steps_per_generation=2, max_steps=8,
                  save_steps=2, save_total_limit=None) | keys
    return PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                             train_dataset=PROMPTS, judge=lambda p, c: [float(len(x) % 7) for x in c])


def _records(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_at_a_generation_boundary_is_exact_and_inside_one_samples_it_again(tmp_path, tok):
    """Generation batches of 4 updates (2 micro-batches × 2 passes): checkpoint-4 ends one, checkpoint-2 is inside
    one. From checkpoint-4 the run continues as if never interrupted; from checkpoint-2 it samples the generation
    batch again (same prompts and seeds, the policy of step 2) and takes its last 2 updates."""
    import shutil

    from safetensors.torch import load_file

    from preftune.training.checkpoint import read_state

    whole = _trainer(tmp_path, tok, "whole").train()
    assert read_state(whole.output_dir / "checkpoint-2")["generation_offset"] == 2  # 2 of its 4 updates done
    assert read_state(whole.output_dir / "checkpoint-4")["generation_offset"] == 0
    for name in ("boundary", "inside"):
        (tmp_path / name).mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-4", tmp_path / "boundary" / "checkpoint-4")
    shutil.copytree(whole.output_dir / "checkpoint-2", tmp_path / "inside" / "checkpoint-2")
    boundary = _trainer(tmp_path, tok, "boundary", resume_from_checkpoint=True).train()
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(boundary.final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    inside = _trainer(tmp_path, tok, "inside", resume_from_checkpoint=True).train()
    sampled = lambda result: [r["step"] for r in _records(result) if "reward" in r and "loss" in r]  # noqa: E731
    assert sampled(whole) == [1, 5]  # one generation batch per 4 updates
    assert sampled(inside) == [3, 5]  # the interrupted generation batch sampled again for its updates 3 and 4
    assert inside.global_step == 8


def test_every_step_of_a_ragged_generation_batch_weighs_the_same(tmp_path, tok):
    """A generation batch of 3 micro-batches with 2 per optimizer step (the epoch's last, short one): the first
    step's two micro-batches normalise by 2/3 of the batch's tokens between them, the second step's one by 1/3 —
    each step's loss is a mean over its share of the tokens, not a third or two thirds of one."""
    keys = dict(method="grpo", output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=1,
                gradient_accumulation_steps=2, steps_per_generation=4, max_completion_length=6, seed=0, bf16=False)
    trainer = PreferenceTrainer(build_config(keys), model=build_tiny_model(tok, seed=2), tokenizer=tok,
                                train_dataset=PROMPTS, judge=lambda p, c: [float(len(x) % 7) for x in c])
    trainer._prepare()
    rows = [{"prompt": r["prompt"], "prompt_ids": tok(r["prompt"])["input_ids"], "source_row": i}
            for i, r in enumerate(ROWS[:3])]
    with torch.no_grad():
        batches, pulled = trainer.algorithm.generation_batch(iter([[r] for r in rows]), 0, MetricWindow())
    tokens = sum(float(b["seq_tokens"].sum()) for b in batches)
    assert pulled == 3 and len(batches) == 3
    # Σ over a step's micro-batches of (its tokens / its normaliser) / k = the step's tokens / (its share of them)
    assert [float(b["loss_num_tokens"]) for b in batches] == pytest.approx([tokens / 3, tokens / 3, tokens / 6])
    assert [float(b["loss_num_sequences"]) for b in batches] == pytest.approx([12 / 3, 12 / 3, 12 / 6])


def test_tr_dpo_moves_an_online_methods_reference(tmp_path, tok):
    """sync_ref_model with GRPO: after step 1 the reference becomes the policy (α = 1), so step 2 starts at KL 0;
    without it, step 2's KL to the initial reference is positive."""
    def kl_at_step_2(name, **keys):
        config = dict(method="grpo", output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), beta=0.04,
                      num_generations=4, per_device_train_batch_size=2, max_completion_length=6, learning_rate=0.02,
                      logging_steps=1, disable_tqdm=True, bf16=False, seed=0, max_steps=2) | keys
        result = PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                                   train_dataset=PROMPTS, judge=lambda p, c: [float(len(x) % 7) for x in c]).train()
        return [r["kl"] for r in _records(result) if r.get("step") == 2 and "kl" in r][0]

    assert kl_at_step_2("synced", sync_ref_model=True, ref_model_sync_steps=1,
                        ref_model_mixup_alpha=1.0) == pytest.approx(0.0, abs=1e-7)
    assert kl_at_step_2("fixed") > 1e-5


def test_dynamic_sampling_under_max_steps_goes_on_into_the_next_epoch(files):
    """8 prompts, 2 per update: the schedule counts 4 updates an epoch, but top-ups read more prompts per update;
    the run still takes its max_steps, in further epochs."""
    few = files / "few.jsonl"
    few.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:8]))
    records, summary = _run(files, "epochs", dataset=few, judge=f"{files / 'judges.py'}:only_questions",
                            dynamic_sampling="true", max_num_gen_batches=2, max_steps=4, steps_per_generation=1)
    assert summary["global_step"] == 4
    assert summary["online"]["dynamic_sampling"]["generation_batches"] > 4  # top-ups happened
    assert max(r["epoch"] for r in records if "loss" in r) > 1  # past the first epoch


def test_generation_batch_size_counts_prompts_over_all_processes(tmp_path, tok):
    def prepared(size):
        cfg = build_config(dict(method="grpo", output_dir=str(tmp_path / f"g{size}"), num_generations=4, bf16=False,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                generation_batch_size=size, max_completion_length=6))
        trainer = PreferenceTrainer(cfg, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=PROMPTS,
                                    judge=lambda p, c: [1.0] * len(c))
        trainer._prepare()
        return trainer

    trainer = prepared(8)  # 8 prompts = 4 micro-batches of 2 on this one process: 2 optimizer steps per generation
    assert trainer.algorithm.steps_per_generation == 4 and trainer.session.total_steps == 8  # 16 batches of 2 prompts
    with pytest.raises(ConfigError, match=r"generation_batch_size \(6 prompts\) must be a multiple of"):
        prepared(6)
