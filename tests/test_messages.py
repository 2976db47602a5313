"""Every user error is one message, not a traceback (issue 20): bad config values, YAML bombs, missing model paths,
conversations without a chat template, an evaluation split that leaves nothing to train on, SPPO's prompts.

Each case runs as a user runs it (``preftune train …`` through :func:`preftune.cli.main`, or the trainer) and checks
the exit code, the one line on stderr and that no traceback is printed."""

from __future__ import annotations

import json
import logging

import pytest

from preftune import PreferenceTrainer
from preftune.cli import main
from preftune.config import build_config, load_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, DataError, ModelError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

ROWS = builtin_preferences(8, seed=3)


def fails(capsys, *argv: str) -> tuple[int, str]:
    """``preftune *argv`` → (exit code, the error line); the error is one line and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("preftune: ")]
    assert len(lines) == 1, err[-2000:]
    return code, lines[0]


@pytest.mark.parametrize("how", ["yaml", "override"])
@pytest.mark.parametrize("value", ["[0.1, 0.2]", "{a: 1}"])
def test_a_list_or_mapping_for_a_number_is_refused_by_key(tmp_path, capsys, how, value):
    if how == "yaml":
        (tmp_path / "run.yaml").write_text(f"method: dpo\nbeta: {value}\n")
        argv = ["train", str(tmp_path / "run.yaml")]
    else:
        argv = ["train", f"beta={value}"]
    code, line = fails(capsys, *argv, f"output_dir={tmp_path / 'out'}")
    shown = "[0.1, 0.2]" if value.startswith("[") else "{'a': 1}"
    where = f"{tmp_path / 'run.yaml'}, line 2: " if how == "yaml" else ""
    assert code == ConfigError.exit_code
    assert line == (f"preftune: {where}beta must be a number or null, got {shown}; give one value (run once per "
                    "value to compare several)")


def test_a_word_for_a_whole_number_says_so(tmp_path, capsys):
    code, line = fails(capsys, "train", "max_steps=ten", f"output_dir={tmp_path}")
    assert (code, line) == (ConfigError.exit_code, "preftune: max_steps must be a whole number, got 'ten'")
    code, line = fails(capsys, "train", "max_steps=2.5", f"output_dir={tmp_path}")
    assert line == "preftune: max_steps must be a whole number, got 2.5"


def test_an_integral_float_literal_is_a_whole_number(tmp_path):
    (tmp_path / "run.yaml").write_text("max_steps: 1e3\nmax_length: 2.0e+3\nsave_steps: 500.0\n")
    cfg = load_config(tmp_path / "run.yaml")  # YAML 1.1 reads 1e3 as the string '1e3'
    assert (cfg.max_steps, cfg.max_length, cfg.save_steps) == (1000, 2000, 500)
    assert type(cfg.max_steps) is int and type(cfg.max_length) is int
    with pytest.raises(ConfigError, match=r"^max_steps must be a whole number, got '1e400'$"):
        build_config({"max_steps": "1e400"})  # no billion-digit integer is built either


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    lines = ['max_steps:', '  x0: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 7):  # 9**7 ≈ 4.8 million strings from 8 lines
        previous, anchor = "abcdefg"[i - 1], "abcdefg"[i]
        lines.append(f"  x{i}: &{anchor} [{', '.join([f'*{previous}'] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    code, line = fails(capsys, "train", str(tmp_path / "bomb.yaml"), f"output_dir={tmp_path / 'out'}")
    assert code == ConfigError.exit_code
    assert line == (f"preftune: {tmp_path / 'bomb.yaml'}: the YAML expands to more than 100,000 values (each *alias "
                    "repeats its anchor's value); a config holds a few dozen keys: remove the nested aliases")


def test_a_long_value_is_cut_in_the_message(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"max_steps: {'y' * 1_000_000}\n")
    code, line = fails(capsys, "train", str(tmp_path / "run.yaml"), f"output_dir={tmp_path / 'out'}")
    assert code == ConfigError.exit_code and len(line) < 400
    assert line.startswith(f"preftune: {tmp_path / 'run.yaml'}, line 1: max_steps must be a whole number, got 'yyy")
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "optim": "o" * 100_000})
    assert len(str(info.value)) < 1000


def test_a_missing_model_path_names_its_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = fails(capsys, "train", "model_name_or_path=./x", "output_dir=out")
    assert code == ModelError.exit_code
    assert line == ("preftune: model_name_or_path './x' is not a folder and not a Hub name (org/name): no such folder "
                    f"(relative paths start at {tmp_path}); give a folder written by save_pretrained, or a Hub id such "
                    "as 'Qwen/Qwen2.5-0.5B'")
    code, line = fails(capsys, "train", "ref_model=runs/a/b/final", "output_dir=out2")
    assert line.startswith("preftune: ref_model_name_or_path 'runs/a/b/final' is not a folder and not a Hub name")


def test_conversations_without_a_chat_template_name_the_dataset_and_the_key(tmp_path, capsys):
    """Item 19: one line naming the dataset and the chat_template key, through `preftune train`."""
    tok = default_tokenizer(ROWS)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r[
        "chosen"]}], "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, line = fails(capsys, "train", f"dataset={data}", f"tokenizer_name_or_path={tmp_path / 'tok'}",
                       f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "max_steps=1")
    assert code == DataError.exit_code
    assert line == (f"preftune: {data}: the rows are conversations (lists of {{role, content}} messages) but the "
                    "tokenizer has no chat template to render them; set the config key chat_template to a Jinja file "
                    "or the template text (chat_template: template.jinja), or use a tokenizer that has one")


def test_an_evaluation_split_that_leaves_nothing_to_train_on_is_refused(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    code, line = fails(capsys, "train", f"dataset={data}", "eval_split_size=0.5", f"output_dir={tmp_path / 'out'}",
                       f"cache_dir={tmp_path / 'cache'}", "max_steps=1")
    assert code == DataError.exit_code
    assert line == (f"preftune: {data}: eval_split_size=0.5 of its 1 rows (after tokenization) holds out 1, leaving "
                    "none to train on; give more rows, a smaller eval_split_size, or an eval_dataset")


# ---- SPPO: what its log says about its columns, and its prompts checked before sampling ------------------------


def _sppo_config(tmp_path, **overrides):
    return build_config(dict(method="sppo", output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                             max_steps=1, per_device_train_batch_size=4, disable_tqdm=True, bf16=False, num_rounds=1,
                             num_generations=2, max_completion_length=4) | overrides)


def test_sppo_win_probabilities_are_logged_as_read_by_the_loss_not_ignored(tmp_path, caplog):
    tok = default_tokenizer(ROWS)
    rows = [dict(r, chosen_win_prob=0.7, rejected_win_prob=0.3, score_chosen=1.0) for r in ROWS[:4]]
    with caplog.at_level(logging.INFO, logger="preftune"):
        PreferenceTrainer(_sppo_config(tmp_path), model=build_tiny_model(tok), tokenizer=tok,
                          train_dataset=rows).train_once()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train_dataset: kept")]
    assert line == ("train_dataset: kept 4 of 4 rows (standard, text); ignored columns: score_chosen; read by the "
                    "loss: chosen_win_prob, rejected_win_prob")


def test_an_sppo_prompt_with_no_room_to_sample_is_refused_by_its_row_before_sampling(tmp_path):
    tok = default_tokenizer(ROWS)
    rows = [dict(r) for r in ROWS[:5]]
    rows[1]["prompt"] = rows[0]["prompt"]  # one prompt twice: the 3rd distinct prompt is the file's row 3
    rows[3]["prompt"] = "hello " * 300  # more tokens than the tiny model's positions

    def judge(prompts, completions):
        raise AssertionError("nothing is sampled or judged before the prompts are checked")

    config = _sppo_config(tmp_path, max_length=None, max_prompt_length=None)
    model = build_tiny_model(tok)
    positions = model.config.max_position_embeddings
    with pytest.raises(DataError) as info:
        PreferenceTrainer(config, model=model, tokenizer=tok, train_dataset=rows, judge=judge).train()
    assert str(info.value).startswith("train_dataset, row 3 (0-based), field 'prompt': has ")
    assert f"but the model reads at most {positions} positions" in str(info.value)
    assert f"set max_prompt_length below {positions}" in str(info.value)
    assert not (tmp_path / "run" / "round-1" / "pairs.jsonl").exists()


def test_a_missing_model_folder_for_pairs_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("hello\n")
    code, line = fails(capsys, "pairs", "--model", "./x", "--prompts", "prompts.txt", "--out", "pairs.jsonl",
                       "--judge", "gold")
    assert (code, line) == (ModelError.exit_code, "preftune: --model './x' is not a folder and not a Hub name "
                            f"(org/name): no such folder (relative paths start at {tmp_path}); give a folder written "
                            "by save_pretrained, or a Hub id such as 'Qwen/Qwen2.5-0.5B'")
