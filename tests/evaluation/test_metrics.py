"""Facts about evaluation: the sequence KL is the exact Σ_t KL over the vocabulary; a policy equal to its
reference has KL 0 and wins ½; implicit-reward accuracy is strict; the table and plots are readable."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from preftune.evaluation.metrics import evaluate_policy, implicit_reward_accuracy, sequence_kl
from preftune.evaluation.report import plot_frontier, plot_reward_distributions, plot_training_curves
from preftune.evaluation.table import format_table
from preftune.rollout.judges import ImplicitRewardJudge
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate


@torch.no_grad()
def exact_kl(policy, reference, prompt_ids, completion_ids) -> float:
    """Σ_t Σ_v p log(p/q): a loop over completion tokens, each prefix run alone (no batching, no padding, no
    cache), full softmax over the vocabulary in fp64."""
    total = 0.0
    for t in range(len(completion_ids)):
        context = torch.tensor([prompt_ids + completion_ids[:t]])
        p = policy(input_ids=context).logits[0, -1].double().softmax(-1)
        q = reference(input_ids=context).logits[0, -1].double().softmax(-1)
        total += float((p * (p.log() - q.log())).sum())
    return total


def handmade_samples(tokenizer) -> Rollout:
    """Completions of different lengths, two ending with EOS, so padding and the EOS step are exercised."""
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    prompts = ["The movie was", "What", "I did not like the plot; it was"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [torch.randint(10, 300, (n,), generator=g).tolist() for n in (5, 1, 3)]
    completion_ids[0].append(eos)
    completion_ids[1].append(eos)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    logprobs = [[0.0] * len(c) for c in completion_ids]
    return Rollout(prompts, prompt_ids, completion_ids=completion_ids, logprobs=logprobs,
                   ended_with_eos=[True, True, False], completions=texts)


@pytest.mark.parametrize(("batch_size", "chunk_size"), [(1, 1), (2, 3), (32, 1024)])
def test_sequence_kl_equals_exact_per_token_sum(tiny_model, tokenizer, batch_size, chunk_size):
    policy, reference = tiny_model(seed=0).double(), tiny_model(seed=1).double()
    samples = handmade_samples(tokenizer)
    kl = sequence_kl(policy, reference, samples, batch_size=batch_size, chunk_size=chunk_size)
    expected = [exact_kl(policy, reference, p, c) for p, c in zip(samples.prompt_ids, samples.completion_ids)]
    torch.testing.assert_close(kl.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()


def test_sequence_kl_on_generated_samples_equals_exact(tiny_model, tokenizer):
    policy, reference = tiny_model(seed=0), tiny_model(seed=2)
    samples = generate(policy, tokenizer, ["The movie was", "What"], SamplingParams(max_new_tokens=6, n=2, seed=0))
    kl = sequence_kl(policy, reference, samples)
    expected = [exact_kl(policy, reference, p, c) for p, c in zip(samples.sample_prompt_ids, samples.completion_ids)]
    torch.testing.assert_close(kl, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_sequence_kl_is_zero_for_the_reference_itself(tiny_model, tokenizer):
    policy = tiny_model(seed=0)
    samples = handmade_samples(tokenizer)
    assert sequence_kl(policy, policy, samples).abs().max() < 1e-6
    assert sequence_kl(policy, copy.deepcopy(policy), samples).abs().max() < 1e-6


class LengthJudge:
    name = "length"

    def score(self, prompts, completions):
        return [float(len(c) % 7) for c in completions]


def test_policy_equal_to_reference_has_zero_kl_and_wins_half(tiny_model, tokenizer):
    policy = tiny_model(seed=0)
    prompts = ["The movie was", "What", "I did not like"]
    result = evaluate_policy(policy, copy.deepcopy(policy), tokenizer, prompts, LengthJudge(),
                             SamplingParams(max_new_tokens=8, n=2, seed=0), return_per_sample=True)
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result["win_rate"] == 0.5
    assert result["reward"] == result["reference_reward"]
    assert result["n"] == 6
    samples = result["per_sample"]["rollout"]
    assert result["length"] == pytest.approx(sum(samples.lengths) / 6)
    assert result["eos_rate"] == sum(samples.ended_with_eos) / 6
    assert result["per_sample"]["rewards"] == LengthJudge().score(samples.sample_prompts, samples.completions)
    assert result["judge"] == "length" and samples.judge == "length"


def test_evaluate_reports_the_kl_of_the_policy_samples(tiny_model, tokenizer):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    result = evaluate_policy(policy, reference, tokenizer, ["The movie was", "What"], LengthJudge(),
                             SamplingParams(max_new_tokens=5, n=2, seed=1), return_per_sample=True)
    samples = result["per_sample"]["rollout"]
    expected = sequence_kl(policy, reference, samples).mean()
    assert result["kl"] == pytest.approx(float(expected), rel=1e-5)
    assert result["kl"] > 0


def test_implicit_reward_accuracy_is_strict_and_oriented(tiny_model, tokenizer):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    prompts = ["The movie was", "What", "I did not like the plot"]
    a, b = [" good.", " is it?", " at all."], [" bad.", " the capital", " very much."]
    judge = ImplicitRewardJudge(policy, reference, tokenizer, beta=0.1)
    ra, rb = judge.score(prompts, a), judge.score(prompts, b)
    # Rows whose chosen is the completion with the larger implicit reward: accuracy 1; swapped: 0.
    right = [{"prompt": p, "chosen": x if sx > sy else y, "rejected": y if sx > sy else x}
             for p, x, y, sx, sy in zip(prompts, a, b, ra, rb)]
    wrong = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in right]
    assert implicit_reward_accuracy(policy, reference, tokenizer, right, beta=0.1) == 1.0
    assert implicit_reward_accuracy(policy, reference, tokenizer, wrong, beta=0.1) == 0.0
    # Equal rewards are not a win: the reference against itself scores 0, not ½.
    assert implicit_reward_accuracy(reference, reference, tokenizer, right, beta=0.1) == 0.0


def test_evaluation_of_conversation_prompts_and_conversational_pairs(tiny_model, tokenizer):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    prompts = [[{"role": "user", "content": "The movie was"}], [{"role": "user", "content": "What\nis it?"}]]
    result = evaluate_policy(policy, reference, tokenizer, prompts, LengthJudge(), SamplingParams(max_new_tokens=4),
                             return_per_sample=True)
    rollout = result["per_sample"]["rollout"]
    assert rollout.prompt_ids[0] == tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"]
    assert result["kl"] == pytest.approx(float(sequence_kl(policy, reference, rollout).mean()), rel=1e-5)
    judge = ImplicitRewardJudge(policy, reference, tokenizer, beta=0.1)
    a, b = judge.score(prompts, ["good", "yes"]), judge.score(prompts, ["bad", "no"])
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": x if sx > sy else y}],
             "rejected": [{"role": "assistant", "content": y if sx > sy else x}]}
            for p, x, y, sx, sy in zip(prompts, ["good", "yes"], ["bad", "no"], a, b)]
    assert implicit_reward_accuracy(policy, reference, tokenizer, rows, beta=0.1) == 1.0


def test_format_table_aligns_metrics_by_column():
    table = format_table({"SFT": {"reward": 0.55, "kl": 0.0, "n": 100, "per_sample": {"x": 1}},
                          "DPO": {"reward": 0.9251, "kl": 3.14159, "n": 100}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "SFT", "DPO"]
    assert lines[2].split() == ["reward", "0.550", "0.925"]
    assert lines[3].split() == ["kl", "0.000", "3.142"]
    assert lines[4].split() == ["n", "100", "100"]
    assert "per_sample" not in table
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width


# ------------------------------------------------------------------------------------ plots


def assert_png(path):
    assert path.stat().st_size > 5000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400


def test_training_curves_plot(tmp_path):
    records = [{"step": s, "loss": 0.69 * 0.99**s, "rewards/accuracies": min(1.0, 0.5 + s / 200),
                "rewards/margins": s / 50} for s in range(0, 200, 10)]
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    fig = plot_training_curves([path], tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    assert [ax.get_xlabel() for ax in fig.axes] == ["optimizer step"] * 3
    assert all(ax.get_ylabel() and ax.get_title() for ax in fig.axes)
    assert "run" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_reward_distribution_plot(tmp_path):
    fig = plot_reward_distributions({"SFT": [0.1, 0.5, 0.6, 0.9], "DPO": [0.8, 0.95, 0.97]}, tmp_path / "r.png")
    assert_png(tmp_path / "r.png")
    ax = fig.axes[0]
    assert "gold reward" in ax.get_xlabel() and "number of samples" in ax.get_ylabel()
    assert ax.get_xlim() == (0.0, 1.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("SFT (mean 0.53") and labels[1].startswith("DPO")


def test_frontier_plot(tmp_path):
    points = [{"method": "DPO", "kl": k, "reward": r, "step": 100 * i}
              for i, (k, r) in enumerate([(0.0, 0.55), (1.0, 0.8), (2.0, 0.75), (3.0, 0.92)])]
    points += [{"method": "PPO", "kl": 2.0, "reward": 0.6, "step": 100}]
    fig = plot_frontier(points, tmp_path / "f.png")
    assert_png(tmp_path / "f.png")
    ax = fig.axes[0]
    assert "nats" in ax.get_xlabel() and "reward" in ax.get_ylabel()
    envelope = ax.get_lines()[0]  # DPO's: the (2.0, 0.75) checkpoint is below the frontier
    assert list(envelope.get_xdata()) == [0.0, 1.0, 3.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DPO", "PPO"]


def test_frontier_plot_draws_a_family_in_one_colour_with_the_legend_outside(tmp_path):
    points = [{"method": f"DPO β={b}", "family": "DPO β sweep", "kl": k, "reward": r, "step": i}
              for b in (0.1, 0.5) for i, (k, r) in enumerate([(0.0, 0.5), (b * 4, 0.8)])]
    points += [{"method": "Best-of-n", "kl": 0.3, "reward": 0.7, "step": 2}]
    fig = plot_frontier(points, tmp_path / "f.png")
    ax = fig.axes[0]
    first, second, alone = ax.get_lines()
    assert first.get_color() == second.get_color() != alone.get_color()
    assert first.get_marker() != second.get_marker()
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["DPO β sweep", "  DPO β=0.1", "  DPO β=0.5", "Best-of-n"]
    fig.canvas.draw()
    box = legend.get_window_extent().transformed(ax.transAxes.inverted())
    assert box.x0 > 1.0  # right of the axes: no checkpoint is hidden under it


def test_frontier_plot_cuts_the_kl_axis_at_max_kl_and_names_the_runs_past_it(tmp_path):
    points = [{"method": "DPO", "kl": k, "reward": r, "step": i} for i, (k, r) in enumerate([(0.0, 0.5), (3.0, 0.9)])]
    diverged = [{"method": "APO-down", "kl": k, "reward": 0.5, "step": i} for i, k in enumerate([0.0, 300.0])]
    ax = plot_frontier(points + diverged, tmp_path / "f.png", max_kl=24).axes[0]
    assert ax.get_xlim() == (0.0, 24.0) and "past 24, not drawn: APO-down" in ax.get_xlabel()
    ax = plot_frontier(points, tmp_path / "g.png", max_kl=24).axes[0]  # nothing past it: the axis fits the points
    assert ax.get_xlim()[1] < 24 and "not drawn" not in ax.get_xlabel()
