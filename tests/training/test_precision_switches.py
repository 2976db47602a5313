"""The precision switches of issue 22's ablations: ``reference_dtype`` (the held reference cast to bf16) and
``generation_dtype`` (the samples a run trains on drawn under bf16 autocast), from YAML through `preftune train`
and through the trainer, against the code paths they replace."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import PreferenceTrainer
from preftune.cli import main
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.rollout.sampling import generate

ROWS = builtin_preferences(16, seed=3)
JUDGE = "def chars(prompts, completions):\n    return [float(len(c) % 5) for c in completions]\n"


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("precision")
    build_tiny_model(tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in ROWS))
    (root / "judge.py").write_text(JUDGE)
    return root


def _trainer(files, name, **keys) -> PreferenceTrainer:
    cfg = build_config(dict(model_name_or_path=str(files / "sft"), dataset=str(files / "prompts.jsonl"),
                            method="online_dpo", judge=f"{files / 'judge.py'}:chars", per_device_train_batch_size=4,
                            max_completion_length=6, max_steps=1, bf16=False, seed=0, disable_tqdm=True,
                            cache_dir=str(files / "cache"), output_dir=str(files / name)) | keys)
    return PreferenceTrainer(cfg)


def test_a_bf16_reference_is_held_in_bf16_within_its_tolerance(files):
    """reference_dtype: bfloat16 casts the held reference (the policy stays fp32); its sequence log-probs stay within
    0.05 nats of the fp32 reference's on the same completions, and differ (the cast happened)."""
    half, full = _trainer(files, "half", reference_dtype="bfloat16"), _trainer(files, "full")
    s_half, s_full = half._prepare(), full._prepare()
    assert {p.dtype for p in s_half.reference.module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in s_half.inputs.model.parameters()} == {torch.float32}
    assert {p.dtype for p in s_full.reference.module.parameters()} == {torch.float32}
    batch = s_half.inputs.collator.groups([r["prompt_ids"] for r in s_half.inputs.train][:4],
                                          [[5, 6, 7, 8, 9, 10]] * 4, 1)
    got = s_half.reference.outputs(batch)["logps"].float()
    want = s_full.reference.outputs(batch)["logps"]
    assert (got - want).abs().max() < 0.05 and (got - want).abs().max() > 0
    assert s_half.reference.module.model.lm_head.weight.element_size() == 2
    assert half.resolved.precompute_ref_log_probs is False  # held, as asked


def test_reference_dtype_keeps_an_offline_reference_in_memory_and_trains_from_yaml(files, tmp_path):
    config = tmp_path / "run.yaml"
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config.write_text(f"model_name_or_path: {files / 'sft'}\ndataset: {rows}\nmethod: dpo\nreference_dtype: bfloat16\n"
                      f"max_steps: 2\nper_device_train_batch_size: 4\nbf16: false\ndisable_tqdm: true\n"
                      f"cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'run'}\nlogging_steps: 1\n")
    assert main(["train", str(config)]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "reference_dtype: bfloat16" in saved and "precompute_ref_log_probs: false" in saved
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=0.01)  # π ≈ π_ref (bf16) at the first step


@pytest.mark.parametrize("keys, message", [
    (dict(reference_dtype="bfloat16", precompute_ref_log_probs=True), "a precomputed reference is freed"),
    (dict(reference_dtype="bfloat16", use_peft=True), "under LoRA the reference is the policy with its adapters off"),
    (dict(generation_dtype="float16"), "generation_dtype must be one of 'float32', 'bfloat16'"),
])
def test_precision_switches_that_cannot_work_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"method": "dpo"} | keys)


def test_generation_dtype_samples_under_bf16_autocast_and_evaluation_does_not(files, tok):
    """The samples an online run trains on are the ones generate draws under bf16 autocast (same prompts and seeds);
    held-out samples are drawn in the run's precision (fp32 here), as without the switch."""
    trainer = _trainer(files, "gen", generation_dtype="bfloat16")
    session = trainer._prepare()
    sampler, model = trainer.algorithm.sampler, session.model
    rows = [dict(r) for r in session.inputs.train][:4]
    params = sampler.sampling(None, n=2, prompt_seeds=sampler.prompt_seeds(rows, 0))
    ids = [r["prompt_ids"] for r in rows]
    trained = sampler.sample(rows, model, params)
    held_out = sampler.sample(rows, model, params, training=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = generate(model, tok, [r["prompt"] for r in rows], params, prompt_ids=ids)
    with torch.no_grad():
        fp32 = generate(model, tok, [r["prompt"] for r in rows], params, prompt_ids=ids)
    assert trained.completion_ids == bf16.completion_ids and trained.logprobs == bf16.logprobs
    assert held_out.completion_ids == fp32.completion_ids and held_out.logprobs == fp32.logprobs
    assert trained.logprobs != fp32.logprobs  # the switch changed the numerics


def test_generation_dtype_reaches_the_rounds_samples(files, monkeypatch):
    """A run in rounds draws the samples it pairs and trains on under bf16 autocast, its held-out samples (π_0's and
    each round's evaluation) in the run's precision."""
    from preftune.training import rounds

    seen = []

    def spy(model, tokenizer, prompts, params, **kwargs):
        seen.append((kwargs.get("source"), torch.is_autocast_enabled("cpu") and
                     torch.get_autocast_dtype("cpu") == torch.bfloat16))
        return generate(model, tokenizer, prompts, params, **kwargs)

    monkeypatch.setattr(rounds, "generate", spy)
    cfg = build_config(dict(model_name_or_path=str(files / "sft"), dataset=str(files / "prompts.jsonl"),
                            method="iterative_dpo", judge=f"{files / 'judge.py'}:chars", num_rounds=1,
                            num_generations=2, per_device_train_batch_size=4, max_completion_length=4, max_steps=1,
                            bf16=False, seed=0, disable_tqdm=True, generation_dtype="bfloat16", eval_split_size=0.25,
                            cache_dir=str(files / "cache"), output_dir=str(files / "rounds")))
    PreferenceTrainer(cfg).train()
    assert ("the training prompts", True) in seen
    assert all(not bf16 for source, bf16 in seen if source != "the training prompts") and len(seen) > 1
