"""The methods' own config keys (preftune.methods.params): each registry entry names the sections it reads, their
checks run for it, their ranges hold for every method, and a section's keys in a run that does not read them are
refused with what reads them."""

from __future__ import annotations

import dataclasses

import pytest

from preftune.config import FIELDS, SECTIONS, ConfigError, build_config
from preftune.methods import params
from preftune.methods.registry import METHODS


def test_every_section_a_method_reads_exists_and_its_keys_are_config_keys():
    for method in METHODS.values():
        assert set(method.reads) <= set(params.SECTIONS), method.name
    for section, check in params.SECTIONS.values():
        assert callable(getattr(section, check)) and section in SECTIONS
        assert {f.name for f in dataclasses.fields(section)} <= set(FIELDS)
        assert set(section.RANGES) <= {f.name for f in dataclasses.fields(section)}


def test_the_sections_a_run_reads_follow_its_methods():
    assert params.sections_read(build_config({"method": "dpo"})) == []
    assert params.sections_read(build_config({"method": "dpo", "online": True})) == ["sampling", "generation_batch"]
    assert params.sections_read(build_config({"method": "ppo"})) == ["sampling", "ppo"]
    assert params.sections_read(build_config({"method": "sppo"})) == ["sampling", "rounds"]


@pytest.mark.parametrize("key, value", [("num_iterations", 2), ("steps_per_generation", 2),
                                        ("generation_batch_size", 8), ("dynamic_sampling", True),
                                        ("max_num_gen_batches", 2)])
def test_generation_batch_keys_are_refused_where_no_generation_batch_is_read(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: for online methods .*'dpo'.* train on a fixed dataset"):
        build_config({"method": "dpo", key: value})
    with pytest.raises(ConfigError, match=f"^{key}: for the generation batches .* PPO passes over each rollout "
                                          "num_ppo_epochs times"):
        build_config({"method": "ppo", key: value})
    assert getattr(build_config({"method": "grpo", key: value}), key) == value  # read by GRPO


@pytest.mark.parametrize("key, value, message", [
    ("num_iterations", 0, "num_iterations must be >= 1, got 0"),
    ("generation_batch_size", 0, "generation_batch_size must be >= 1, got 0"),
    ("max_num_gen_batches", -1, r"max_num_gen_batches must be >= 0, got -1 \(0: no cap\)"),
    ("cliprange", 1.0, r"cliprange must be in \(0, 1\), got 1.0"),
    ("rso_beta", -0.1, "rso_beta must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
])
def test_a_method_keys_range_holds_whatever_the_method(key, value, message):
    for method in ("dpo", "grpo"):
        with pytest.raises(ConfigError, match=message):
            build_config({"method": method, key: value})


def test_beta_zero_is_allowed_only_where_beta_weighs_the_kl():
    assert build_config({"method": "grpo", "beta": 0.0}).beta == 0.0
    with pytest.raises(ConfigError, match="beta must be > 0"):
        build_config({"method": "dpo", "beta": 0.0})
    with pytest.raises(ConfigError, match="beta must be > 0"):  # every method of the run must allow it
        build_config({"method": ["dpo", "sft"], "beta": 0.0})


def test_a_method_trained_in_rounds_trains_alone_whatever_the_order():
    for methods, others in ((["dpo", "sppo"], r"\['dpo'\]"), (["sppo", "dpo"], r"\['dpo'\]"),
                            (["rso", "sppo"], r"\['sppo'\]")):
        with pytest.raises(ConfigError, match=f"train alone, not with {others}"):
            build_config({"method": methods})
