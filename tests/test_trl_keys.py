"""A TRL user's config runs: TRL's key names map onto preftune's (packing, max_completion_length, chat_template,
dataset_name, loss_type: sigmoid, the strategy keys …), and every TRL key preftune has no use for says what to write
instead. examples/trl_dpo.yaml — a typical TRL DPO file with QLoRA, an 8-bit optimizer, evaluation, TensorBoard and
push_to_hub — loads unchanged and trains."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import datasets
import pytest

from preftune import train
from preftune.config import ALIASES, FIELDS, TRL_KEYS, TrainConfig, build_config, load_config
from preftune.data import tokenize
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, HubError
from preftune.modeling.tiny import CHAT_TEMPLATE, build_tiny_model, default_model, default_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_dpo.yaml"
ROWS = builtin_preferences(24, seed=7)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def metrics(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the typical TRL DPO file --------------------------------------------------------------------------------


def test_a_trl_users_dpo_yaml_loads_unchanged():
    cfg = load_config(EXAMPLE)
    assert cfg.method == "dpo"  # loss_type: sigmoid
    assert cfg.dataset == cfg.eval_dataset == "trl-lib/ultrafeedback_binarized"  # dataset_name, dataset_test_split
    assert (cfg.dataset_split, cfg.eval_split, cfg.eval_steps) == ("train", "test", 100)
    assert (cfg.dtype, cfg.optim, cfg.load_in_4bit, cfg.use_bnb_nested_quant) == ("bfloat16", "paged_adamw_8bit",
                                                                                    True, True)
    assert (cfg.max_completion_length, cfg.save_steps, cfg.report_to) == (512, 500, ["tensorboard"])
    assert cfg.push_to_hub and cfg.hub_model_id == "Qwen2.5-0.5B-DPO-QLoRA"


def test_a_trl_users_dpo_yaml_trains_one_step(tmp_path, tok):
    pytest.importorskip("bitsandbytes", reason="the example trains QLoRA with an 8-bit optimizer: pip install "
                                               "bitsandbytes")
    cfg = load_config(EXAMPLE)
    with pytest.raises(HubError, match="offline"):  # the tests run offline: the upload would fail, so it fails now
        from preftune.training.hub import check_push

        check_push(cfg)
    # Only the places change (the embedded tiny model saved as a checkpoint, local data with a test split), and the
    # run is cut to one step of one micro-batch.
    default_model(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:16]),
                          "test": datasets.Dataset.from_list(ROWS[16:])}).save_to_disk(tmp_path / "data")
    cfg = load_config(EXAMPLE, [f"model_name_or_path={tmp_path / 'model'}", f"dataset_name={tmp_path / 'data'}",
                                f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "max_steps=1",
                                "gradient_accumulation_steps=1", "push_to_hub=false", "disable_tqdm=true"])
    result = train(cfg)
    records = metrics(result)
    # bf16 autocast on a 4-bit base: the precomputed reference and the policy agree to bf16's precision at step 0.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)
    assert any("eval_loss" in r for r in records)  # evaluated on the dataset's test split
    assert (result.final_dir / "adapter_model.safetensors").exists()
    assert (result.output_dir / "logs").is_dir()  # TensorBoard


# ---- keys that map -------------------------------------------------------------------------------------------


def test_trl_names_map_onto_preftunes():
    cfg = build_config({"packing": True, "torch_dtype": "bfloat16", "dataset_name": "org/prefs",
                        "dataset_train_split": "train_prefs", "max_seq_length": 2048, "chat_template_path": "{{ x }}"})
    assert (cfg.padding_free, cfg.dtype, cfg.dataset, cfg.dataset_split, cfg.max_length, cfg.chat_template) == (
        True, "bfloat16", "org/prefs", "train_prefs", 2048, "{{ x }}")
    with pytest.raises(ConfigError, match="'packing' is another name for 'padding_free'"):
        build_config({"packing": True, "padding_free": False})


def test_trl_loss_types_name_methods():
    assert build_config({"loss_type": "sigmoid"}).method == "dpo"
    assert build_config({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}).method == ["dpo", "sft"]
    assert TrainConfig(loss_type="sigmoid").method == "dpo"
    assert build_config({"loss_type": "ipo"}).method == "ipo"  # the same name in both
    with pytest.raises(ConfigError, match="unknown method 'aot'"):
        build_config({"loss_type": "aot"})


def test_strategies_imply_what_transformers_does():
    cfg = build_config({"eval_strategy": "steps", "logging_steps": 5, "save_strategy": "steps"})
    assert (cfg.eval_steps, cfg.save_steps) == (5, 500)
    cfg = build_config({"dataset_name": "org/prefs", "dataset_test_split": "test", "eval_strategy": "steps"})
    assert cfg.eval_dataset == "org/prefs" and cfg.eval_split == "test"
    # TRL's default eval_strategy is "no": a test split alone evaluates nothing.
    assert build_config({"dataset_name": "org/prefs", "dataset_test_split": "test"}).eval_dataset is None
    assert build_config({"save_strategy": "no"}).save_steps is None
    with pytest.raises(ConfigError, match="save_strategy: no, but save_steps"):
        build_config({"save_strategy": "no", "save_steps": 10})
    with pytest.raises(ConfigError, match="eval_strategy: no, but eval_split_size"):
        build_config({"eval_strategy": "no", "eval_split_size": 0.1})


# ---- keys that do not map say what to do ---------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(TRL_KEYS))
def test_every_trl_key_without_a_preftune_field_says_what_to_do(key):
    assert key not in FIELDS and key not in ALIASES  # else the entry would never be read
    with pytest.raises(ConfigError) as err:
        build_config({key: "a value no key accepts"})
    assert f"'{key}' (TRL / transformers)" in str(err.value) and TRL_KEYS[key].advice in str(err.value)


@pytest.mark.parametrize("key, value, advice", [
    ("precompute_ref_batch_size", 8, "per_device_eval_batch_size"),
    ("ref_adapter_name", "ref", "adapters disabled"),
    ("model_init_kwargs", {"torch_dtype": "bfloat16"}, "dtype, attn_implementation"),
    ("dataset_num_proc", 8, "cached on disk"),
    ("reference_free", True, "method: simpo, cpo, orpo or slic"),
    ("gradient_checkpointing_kwargs", {"use_reentrant": True}, "use_reentrant=False"),
    ("eval_strategy", "epoch", "set eval_steps"),
    ("fsdp", "full_shard auto_wrap", "examples/accelerate/fsdp.yaml"),
])
def test_common_trl_keys_name_their_replacement(key, value, advice):
    with pytest.raises(ConfigError, match=advice):
        build_config({key: value})


def test_accepted_trl_values_describe_what_preftune_does():
    cfg = build_config({"remove_unused_columns": False, "gradient_checkpointing_kwargs": {"use_reentrant": False},
                        "truncation_mode": "keep_start", "do_train": True, "use_liger_kernel": False,
                        "f_divergence_type": "reverse_kl"})
    assert cfg == build_config({})


def test_legacy_rpo_alpha_with_dpo_is_not_silently_ignored():
    with pytest.raises(ConfigError, match="rpo_alpha is a hyper-parameter of rpo.*method: rpo"):
        build_config({"loss_type": "sigmoid", "rpo_alpha": 0.5})
    assert build_config({"method": "rpo", "rpo_alpha": 0.5}).rpo_alpha == 0.5


# ---- max_completion_length -----------------------------------------------------------------------------------


def test_max_completion_length_cuts_completions_keeping_their_start():
    cut = tokenize.truncate_ids([1, 2, 3], [[10, 11, 12, 13, 14], [20, 21]], max_length=None, max_prompt_length=None,
                                bos_token_id=1, max_completion_length=3)
    assert (cut.prompt_ids, cut.completion_ids, cut.completion_truncated) == ([1, 2, 3], [[10, 11, 12], [20, 21]], True)
    # Both limits: the tighter one wins.
    cut = tokenize.truncate_ids([1, 2, 3], [[10, 11, 12, 13, 14]], max_length=5, max_prompt_length=None,
                                bos_token_id=1, max_completion_length=3)
    assert cut.completion_ids == [[10, 11]]
    cut = tokenize.truncate_ids([1, 2, 3], [[10, 11, 12, 13, 14]], max_length=10, max_prompt_length=None,
                                bos_token_id=1, max_completion_length=3)
    assert cut.completion_ids == [[10, 11, 12]]
    assert not tokenize.truncate_ids([1], [[10, 11]], max_length=None, max_prompt_length=None, bos_token_id=1,
                                     max_completion_length=2).completion_truncated


def test_max_completion_length_is_counted_and_keys_the_cache(tmp_path, tok):
    from preftune.data.formats import normalise

    rows, _ = normalise(datasets.Dataset.from_list(ROWS), "prefs")
    ids, report = tokenize.tokenize_rows(rows, tok, max_length=None, max_prompt_length=None, cache_dir=tmp_path,
                                         max_completion_length=4)
    assert max(len(c) for c in [*ids["chosen_ids"], *ids["rejected_ids"]]) == 4
    assert report.completion_truncated > 0 and "cut to fit max_completion_length=4" in str(report)
    plain = tokenize.cache_key(rows, tok, max_length=10, max_prompt_length=None)
    assert tokenize.cache_key(rows, tok, max_length=10, max_prompt_length=None, max_completion_length=None) == plain
    assert tokenize.cache_key(rows, tok, max_length=10, max_prompt_length=None, max_completion_length=4) != plain


def test_max_completion_length_reaches_the_run(tmp_path, tok):
    result = train({"max_completion_length": 3, "max_steps": 1, "output_dir": str(tmp_path / "run"),
                    "cache_dir": str(tmp_path / "cache"), "disable_tqdm": True, "bf16": False},
                   model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert "max_completion_length=3" in summary["data"]["train/tokens"]


# ---- chat_template -------------------------------------------------------------------------------------------

# The embedded template with a system marker after BOS: another rendering of the same conversations.
OTHER_TEMPLATE = CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}<|system|>")
CONVERSATIONS = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_renders_the_conversations_and_ships_with_the_model(tmp_path, tok, as_file):
    value = OTHER_TEMPLATE
    if as_file:
        (tmp_path / "template.jinja").write_text(OTHER_TEMPLATE)
        value = str(tmp_path / "template.jinja")
    own = copy.deepcopy(tok)
    result = train({"chat_template": value, "max_steps": 1, "output_dir": str(tmp_path / "run"),
                    "cache_dir": str(tmp_path / "cache"), "disable_tqdm": True, "bf16": False},
                   model=build_tiny_model(tok, seed=0), tokenizer=own, train_dataset=CONVERSATIONS)
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.chat_template == OTHER_TEMPLATE
    system = tok.convert_tokens_to_ids("<|system|>")
    rendered = saved.apply_chat_template(CONVERSATIONS[0]["prompt"], add_generation_prompt=True, tokenize=True)
    assert system in list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def test_chat_template_changes_the_tokenizer_fingerprint(tok):
    other = copy.deepcopy(tok)
    other.chat_template = OTHER_TEMPLATE
    assert tokenize.tokenizer_fingerprint(other) != tokenize.tokenizer_fingerprint(tok)


def test_chat_template_that_is_neither_file_nor_template_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="chat_template: .*missing.jinja is neither a file nor a Jinja template"):
        build_config({"chat_template": str(tmp_path / "missing.jinja")})
