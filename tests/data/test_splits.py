"""Splits of local data: a file has one split, ``train`` (all its rows). TRL's ``dataset_test_split: test`` with a
local ``dataset_name`` must not evaluate on the training rows; evaluation rows that are training rows are counted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from preftune import cli, train
from preftune.config import build_config
from preftune.data import formats
from preftune.data.builtin import builtin_preferences
from preftune.errors import DataError

ROWS = builtin_preferences(16, seed=3)
FAST = ["max_steps=1", "per_device_train_batch_size=4", "disable_tqdm=true", "bf16=false", "max_length=64",
        "max_prompt_length=32"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trls_test_split_of_a_local_file_is_refused_naming_the_key(tmp_path, capsys):
    """A TRL script's config, dropped in with a local file: evaluating on its 'test' split would read the training
    rows (the file has no other split), so `preftune train` stops before training and names the key."""
    data = write(tmp_path / "prefs.jsonl", ROWS)
    config = tmp_path / "trl.yaml"
    config.write_text(f"dataset_name: {data}\ndataset_test_split: test\neval_strategy: steps\n")
    code = cli.main(["train", str(config), f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                     *FAST])
    err = capsys.readouterr().err
    assert code == DataError.exit_code
    assert (f"preftune: {data}: eval_split (TRL: dataset_test_split) is 'test', but a file has one split, 'train' "
            "(all its rows)") in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_train_split_a_file_does_not_have_is_refused_naming_the_key(tmp_path):
    data = write(tmp_path / "prefs.jsonl", ROWS)
    with pytest.raises(DataError, match=r"dataset_split \(TRL: dataset_train_split\) is 'train_prefs', but a file"):
        train(dict(dataset=str(data), dataset_split="train_prefs", output_dir=str(tmp_path / "run"),
                   cache_dir=str(tmp_path / "cache"), max_steps=1, disable_tqdm=True))


def test_a_file_is_read_as_its_one_split(tmp_path):
    data = write(tmp_path / "prefs.jsonl", ROWS[:2])
    assert len(formats.load_rows(str(data), "train")) == 2
    with pytest.raises(DataError, match="split is 'test', but a file has one split"):
        formats.load_rows(str(data), "test")


def test_an_eval_file_of_its_own_is_read_whole_under_the_default_split(tmp_path):
    """eval_split's default names the Hub's test split; another file is all evaluation rows."""
    from preftune.training.setup import load_eval_rows

    data, held_out = write(tmp_path / "train.jsonl", ROWS[:12]), write(tmp_path / "eval.jsonl", ROWS[12:])
    cfg = build_config({"dataset": str(data), "eval_dataset": str(held_out)})
    assert cfg.eval_split == "test"
    assert load_eval_rows(cfg)["prompt"] == [r["prompt"] for r in ROWS[12:]]
    with pytest.raises(DataError, match=r"eval_split \(TRL: dataset_test_split\) is 'validation', but a file"):
        load_eval_rows(build_config({"dataset": str(data), "eval_dataset": str(held_out), "eval_split": "validation"}))


def test_evaluation_rows_that_are_training_rows_are_counted(tmp_path, caplog):
    """The same rows under two names (a copy of the training file as eval_dataset): the run warns, and the summary
    and the model card count the overlap."""
    data = write(tmp_path / "train.jsonl", ROWS)
    copy = write(tmp_path / "eval.jsonl", ROWS[:4] + [{**r, "prompt": r["prompt"] + " (new)"} for r in ROWS[4:6]])
    with caplog.at_level("WARNING", logger="preftune"):
        result = train(dict(dataset=str(data), eval_dataset=str(copy), output_dir=str(tmp_path / "run"),
                            cache_dir=str(tmp_path / "cache"), max_steps=1, per_device_train_batch_size=4,
                            disable_tqdm=True, bf16=False, max_length=64, max_prompt_length=32))
    counted = "4 of the 6 evaluation examples are also training examples"
    assert counted in caplog.text
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert counted in summary["data"]["eval/overlap"]
    assert counted in (result.final_dir / "README.md").read_text()


def test_overlap_counts_examples_with_the_same_tokens_in_the_same_places():
    from datasets import Dataset

    from preftune.training.setup import count_overlap

    train_rows = Dataset.from_dict({"prompt_ids": [[1, 2], [3], [5, 6]], "chosen_ids": [[7], [8, 9], []],
                                    "rejected_ids": [[4], [4], [4]]})
    evaluation = Dataset.from_dict({
        "prompt_ids": [[1, 2], [2, 1], [3, 8], [5, 6], [5, 6]],  # the same; reordered; a token moved across columns
        "chosen_ids": [[7], [7], [9], [], [0]],  # ...; the same with an empty chosen; another token
        "rejected_ids": [[4], [4], [4], [4], [4]]})
    assert count_overlap(train_rows, evaluation) == 2  # rows 0 and 3
    assert count_overlap(train_rows, train_rows.select([2, 0])) == 2  # an indices mapping reads the rows it names


def test_methods_in_rounds_read_the_same_splits(tmp_path):
    """RSO's prompts: an eval file of its own is read whole; the training file's test split is refused."""
    from preftune.modeling.tiny import default_tokenizer
    from preftune.training.rounds import load_prompts

    data, held_out = write(tmp_path / "train.jsonl", ROWS[:12]), write(tmp_path / "eval.jsonl", ROWS[12:])
    tok = default_tokenizer(ROWS)
    cfg = build_config({"method": "rso", "dataset": str(data), "eval_dataset": str(held_out), "max_length": 64,
                        "max_prompt_length": 32, "cache_dir": str(tmp_path / "cache")})
    prompts, evaluation, _ = load_prompts(cfg, tok)
    assert len(evaluation) == len({r["prompt"] for r in ROWS[12:]})
    with pytest.raises(DataError, match=r"eval_split \(TRL: dataset_test_split\) is 'test', but a file"):
        load_prompts(build_config({"method": "rso", "dataset": str(data), "eval_dataset": str(data),
                                   "cache_dir": str(tmp_path / "cache")}), tok)


def test_held_out_rows_depend_on_their_numbers_and_the_seed_not_on_their_order():
    from preftune.training.setup import hold_out

    held = hold_out(range(20), 0.25, 5, "rows.jsonl")
    assert held.sum() == 5  # ceil(0.25 · 20), as datasets' train_test_split counts
    assert hold_out(range(30), 0.1, 5, "rows.jsonl").sum() == 3  # not ceil(3.0000000000000004)
    numbers = set(np.flatnonzero(held))
    assert set(np.arange(20)[::-1][hold_out(range(19, -1, -1), 0.25, 5, "rows.jsonl")]) == numbers
    dropped = min(set(range(20)) - numbers)  # a row another method's tokenization dropped: ceil(0.25 · 19) = 5
    kept = [n for n in range(20) if n != dropped]
    assert set(np.array(kept)[hold_out(kept, 0.25, 5, "rows.jsonl")]) == numbers
    assert set(np.flatnonzero(hold_out(range(20), 0.25, 6, "rows.jsonl"))) != numbers  # another seed, other rows
    pairs = hold_out([n // 2 for n in range(40)], 0.25, 5, "rows.jsonl")  # KTO reads pair n as rows 2n and 2n + 1
    assert pairs.sum() == 10 and (pairs[0::2] == pairs[1::2]).all() and set(np.flatnonzero(pairs[0::2])) == numbers
    with pytest.raises(DataError, match=r"^rows.jsonl: eval_split_size=0.5 of its 1 distinct prompts \(after "
                       r"tokenization\) holds out 1, leaving none to train on; give more rows"):
        hold_out([7], 0.5, 0, "rows.jsonl", unit="distinct prompts")


def test_every_method_holds_out_the_same_rows_of_a_file(tmp_path):
    """eval_split_size holds out the same prompts of a prompt file for GRPO and the rounds, and the same pairs of a
    preference file for DPO and KTO (a pair's two KTO rows together)."""
    from accelerate import Accelerator

    from preftune.modeling.tiny import default_tokenizer
    from preftune.training.rounds import load_prompts
    from preftune.training.setup import prepare_inputs

    distinct = list({r["prompt"]: r for r in ROWS}.values())
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in distinct])
    pairs = write(tmp_path / "pairs.jsonl", distinct)
    tok = default_tokenizer(ROWS)
    common = {"eval_split_size": 0.25, "seed": 11, "cache_dir": str(tmp_path / "cache"), "max_length": 64,
              "max_prompt_length": 32, "bf16": False, "precompute_ref_log_probs": False}

    def held_rows(method, data):
        inputs = prepare_inputs(build_config({"method": method, "dataset": str(data), **common}), Accelerator(cpu=True),
                                tokenizer=tok)
        return sorted(inputs.eval[formats.SOURCE_ROW])

    _, held_out, _ = load_prompts(build_config({"method": "rso", "dataset": str(prompts), **common}), tok)
    assert sorted(r["row"] for r in held_out) == held_rows("grpo", prompts)
    assert len(held_out) == math.ceil(0.25 * len(distinct))
    dpo = held_rows("dpo", pairs)
    assert held_rows("kto", pairs) == sorted(dpo + dpo)
