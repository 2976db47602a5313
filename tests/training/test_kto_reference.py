"""KTO's reference point z₀ (Ethayarajh et al. 2024, arXiv 2402.01306, §4) is estimated on mismatched pairs
(x_i, y_j): log π(y_j|x_i) − log π_ref(y_j|x_i) for the *same* pair on both sides. Each row's y_j is fixed when
the data is tokenized, so the reference precomputed in file order and the live reference under a shuffled
loader see the same pairs, and train identically."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from preftune import train
from preftune.data import formats, tokenize
from preftune.data.builtin import ASKS, KIND, RUDE, TOPICS
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

# Twelve rows, every prompt different, desirable and undesirable alternating.
ROWS = [{"prompt": ASKS[i % len(ASKS)].format(t=topic),
         "completion": " " + (KIND if i % 2 == 0 else RUDE)[i % 4].format(T=topic.capitalize()),
         "label": i % 2 == 0}
        for i, topic in enumerate(TOPICS[:12])]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": ""} for r in ROWS])


def run(tmp_path, tok, name, precompute):
    config = dict(method="kto", output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=5,
                  num_train_epochs=3, per_device_train_batch_size=4, per_device_eval_batch_size=5,
                  learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=3, bf16=False,
                  precompute_ref_log_probs=precompute)
    result = train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(str(result.final_dir / "model.safetensors"))


def test_precomputed_and_live_reference_train_kto_identically_under_shuffling(tmp_path, tok):
    live, live_weights = run(tmp_path, tok, "live", precompute=False)
    cached, cached_weights = run(tmp_path, tok, "precomputed", precompute=True)
    # At step 1 the policy is the reference: every ρ and z₀ are 0, so each loss is λ/2 = 0.5 on both paths.
    assert live[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert cached[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    for name in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
        assert [m[name] for m in cached] == pytest.approx([m[name] for m in live], rel=1e-5, abs=1e-6), name
    assert live_weights.keys() == cached_weights.keys()
    for key in live_weights:
        torch.testing.assert_close(cached_weights[key], live_weights[key], rtol=0, atol=1e-6, msg=key)


def test_each_row_gets_a_completion_of_another_prompt_fixed_at_tokenization(tmp_path, tok):
    """Pairs split for KTO alternate chosen/rejected under one prompt; the mismatched completion comes from
    another prompt (the next pair's completion of the same side), and is cut to fit ``max_length``."""
    pairs = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(4)]
    rows = formats.paired_to_unpaired(formats.normalise(Dataset.from_list(pairs), "pairs")[0])
    plain, _ = tokenize.tokenize_rows(rows, tok, max_length=None, max_prompt_length=None,
                                      cache_dir=tmp_path / "cache")
    with_kl, _ = tokenize.tokenize_rows(rows, tok, max_length=None, max_prompt_length=None,
                                        cache_dir=tmp_path / "cache", kl_completions=True)
    completions = plain["completion_ids"][:]
    assert with_kl["kl_completion_ids"][:] == [completions[(i + 2) % 8] for i in range(8)]
    # The tokenized data (hence the precomputed reference's cache key) is told apart by the column.
    assert with_kl._fingerprint != plain._fingerprint

    short, _ = tokenize.tokenize_rows(rows, tok, max_length=6, max_prompt_length=None,
                                      cache_dir=tmp_path / "cache", kl_completions=True)
    for row in short:
        assert len(row["prompt_ids"]) + len(row["kl_completion_ids"]) <= 6


@pytest.mark.parametrize(("prompts", "partners"), [
    ("abcd", [1, 2, 3, 0]),                # distinct prompts: the next row
    ("aabbcc", [2, 3, 4, 5, 0, 1]),        # pairs split: the next pair, same side
    ("aaaa", [1, 2, 3, 0]),                # one prompt only: another completion of it
    ("aba", [1, 0, 1]),                    # row 0 + 1 is 'b'; row 2 + 1 would be 'a' again, so the next 'b'
    ("a", [0]),
])
def test_mismatched_partners_prefer_another_prompt(prompts, partners):
    assert tokenize.mismatched_partners(list(prompts)) == partners
