"""Facts about the config: every value that cannot work is refused, naming the key (and the YAML file and
line it came from); aliases, lists and trackers are read as the CLI reads them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from datasets import Dataset, DatasetDict

from preftune import train
from preftune.config import TRACKERS, TrainConfig, build_config, load_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.methods.registry import METHODS
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

USES_BETA = sorted(name for name, method in METHODS.items() if "beta" in method.defaults)


def refused(values: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config(values)
    return info.value


# ---- values that cannot work ------------------------------------------------------------------------


# β inside the loss (DPO's σ(β·margin), IPO's 1/(2β), …) must be > 0; β as the weight of a KL penalty
# (GRPO, GSPO, RLOO) may be 0, which loads no reference.
KL_WEIGHT_BETA = sorted(name for name in USES_BETA if METHODS[name].reference_weight == "beta")
LOSS_BETA = sorted(set(USES_BETA) - set(KL_WEIGHT_BETA))


@pytest.mark.parametrize("method", LOSS_BETA)
@pytest.mark.parametrize("beta", [0, -0.1, float("nan")])
def test_beta_must_be_positive_for_every_method_that_uses_it_in_the_loss(method, beta):
    err = refused({"method": method, "beta": beta})
    assert "beta must be > 0" in str(err)


@pytest.mark.parametrize("method", KL_WEIGHT_BETA)
def test_beta_as_a_kl_weight_may_be_zero_but_not_negative_or_nan(method):
    assert build_config({"method": method, "beta": 0}).beta == 0
    for beta in (-0.1, float("nan")):
        assert "beta must be >= 0" in str(refused({"method": method, "beta": beta}))


def test_the_kl_weight_methods_are_the_critic_free_rl_ones():
    # every method that samples groups of completions (GRPO, GSPO, RLOO, …), and only those
    assert KL_WEIGHT_BETA == sorted(name for name, m in METHODS.items() if m.data == "groups")
    assert {"grpo", "rloo"} <= set(KL_WEIGHT_BETA)


def test_ipo_with_beta_zero_is_a_config_error_not_a_division_by_zero():
    # IPO's target margin is 1/(2β): β = 0 used to end in ZeroDivisionError at the first step.
    assert "beta" in str(refused({"method": "ipo", "beta": 0}))


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_label_smoothing_outside_zero_to_half_is_refused(eps):
    assert "label_smoothing must be in [0, 0.5)" in str(refused({"method": "robust", "label_smoothing": eps}))


def test_label_smoothing_just_below_half_is_accepted():
    assert build_config({"method": "robust", "label_smoothing": 0.49}).label_smoothing == 0.49


@pytest.mark.parametrize("lr", [0, -1e-5, "nan", "inf"])
def test_learning_rate_must_be_positive_and_finite(lr):
    assert "learning_rate must be > 0" in str(refused({"learning_rate": lr}))


def test_negative_or_all_zero_loss_weights_are_refused():
    assert "loss_weights must be finite and >= 0" in str(refused({"method": ["dpo", "sft"], "loss_weights": [1, -1]}))
    assert "all zero" in str(refused({"method": ["dpo", "sft"], "loss_weights": [0, 0]}))
    assert build_config({"method": ["dpo", "sft"], "loss_weights": [1, 0]}).loss_weights == [1.0, 0.0]


@pytest.mark.parametrize("key,value", [("max_length", 0), ("max_length", -5), ("max_prompt_length", 0),
                                       ("max_tokens_per_batch", 0), ("save_steps", 0), ("eval_steps", 0),
                                       ("save_total_limit", 0), ("lora_r", 0)])
def test_non_positive_lengths_and_counts_are_refused(key, value):
    values = {key: value} | ({"max_prompt_length": None} if key == "max_length" else {})
    err = refused(values)
    assert f"{key} must be >= 1" in str(err) and err.config_keys == (key,)


def test_max_grad_norm_zero_is_refused_with_what_to_do():
    # The loop always clips: a norm of 0 would zero every gradient and train nothing, silently.
    assert "1e9" in str(refused({"max_grad_norm": 0}))


def test_unknown_method_is_a_config_error_with_the_closest_names():
    err = refused({"method": "dpp"})
    assert "unknown method 'dpp'" in str(err) and "'dpo'" in str(err) and err.config_keys == ("method",)
    assert "'simpo'" in str(refused({"method": ["dpo", "simppo"]}))


# ---- where a bad value came from --------------------------------------------------------------------


def test_a_bad_value_from_a_yaml_file_names_the_file_line_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: ipo\nlearning_rate: 1.0e-5\nbeta: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}, line 3: beta must be > 0")


def test_an_override_replaces_the_file_value_and_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: ipo\nbeta: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["beta=-1"])
    assert str(info.value).startswith("beta must be > 0")
    assert load_config(path, ["method=dpo"]).method == "dpo"  # the alias in the file, the name on the command line


def test_a_duplicated_yaml_key_is_refused_naming_the_key_the_file_and_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.1\nmethod: dpo\n\nbeta: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "'beta'" in message and "lines 1 and 4" in message


def test_a_duplicated_key_inside_a_nested_mapping_is_refused_but_a_yaml_merge_override_is_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  min_lr_rate: 0.1\n"
                    "  min_lr_rate: 0.2\n")
    with pytest.raises(ConfigError, match="lines 3 and 4"):
        load_config(path)
    merged = tmp_path / "merged.yaml"
    merged.write_text("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  <<: {min_lr_rate: 0.1}\n"
                      "  min_lr_rate: 0.2\n")
    assert load_config(merged).lr_scheduler_kwargs == {"min_lr_rate": 0.2}


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.1\nmethod: [dpo, sft\nlearning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}, line 3") and "invalid YAML" in str(info.value)


def test_an_override_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="override 'beta=\\[0.1'"):
        load_config(None, ["beta=[0.1"])


def test_a_config_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"beta: 0.1\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load_config(path)


# ---- names users know ---------------------------------------------------------------------------------


def test_train_config_accepts_the_aliases_the_cli_accepts():
    cfg = TrainConfig(loss_type="ipo", model="some/model", ref_model="some/ref")
    assert (cfg.method, cfg.model_name_or_path, cfg.ref_model_name_or_path) == ("ipo", "some/model", "some/ref")
    assert "loss_type" not in cfg.to_dict() and dataclasses.replace(cfg, beta=0.2).method == "ipo"
    with pytest.raises(ConfigError, match="give one"):
        TrainConfig(loss_type="ipo", method="dpo")
    with pytest.raises(ConfigError, match="give one"):
        build_config({"loss_type": "ipo", "method": "dpo"})


def test_lora_target_modules_accepts_a_comma_separated_string():
    assert build_config({"lora_target_modules": "q_proj, v_proj"}).lora_target_modules == ["q_proj", "v_proj"]
    assert build_config({"lora_target_modules": "q_proj"}).lora_target_modules == ["q_proj"]
    assert build_config({"lora_target_modules": "all-linear"}).lora_target_modules == "all-linear"
    assert build_config({"lora_target_modules": r".*\.(q|v)_proj"}).lora_target_modules == r".*\.(q|v)_proj"


# ---- trackers -----------------------------------------------------------------------------------------


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in TRACKERS[name][0])


def test_report_to_a_tracker_that_is_not_installed_names_the_package_to_install():
    missing = next((name for name in ("wandb", "mlflow", "trackio") if not _installed(name)), None)
    if missing is None:
        pytest.skip("wandb, mlflow and trackio are all installed here")
    err = refused({"report_to": missing})
    assert f"pip install {TRACKERS[missing][1]}" in str(err) and err.config_keys == ("report_to",)


def test_report_to_none_all_and_typos():
    assert build_config({"report_to": "none"}).report_to == []
    everything = build_config({"report_to": "all"}).report_to
    assert everything == [name for name in TRACKERS if _installed(name)]
    assert ("tensorboard" in everything) == _installed("tensorboard")
    assert "Did you mean 'tensorboard'" in str(refused({"report_to": "tensorbord"}))


# ---- learning-rate schedules ------------------------------------------------------------------------------


def test_lr_scheduler_type_must_be_a_transformers_scheduler():
    assert "Did you mean 'cosine'" in str(refused({"lr_scheduler_type": "cosin"}))


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "greedy"])
def test_schedulers_that_need_a_metric_every_step_are_refused_with_the_reason(name):
    assert "metric" in str(refused({"lr_scheduler_type": name}))


def test_scheduler_arguments_that_would_crash_later_are_refused_now():
    assert "exactly one of min_lr" in str(refused({"lr_scheduler_type": "cosine_with_min_lr"}))
    assert "exactly one of min_lr" in str(refused({"lr_scheduler_type": "cosine_with_min_lr",
                                                  "lr_scheduler_kwargs": {"min_lr": 1e-7, "min_lr_rate": 0.1}}))
    assert "num_decay_steps" in str(refused({"lr_scheduler_type": "warmup_stable_decay"}))
    assert "takes num_cycles" in str(refused({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"cycles": 2}}))
    assert "no lr_scheduler_kwargs" in str(refused({"lr_scheduler_type": "constant",
                                                   "lr_scheduler_kwargs": {"power": 2}}))
    assert "set by preftune" in str(refused({"lr_scheduler_type": "cosine",
                                            "lr_scheduler_kwargs": {"num_training_steps": 9}}))


def test_scheduler_step_counts_scale_with_processes_like_the_schedule_length():
    cfg = build_config({"lr_scheduler_type": "warmup_stable_decay",
                        "lr_scheduler_kwargs": {"num_decay_steps": 5, "min_lr_ratio": 0.1}})
    assert cfg.scheduler_kwargs(2) == {"num_decay_steps": 10, "min_lr_ratio": 0.1}


ROWS = builtin_preferences(40, seed=3)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def _train(tmp_path, tok, train_dataset, **overrides):
    config = dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=4,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
                  bf16=False) | overrides
    result = train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=train_dataset)
    return result, [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_scheduler_kwargs_reach_the_scheduler(tmp_path, tok):
    # cosine_with_min_lr ends at min_lr_rate · learning_rate: factor = r + (1 − r)·½(1 + cos(π·t/T)), t = T.
    _, records = _train(tmp_path, tok, ROWS, lr_scheduler_type="cosine_with_min_lr",
                        lr_scheduler_kwargs={"min_lr_rate": 0.25})
    assert [r["learning_rate"] for r in records if "loss" in r][-1] == pytest.approx(0.25e-3)


# ---- datasets the API accepts -----------------------------------------------------------------------------


def test_a_dataset_dict_trains_on_its_train_split_and_evaluates_on_its_test_split(tmp_path, tok):
    splits = DatasetDict(train=Dataset.from_list(ROWS[:32]), test=Dataset.from_list(ROWS[32:]))
    result, records = _train(tmp_path, tok, splits, max_steps=1)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert "kept 32 of 32 rows" in summary["data"]["train/rows"]
    assert "kept 8 of 8 rows" in summary["data"]["eval/rows"]
    assert any("eval_loss" in r for r in records)


def test_a_dataset_dict_without_the_split_names_the_splits_it_has(tmp_path, tok):
    from preftune.errors import DataError

    with pytest.raises(DataError, match=r"without the split 'train'; it has \['prefs'\]"):
        _train(tmp_path, tok, DatasetDict(prefs=Dataset.from_list(ROWS)))


@pytest.mark.parametrize("method", ["sppo", "iterative_dpo", "rso"])
def test_rounds_on_a_quantized_base_are_refused_before_anything_runs(method):
    # Each round starts from the previous round's merged model: a 4-bit base would fail in round 1, after sampling.
    err = refused({"method": method, "use_peft": True, "load_in_4bit": True})
    assert "load_in_4bit" in str(err) and "cannot be merged" in str(err)
