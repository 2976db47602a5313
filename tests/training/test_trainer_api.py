"""The trainer a TRL user expects: evaluate(), save_model(), model, logging callbacks, and TRL's metrics."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import PreferenceTrainer
from preftune.config import build_config
from preftune.data import formats, tokenize
from preftune.data.batching import PreferenceCollator
from preftune.data.builtin import builtin_preferences
from preftune.modeling.logprobs import LogProbModel
from preftune.modeling.reference import NoReference
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.objective import LossSpec, batch_loss
from preftune.training.tracking import MetricWindow

ROWS = builtin_preferences(32, seed=9)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def make(tmp_path, tok, callbacks=(), **overrides):
    config = dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=3,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0,
                  bf16=False) | overrides
    return PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                             train_dataset=ROWS[:24], eval_dataset=ROWS[24:], callbacks=list(callbacks))


class Recorder:
    def __init__(self):
        self.logged, self.evaluated, self.ended = [], [], None

    def on_log(self, record):
        self.logged.append(record)

    def on_evaluate(self, record):
        self.evaluated.append(record)

    def on_train_end(self, result):
        self.ended = result


def test_evaluate_save_model_and_callbacks(tmp_path, tok):
    recorder = Recorder()
    trainer = make(tmp_path, tok, callbacks=[recorder])
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref: DPO's ln 2
    assert before["eval_runtime"] > 0 and before["eval_samples_per_second"] > 0
    result = trainer.train()
    after = trainer.evaluate()
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    final_eval = next(r for r in reversed(logged) if "eval_loss" in r)
    assert after["eval_loss"] == pytest.approx(final_eval["eval_loss"], abs=1e-6) and after["eval_loss"] < math.log(2)
    assert recorder.logged == logged  # every record that reached metrics.jsonl, in order
    assert [r["eval_loss"] for r in recorder.evaluated] == pytest.approx(
        [before["eval_loss"], final_eval["eval_loss"], after["eval_loss"]])
    assert recorder.ended is result
    assert before["step"] == 0 and after["step"] == result.global_step > 0  # the policy's steps, not None
    saved = trainer.save_model(tmp_path / "exported")
    assert isinstance(trainer.model, torch.nn.Module) and not hasattr(trainer.model, "score_index")
    exported, final = load_file(saved / "model.safetensors"), load_file(result.final_dir / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert AutoModelForCausalLM.from_pretrained(saved) is not None


def _window_of_one_batch(tok, method, rows, **hparams):
    cfg = build_config({"method": method, **hparams})
    spec = LossSpec.from_config(cfg)
    model = build_tiny_model(tok, seed=2)
    collator = PreferenceCollator(tok.pad_token_id, prefix_sharing=False, sft=spec.kind == "sft")


    canonical, _ = formats.normalise(datasets.Dataset.from_list(rows), "rows")
    if spec.kind == "sft":
        canonical = formats.paired_to_sft(canonical)
    tokenized, _ = tokenize.tokenize_rows(canonical, tok, max_length=64, max_prompt_length=32, cache_dir=None)
    batch = collator([tokenized[i] for i in range(len(tokenized))])
    window = MetricWindow()
    batch_loss(LogProbModel(model), NoReference(), batch, spec, window)
    return window, model, batch


def _full_logits(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    return logits[batch["score_index"]].double()


def test_trl_metrics_equal_a_direct_computation(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    rows = ROWS[:4]
    window, model, batch = _window_of_one_batch(tok, "simpo", rows)
    logits = _full_logits(model, batch)
    seq = batch["score_seq"]
    per_seq_mean = torch.zeros(8, dtype=torch.float64).index_add(0, seq, logits.mean(-1)) / batch["seq_tokens"]
    sums, counts = window.sums, window.counts
    assert sums["logits/chosen"] / counts["logits/chosen"] == pytest.approx(per_seq_mean[:4].mean().item(), abs=1e-5)
    assert sums["logits/rejected"] / counts["logits/rejected"] == pytest.approx(per_seq_mean[4:].mean().item(),
                                                                                abs=1e-5)

    window, model, batch = _window_of_one_batch(tok, "sft", rows)
    logits = _full_logits(model, batch)
    hits = (logits.argmax(-1) == batch["score_target"]).double()
    per_seq = torch.zeros(4, dtype=torch.float64).index_add(0, batch["score_seq"], hits) / batch["seq_tokens"]
    accuracy = window.sums["mean_token_accuracy"] / window.counts["mean_token_accuracy"]
    assert accuracy == pytest.approx(per_seq.mean().item(), abs=1e-9)


def test_combined_methods_log_each_term_and_orpo_its_parts(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    window, _, _ = _window_of_one_batch(tok, ["simpo", "sft"], ROWS[:4], loss_weights=[1.0, 0.5])
    mean = lambda name: window.sums[name] / window.counts[name]  # noqa: E731
    assert mean("loss") == pytest.approx(mean("loss/simpo") + 0.5 * mean("loss/sft"), abs=1e-6)
    window, _, _ = _window_of_one_batch(tok, "orpo", ROWS[:4], beta=0.25)
    assert mean("loss") == pytest.approx(mean("nll_loss") - 0.25 * mean("log_odds_ratio"), abs=1e-6)


def test_kto_logs_its_kl_reference_point(tmp_path, tok):
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(ROWS)]
    trainer = PreferenceTrainer(build_config(dict(method="kto", output_dir=str(tmp_path / "kto"), max_steps=2,
                                                  cache_dir=str(tmp_path / "cache"), logging_steps=1, bf16=False,
                                                  disable_tqdm=True, learning_rate=1e-2)),
                                model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=unpaired)
    result = trainer.train()
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref: z₀ = 0
    assert logged[1]["kl"] >= 0.0 and "logits/chosen" in logged[0]
