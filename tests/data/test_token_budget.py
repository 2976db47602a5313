"""Facts about token-budget batches: a permutation per epoch, the budget held, length grouping, fixed length."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
from safetensors.torch import load_file

from preftune import train
from preftune.config import ConfigError, build_config
from preftune.data.batching import TokenBudgetBatchSampler
from preftune.data.builtin import builtin_preferences
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.objective import LossSpec

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 120) for _ in range(300)] + [400, 250]  # the last two exceed the budget
BUDGET = 200


def epochs(sampler, n=2):
    out = []
    for epoch in range(n):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_every_example_appears_exactly_once_per_epoch():
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=0)
    for batches in epochs(sampler, 3):
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))


def test_no_batch_exceeds_the_budget_but_a_single_over_long_example():
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=0)
    alone = [b for b in sampler if sum(LENGTHS[i] for i in b) > BUDGET]
    assert sorted(alone) == [[300], [301]]  # kept, each in a batch of its own
    assert sampler.over_budget == 2
    assert max(len(b) for b in sampler) > 2  # the budget, not a fixed size, sets how many fit


def test_one_mega_chunk_gives_disjoint_greedily_filled_length_ranges():
    """With the whole data set in one chunk, batches are consecutive runs of the lengths sorted longest first,
    and each batch is full: the longest example of the next batch would not have fitted."""
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=0, group=10_000)
    batches = sorted(sampler, key=lambda b: (-max(LENGTHS[i] for i in b), -min(LENGTHS[i] for i in b)))
    for this, after in zip(batches, batches[1:]):
        assert min(LENGTHS[i] for i in this) >= max(LENGTHS[i] for i in after)
        assert sum(LENGTHS[i] for i in this) + max(LENGTHS[i] for i in after) > BUDGET


def test_batches_hold_similar_lengths():
    """Within a batch lengths come from one sorted chunk: their spread is far below that of random batches."""
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=0)

    def spread(batch):
        return max(LENGTHS[i] for i in batch) - min(LENGTHS[i] for i in batch)

    grouped = sum(spread(b) for b in sampler) / len(sampler)
    shuffled = list(range(len(LENGTHS)))
    random.Random(1).shuffle(shuffled)
    sizes = [len(b) for b in sampler]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    random_batches = [shuffled[s : s + n] for s, n in zip(starts, sizes)]
    assert grouped < 0.25 * sum(spread(b) for b in random_batches) / len(random_batches)


def test_length_is_fixed_while_the_order_changes_each_epoch():
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=0)
    first, second = epochs(sampler)
    assert len(first) == len(second) == len(sampler)
    assert first != second  # the order of the batches is reshuffled …
    assert sorted(first) == sorted(second)  # … their composition is not


def test_same_seed_gives_the_same_batches():
    assert epochs(TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=3)) == epochs(
        TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=3))
    assert epochs(TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=3)) != epochs(
        TokenBudgetBatchSampler(LENGTHS, BUDGET, seed=4))


def test_token_budgets_are_positive_and_serve_every_method():
    # KTO's mismatched completion is fixed per row, so any batch size (one example too) has its KL branch.
    assert build_config({"method": "kto", "max_tokens_per_batch": 512}).max_tokens_per_batch == 512
    with pytest.raises(ConfigError, match="max_tokens_per_batch must be >= 1"):
        build_config({"max_tokens_per_batch": 0})
    assert build_config({"max_tokens_per_batch": 512}).max_tokens_per_batch == 512


def test_a_token_budget_epoch_starts_at_ln2_and_sees_every_pair_once(tmp_path, monkeypatch, caplog):
    rows = builtin_preferences(24, seed=1)  # pairs of 31–43 tokens: 3 or 4 fit in 120
    rows.append({"prompt": "Tell me about the weather.", "chosen": " Sure!" + " The weather is lovely." * 30,
                 "rejected": " No."})  # longer than the budget: trains alone, not dropped
    tok = default_tokenizer(rows)
    seen = []  # examples per micro-batch, as the loop counts them for pairs_per_second
    count = LossSpec.examples
    monkeypatch.setattr(LossSpec, "examples", lambda self, batch: seen.append(count(self, batch)) or seen[-1])
    caplog.set_level("INFO", logger="preftune")
    config = dict(output_dir=str(tmp_path / "budget"), cache_dir=str(tmp_path / "cache"), num_train_epochs=1,
                  max_tokens_per_batch=120, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0)
    result = train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=rows)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    assert sum(seen) == len(rows)
    assert 1 in seen and max(seen) >= 3  # the over-long pair alone, short ones several to a batch
    assert result.global_step == len(seen)  # one optimizer step per micro-batch, one epoch
    assert any("1 example(s) longer" in r.message for r in caplog.records)


def test_a_resumed_token_budget_run_equals_the_uninterrupted_one(tmp_path):
    """Resuming mid-way through the second epoch skips the batches already seen of that epoch's order."""
    rows = builtin_preferences(24, seed=1)
    tok = default_tokenizer(rows)

    def run(name, **extra):
        config = dict(output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=12,
                      num_train_epochs=2, save_steps=11, max_tokens_per_batch=120, learning_rate=1e-3,
                      logging_steps=1, disable_tqdm=True, seed=0) | extra
        return train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=rows)

    whole = run("whole")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-11", tmp_path / "resumed" / "checkpoint-11")
    resumed = run("resumed", resume_from_checkpoint=True)
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (whole, resumed))
    assert resumed.global_step == 12 and a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
