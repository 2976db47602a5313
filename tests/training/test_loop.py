"""Facts about the training loop: step-0 loss, equivalences between code paths, resume, outputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import train
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import RunDirError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

ROWS = builtin_preferences(48, seed=1)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def run(tmp_path, tok, name="run", model=None, rows=ROWS, **overrides):
    config = dict(output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=3,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
                  seed=0, bf16=False) | overrides  # fp32: the equalities below are exact
    model = model or build_tiny_model(tok, seed=0)
    return train(config, model=model, tokenizer=tok, train_dataset=rows)


def final_weights(result):
    return load_file(str(result.final_dir / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def metrics(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_logged_dpo_loss_is_ln2(tmp_path, tok):
    result = run(tmp_path, tok, max_steps=1)
    first = metrics(result)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # ties are not wins
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm",
                 "learning_rate", "pairs_per_second", "tokens_per_second"):
        assert name in first


def test_final_model_loads_with_from_pretrained_and_differs_from_start(tmp_path, tok):
    start = build_tiny_model(tok, seed=0)
    result = run(tmp_path, tok)
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    moved = [not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), start.state_dict().values())]
    assert any(moved)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["reference"] == "precomputed"
    assert (result.output_dir / "config.yaml").exists()


def test_precomputed_and_online_reference_give_equal_training(tmp_path, tok):
    online = run(tmp_path, tok, "online", precompute_ref_log_probs=False)
    cached = run(tmp_path, tok, "cached", precompute_ref_log_probs=True)
    assert [m["loss"] for m in metrics(online)] == pytest.approx([m["loss"] for m in metrics(cached)], abs=1e-6)
    assert_same_weights(final_weights(online), final_weights(cached))


def test_reference_cache_is_reused_by_a_second_run(tmp_path, tok, caplog):
    run(tmp_path, tok, "first", max_steps=1)
    caplog.set_level("INFO", logger="preftune")
    run(tmp_path, tok, "second", max_steps=1)
    assert any("read from cache" in r.message for r in caplog.records)


def test_gradient_accumulation_equals_the_large_batch(tmp_path, tok):
    # Adam divides by sqrt(v) + eps: with the default eps, gradients of ~1e-9 (rounding noise) become
    # lr-sized steps. A large eps makes the update proportional to the gradient, which is what we compare.
    same = dict(adam_epsilon=1.0, learning_rate=1e-2)
    large = run(tmp_path, tok, "large", per_device_train_batch_size=4, gradient_accumulation_steps=1, **same)
    accumulated = run(tmp_path, tok, "accum", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      **same)
    assert_same_weights(final_weights(large), final_weights(accumulated), atol=1e-7)
    assert [m["loss"] for m in metrics(large)] == pytest.approx([m["loss"] for m in metrics(accumulated)], abs=1e-6)


def test_resumed_run_equals_uninterrupted_run(tmp_path, tok):
    whole = run(tmp_path, tok, "whole", max_steps=4, save_steps=2, num_train_epochs=3)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(tmp_path, tok, "resumed", max_steps=4, save_steps=2, num_train_epochs=3,
                  resume_from_checkpoint=True)
    assert resumed.global_step == 4
    assert_same_weights(final_weights(whole), final_weights(resumed))
    assert [m["loss"] for m in metrics(resumed) if m["step"] > 2] == pytest.approx(
        [m["loss"] for m in metrics(whole) if m["step"] > 2], abs=1e-6)


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, tok):
    run(tmp_path, tok, "done", max_steps=1)
    with pytest.raises(RunDirError, match="overwrite_output_dir"):
        run(tmp_path, tok, "done", max_steps=1)


def test_lora_reference_is_the_base_model(tmp_path, tok):
    """Under LoRA the adapters-off reference reproduces the base model, so step 0 is ln 2 and the
    saved adapter loads onto the base."""
    from peft import PeftModel

    result = run(tmp_path, tok, "lora", use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2,
                 precompute_ref_log_probs=False, save_merged_model=True)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (result.final_dir / "adapter_config.json").exists()
    base = build_tiny_model(tok, seed=0)
    model = PeftModel.from_pretrained(base, result.final_dir)
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final-merged")
    ids = torch.tensor([tok("Tell me about the weather. Sure!")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, build_tiny_model(tok, seed=0)(ids).logits)


def test_tensorboard_receives_the_logged_metrics(tmp_path, tok):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(tmp_path, tok, "tb", report_to=["tensorboard"])
    events = EventAccumulator(str(result.output_dir / "logs" / "preftune"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics(result)], abs=1e-6)
    assert "rewards/accuracies" in events.Tags()["scalars"]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mistral"])
def test_other_architectures_start_at_ln2_and_export(tmp_path, tok, arch):
    result = run(tmp_path, tok, arch, model=build_tiny_model(tok, arch=arch, seed=0), max_steps=2)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).config.model_type == arch


def test_bf16_autocast_keeps_step_zero_at_ln2(tmp_path, tok):
    result = run(tmp_path, tok, "bf16", bf16=True, max_steps=1)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_default_precision_is_bf16_exactly_where_it_is_native(tmp_path, tok, monkeypatch, native):
    from preftune.training import loop

    monkeypatch.setattr(loop, "native_bf16", lambda: native)
    result = run(tmp_path, tok, "auto", bf16=None, max_steps=1)
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert saved["bf16"] is native  # the resolved choice is what the run directory records
    resolve = lambda **kw: loop.resolve_precision(build_config(kw), embedded_model=False)  # noqa: E731
    assert resolve(fp16=True) is False  # fp16 asked for: no bf16 on top
    assert resolve(dtype="float16") is False
    assert resolve(bf16=False) is False and resolve(bf16=True) is True  # explicit choices stand
    assert loop.resolve_precision(build_config({}), embedded_model=True) is False  # the toy model: fp32


def test_the_runs_choices_stay_out_of_the_config(tmp_path, tok):
    """Precision, layout and the reference's plan left open are the run's choices (trainer.resolved), recorded in
    config.yaml and the model card; the config keeps what the user wrote, so a second trainer from it chooses again."""
    from preftune.training.loop import PreferenceTrainer

    cfg = build_config(dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=1,
                            per_device_train_batch_size=4, disable_tqdm=True, seed=0))
    trainer = PreferenceTrainer(cfg, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)
    result = trainer.train()
    open_keys = ("bf16", "fused_mlp", "prefix_sharing", "padding_free", "precompute_ref_log_probs")
    assert all(getattr(trainer.cfg, key) is None for key in open_keys) and trainer.cfg == cfg
    assert trainer.resolved.fused_mlp and trainer.resolved.prefix_sharing and trainer.resolved.padding_free
    assert trainer.resolved.precompute_ref_log_probs is True
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert {key: saved[key] for key in open_keys} == {key: getattr(trainer.resolved, key) for key in open_keys}
    card = (result.final_dir / "README.md").read_text()
    assert "| `padding_free` | True |" in card and "| `precompute_ref_log_probs` | True |" in card


def test_explicit_reference_checkpoint(tmp_path, tok):
    same = tmp_path / "same"
    build_tiny_model(tok, seed=0).save_pretrained(same)
    result = run(tmp_path, tok, "explicit", ref_model_name_or_path=str(same), max_steps=1,
                 precompute_ref_log_probs=False)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert json.loads((result.output_dir / "summary.json").read_text())["reference"] == "checkpoint"
    other = tmp_path / "other"
    build_tiny_model(tok, seed=1).save_pretrained(other)
    result = run(tmp_path, tok, "explicit-other", ref_model_name_or_path=str(other), max_steps=1)
    assert metrics(result)[0]["rewards/margins"] != pytest.approx(0.0, abs=1e-3)


def test_tr_dpo_hard_sync_makes_the_reference_the_policy(tmp_path, tok):
    """With α = 1 and τ = 2 the reference becomes the policy after step 2, so step 3 starts at ln 2 again."""
    result = run(tmp_path, tok, "trdpo", sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=2,
                 max_steps=3)
    losses = [m["loss"] for m in metrics(result)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[1] != pytest.approx(math.log(2), abs=1e-4)
    assert losses[2] == pytest.approx(math.log(2), abs=1e-6)


def test_ld_alpha_one_is_plain_dpo_and_zero_is_not(tmp_path, tok):
    plain = run(tmp_path, tok, "plain")
    ld_one = run(tmp_path, tok, "ld1", ld_alpha=1.0)
    ld_zero = run(tmp_path, tok, "ld0", ld_alpha=0.0)
    assert_same_weights(final_weights(plain), final_weights(ld_one))
    assert [m["loss"] for m in metrics(ld_zero)][1:] != pytest.approx([m["loss"] for m in metrics(plain)][1:])
    # LD-DPO with α = 0 scores only the shared length: logged log-probs cover fewer tokens.
    assert metrics(ld_zero)[0]["logps/chosen"] > metrics(plain)[0]["logps/chosen"]


def test_wpo_weights_scale_the_step_zero_loss(tmp_path, tok):
    """At step 0 every pair's DPO loss is ln 2, so WPO's loss is ln 2 × mean(w_c·w_r) < ln 2."""
    result = run(tmp_path, tok, "wpo", use_weighting=True, max_steps=1)
    first = metrics(result)[0]["loss"]
    assert 0 < first < math.log(2)


def test_unpaired_rows_train_kto(tmp_path, tok):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in ROWS[:24]]
    rows += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in ROWS[24:]]
    result = run(tmp_path, tok, "kto", method="kto", rows=rows, max_steps=2)
    first = metrics(result)[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # λ·(1 − σ(0)) at π = π_ref


def test_conversational_rows_train(tmp_path, tok):
    rows = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
    result = run(tmp_path, tok, "chat", rows=rows, max_steps=1)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_rmsprop_and_periodic_eval(tmp_path, tok):
    result = run(tmp_path, tok, "rms", optim="rmsprop", eval_split_size=0.25, eval_steps=2, max_steps=4)
    evals = [m for m in metrics(result) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]


def test_prefix_sharing_and_packing_train_like_the_padded_layout(tmp_path, tok):
    """The default layout (prompt once, pairs packed) trains to the weights of the plain padded one."""
    padded = run(tmp_path, tok, "padded", prefix_sharing=False, padding_free=False)
    fast = run(tmp_path, tok, "fast")
    summary = json.loads((fast.output_dir / "summary.json").read_text())
    assert summary["layout"] == "prefix sharing, padding-free packing"
    assert [m["loss"] for m in metrics(fast)] == pytest.approx([m["loss"] for m in metrics(padded)], abs=1e-5)
    assert_same_weights(final_weights(padded), final_weights(fast), atol=1e-5)


@pytest.mark.parametrize("rows", [
    [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS],
    [{"text": r["prompt"] + r["chosen"]} for r in ROWS],
    ROWS,  # paired rows: SFT on the chosen completions (Preferred-FT)
], ids=["prompt-completion", "text", "paired"])
def test_sft_lowers_the_held_out_nll(tmp_path, tok, rows):
    result = run(tmp_path, tok, "sft", method="sft", rows=rows, max_steps=6, eval_split_size=0.25, eval_steps=1,
                 learning_rate=5e-3)
    records = metrics(result)
    evals = [m["eval_loss"] for m in records if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.5  # per-token NLL in nats
    assert "samples_per_second" in records[0] and "rewards/margins" not in records[0]
    assert json.loads((result.output_dir / "summary.json").read_text())["reference"] == "none"


def test_reward_model_learns_a_separable_preference(tmp_path, tok):
    """Bradley–Terry on a score head: kind replies beat rude ones on held-out pairs, and final/ loads as a
    sequence classifier that ranks them."""
    from transformers import AutoModelForSequenceClassification

    result = run(tmp_path, tok, "rm", method="reward", max_steps=12, eval_split_size=0.25, learning_rate=3e-3)
    records = metrics(result)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # random head: r_w ≈ r_l
    assert result.eval_metrics["eval_rewards/accuracies"] >= 0.9
    assert "logps/chosen" not in records[0]
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    kind = tok("Tell me about the weather. Sure! The weather is lovely.", return_tensors="pt")
    rude = tok("Tell me about the weather. No. The weather is boring and so are you.", return_tensors="pt")
    with torch.no_grad():
        assert model(**kind).logits.item() > model(**rude).logits.item()


def test_length_grouped_batches_hold_similar_lengths_and_train_like_shuffled(tmp_path, tok):
    from preftune.data.batching import LengthGroupedSampler

    lengths = [5, 50, 6, 48, 7, 52, 4, 49]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, group=2)
    order = list(sampler)
    assert sorted(order) == list(range(8))  # a permutation: nothing dropped or repeated
    assert sorted(lengths[i] for i in order[:4]) == [48, 49, 50, 52]  # the long ones share a batch
    many = LengthGroupedSampler(list(range(40)), batch_size=4, seed=0, group=1)
    first = list(many)
    many.set_epoch(1)
    assert list(many) != first and sorted(list(many)) == sorted(first)  # reshuffled each epoch
    result = run(tmp_path, tok, "grouped", group_by_length=True, prefix_sharing=False, padding_free=False)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
