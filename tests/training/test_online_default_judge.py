"""Issue 20, item 7: `preftune train` with an online method and neither model nor data trains the embedded default
(tiny Llama, built-in preferences) judged by the embedded world's gold reward, and says so; with a model or data
of the user's own, a judge is still asked for."""

from __future__ import annotations

import json

import pytest
import yaml

from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_an_online_method_on_the_embedded_default_is_judged_by_the_gold_reward(tmp_path, caplog, capsys, method):
    with caplog.at_level("INFO", logger="preftune"):
        code = main(["train", f"method={method}", "max_steps=1", "per_device_train_batch_size=2",
                     *(["num_generations=2"] if method == "grpo" else []), "max_completion_length=4",
                     f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "disable_tqdm=true"])
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["judge"] == "gold"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no judge")]
    assert len(said) == 1 and "judge=gold" in said[0] and "embedded default" in said[0]
    reward = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["reward"]
    assert 0 < reward < 1  # the gold reward is a probability, σ(4·compound)


def test_with_data_of_ones_own_an_online_method_still_asks_for_a_judge(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in builtin_preferences(8)))
    code = main(["train", "method=grpo", f"dataset={data}", f"output_dir={tmp_path / 'run'}"])
    assert code == ConfigError.exit_code
    assert "method grpo needs a judge to score its samples, and none is given: set judge" in capsys.readouterr().err
