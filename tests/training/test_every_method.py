"""Every registered method trains through the one loop and moves the policy toward the chosen responses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import train
from preftune.data import formats, tokenize
from preftune.data.batching import PreferenceCollator
from preftune.data.builtin import builtin_preferences
from preftune.methods.registry import METHODS
from preftune.modeling.logprobs import completion_logps, model_inputs
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

TRAIN = builtin_preferences(40, seed=11)
HELD_OUT = builtin_preferences(16, seed=12)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(TRAIN + HELD_OUT)


@pytest.fixture(scope="module")
def held_out_batch(tok, tmp_path_factory):
    rows, _ = formats.normalise(formats.datasets.Dataset.from_list(HELD_OUT), "held-out")
    ids, _ = tokenize.tokenize_rows(rows, tok, max_length=128, max_prompt_length=64,
                                    cache_dir=tmp_path_factory.mktemp("cache"))
    return PreferenceCollator(tok.pad_token_id)(list(ids))


@torch.no_grad()
def preference_gap(model, batch) -> float:
    """Mean over held-out pairs of log π(y_w|x) − log π(y_l|x)."""
    logps = completion_logps(model.eval(), **model_inputs(batch))
    n = logps["logps"].shape[0] // 2
    return (logps["logps"][:n] - logps["logps"][n:]).mean().item()


# Online methods sample their own data and are tested in test_online.py; methods trained in rounds sample their own
# pairs and are tested in test_rounds.py.
@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items()
                                          if m.model == "causal_lm" and not m.online and not m.rounds))
def test_method_trains_and_raises_the_held_out_preference_gap(method, tok, held_out_batch, tmp_path):
    start = build_tiny_model(tok, seed=0)
    before = preference_gap(start, held_out_batch)
    result = train(dict(method=method, output_dir=str(tmp_path / method), cache_dir=str(tmp_path / "cache"),
                        max_steps=8, per_device_train_batch_size=4, learning_rate=2e-3, disable_tqdm=True,
                        logging_steps=1, seed=0, max_length=128, max_prompt_length=64, bf16=False),
                   model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=TRAIN)
    after = preference_gap(AutoModelForCausalLM.from_pretrained(result.final_dir), held_out_batch)
    assert after > before + 1.0, f"{method}: gap {before:.3f} → {after:.3f}"
