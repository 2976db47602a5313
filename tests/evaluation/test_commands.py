"""``preftune pairs`` and ``preftune eval`` as a user runs them: the whole loop reward model → pairs → DPO → eval on
a tokenizer without a pad token, conversation prompts, a named judge everywhere, and bad inputs as clear errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, DataError, ModelError
from preftune.evaluation.commands import eval_command, pairs_command, read_prompts
from preftune.modeling.tiny import default_model, default_tokenizer


@pytest.fixture(scope="module")
def no_pad_world(tmp_path_factory):
    """A GPT-2/Llama-style checkpoint: its tokenizer has no pad token and its config no pad_token_id."""
    root = tmp_path_factory.mktemp("nopad")
    rows = builtin_preferences(24, seed=5)
    tok = default_tokenizer(rows)
    tok.pad_token = None
    assert tok.pad_token_id is None
    model = default_model(tok, seed=0)
    assert model.config.pad_token_id is None
    model.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run.yaml").write_text(
        f"model_name_or_path: {root / 'sft'}\ndataset: {root / 'prefs.jsonl'}\nmax_steps: 2\nlogging_steps: 1\n"
        f"per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\ndisable_tqdm: true\ncache_dir: {root / 'cache'}\n")
    prompts = sorted({r["prompt"] for r in rows})[:6]
    prompts[0] = "\n\nHuman: " + prompts[0] + "\n\nAssistant:"  # a JSONL prompt may hold newlines
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return root


def test_reward_model_then_pairs_then_dpo_then_eval_on_a_tokenizer_without_pad(no_pad_world, capsys):
    root = no_pad_world
    rm, pairs, dpo = root / "rm", root / "pairs.jsonl", root / "dpo"
    assert main(["train", str(root / "run.yaml"), "method=reward", f"output_dir={rm}"]) == 0
    # The exported reward model's config names the pad id its saved tokenizer has (it used to be null).
    saved_config = json.loads((rm / "final" / "config.json").read_text())
    saved_tokenizer = json.loads((rm / "final" / "tokenizer_config.json").read_text())
    assert saved_config["pad_token_id"] is not None
    from transformers import AutoTokenizer

    assert saved_config["pad_token_id"] == AutoTokenizer.from_pretrained(rm / "final").pad_token_id
    assert saved_tokenizer.get("pad_token") is not None

    assert main(["pairs", "--model", str(root / "sft"), "--prompts", str(root / "prompts.jsonl"), "--out", str(pairs),
                 "--judge", str(rm / "final"), "--k", "4", "--max-new-tokens", "8"]) == 0
    report = capsys.readouterr().out
    assert f"judged by reward_model:{rm / 'final'}" in report
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) >= 8 and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert any(r["prompt"].startswith("\n\nHuman: ") for r in rows)

    assert main(["train", str(root / "run.yaml"), "method=dpo", f"dataset={pairs}", f"output_dir={dpo}"]) == 0
    capsys.readouterr()
    out = root / "eval.json"
    assert main(["eval", "--model", str(dpo / "final"), "--reference", str(root / "sft"), "--prompts",
                 str(root / "prompts.jsonl"), "--judge", str(rm / "final"), "--pairs", str(pairs), "--out", str(out),
                 "--max-new-tokens", "8", "--num-samples", "2"]) == 0
    table = capsys.readouterr().out
    assert f"reward_model:{rm / 'final'}" in table.splitlines()[2]  # the judge row comes first
    result = json.loads(out.read_text())
    assert result["judge"] == result["policy"]["judge"] == f"reward_model:{rm / 'final'}"
    assert result["policy"]["n"] == 12 and result["policy"]["kl"] > 0
    assert 0 <= result["policy"]["implicit_reward_accuracy"] <= 1


def test_conversation_prompts_give_conversational_pairs(no_pad_world, tmp_path, monkeypatch, capsys):
    root = no_pad_world
    prompts = tmp_path / "chat.jsonl"
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The movie\nwas"}],
                     [{"role": "user", "content": "What"}]]
    prompts.write_text("".join(json.dumps({"prompt": c, "id": i}) + "\n" for i, c in enumerate(conversations)))
    (tmp_path / "judge_fn.py").write_text("def chars(prompts, completions):\n"
                                          "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", str(root / "sft"), "--prompts", str(prompts), "--out", str(out),
                 "--judge", "judge_fn:chars", "--k", "3", "--max-new-tokens", "6"]) == 0
    assert "judged by judge_fn:chars" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    for row in rows:
        assert row["prompt"] in conversations
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["score_chosen"] == len(row["chosen"][0]["content"])
    # eval reads the same conversations; a model against itself: KL 0, win rate ½, and the judge is named.
    table = eval_command(str(root / "sft"), str(root / "sft"), str(prompts), judge="judge_fn:chars",
                         max_new_tokens=6, num_samples=2, out=str(tmp_path / "e.json"))
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["judge"] == "judge_fn:chars" and "judge_fn:chars" in table
    assert saved["policy"]["kl"] == pytest.approx(0.0, abs=1e-5) and saved["policy"]["win_rate"] == 0.5


def test_the_judge_must_be_named(no_pad_world, capsys):
    root = no_pad_world
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(root / "sft"), "--reference", str(root / "sft"), "--prompts",
              str(root / "prompts.jsonl")])
    assert exit_info.value.code == 2 and "--judge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pairs", "--model", str(root / "sft"), "--prompts", str(root / "prompts.jsonl"), "--out", "x.jsonl"])


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: the file holds no prompts"),
    ("empty.txt", "", r"empty\.txt: the file holds no prompts"),
    ("broken.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', r"broken\.jsonl, line 3: not valid JSON"),
    ("list.jsonl", '["a"]\n', r"list\.jsonl, line 1: expected a JSON object"),
    ("noprompt.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', r"noprompt\.jsonl, line 2, field 'prompt': missing \(keys"),
    ("number.jsonl", '{"prompt": "a"}\n\n{"prompt": 3}\n', r"number\.jsonl, line 3, field 'prompt'.*got int$"),
    ("mixed.jsonl", '{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n',
     r"mixed\.jsonl, line 2, field 'prompt'.*prompt 0 is a string"),
    ("badmsg.jsonl", '{"prompt": [{"role": "user"}]}\n', r"badmsg\.jsonl, line 1, field 'prompt'.*'content'"),
    ("latin1.txt", "caf\u00e9\n".encode() + b"na\xefve\n", r"latin1\.txt, line 2: not valid UTF-8"),
    ("prompts.csv", "prompt\na\n", r"prompts\.csv.*\.txt file .* or a \.jsonl"),
])
def test_bad_prompt_files_are_named_data_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_prompt_files_of_text_and_conversations(tmp_path):
    assert read_prompts(write(tmp_path / "p.txt", "first prompt\n\n second \n")) == ["first prompt", " second "]
    rows = [{"prompt": "Human: a\n\nAssistant:"}, {"prompt": "b", "extra": 1}]
    assert read_prompts(write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))) == [
        "Human: a\n\nAssistant:", "b"]
    chat = [{"role": "user", "content": "hi"}]
    assert read_prompts(write(tmp_path / "c.jsonl", json.dumps({"prompt": chat}) + "\n")) == [chat]


def test_bad_arguments_fail_before_any_model_loads(no_pad_world, tmp_path):
    root = no_pad_world
    prompts = str(root / "prompts.jsonl")
    with pytest.raises(ConfigError, match="--k must be at least 2"):
        pairs_command("no/such/model", prompts, str(tmp_path / "o.jsonl"), judge="gold", k=1)
    with pytest.raises(ConfigError, match="temperature"):
        pairs_command("no/such/model", prompts, str(tmp_path / "o.jsonl"), judge="gold", temperature=-1.0)
    with pytest.raises(ConfigError, match="--num-samples"):
        eval_command("no/such/model", "no/such/ref", prompts, judge="gold", num_samples=0)
    with pytest.raises(DataError, match="no such file"):
        eval_command("no/such/model", "no/such/ref", prompts, judge="gold", pairs=str(tmp_path / "none.jsonl"))
    with pytest.raises(ModelError, match="no/such/judge"):
        pairs_command("no/such/model", prompts, str(tmp_path / "o.jsonl"), judge="no/such/judge")
    with pytest.raises(ModelError, match="--model 'no/such/model' is not a folder and not a Hub name"):
        pairs_command("no/such/model", prompts, str(tmp_path / "o.jsonl"), judge="gold")
