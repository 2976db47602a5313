"""Conversations end to end: SFT on ``messages`` rows scores every assistant turn and only those, multi-turn
completions are located turn by turn, and pairs files with message-list prompts (as ``preftune pairs``
writes them) train with the chat template."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from preftune import train
from preftune.data.batching import PreferenceCollator
from preftune.data.formats import DataError, load_rows, normalise
from preftune.data.tokenize import tokenize_rows
from preftune.modeling.logprobs import completion_logps, model_inputs
from preftune.modeling.tiny import build_tiny_model

# Closes assistant turns with EOS and a newline, like Qwen's "<|im_end|>\n".
EOS_NEWLINE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Renders earlier assistant turns differently from the last one (as templates that drop the reasoning of past
# turns do): a conversation cut after an earlier assistant turn is not a prefix of the whole one.
PAST_TURNS_CHANGE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = [
    [system("Be kind."), user("Tell me about the weather."), assistant("Sure! The weather is lovely."),
     user("And the night sky?"), assistant("Of course. The night sky is a fine thing to enjoy.")],
    [user("What do you think of my garden?"), assistant("Happy to help: my garden brings joy."),
     user("Thanks.")],  # a trailing user turn: nothing after the last assistant turn is trained
    [user("Write one line on a good book."), assistant("Great question! A good book is worth a smile.")],
    [system("Answer briefly."), user("Give me a thought on the city park."), assistant("The city park is lovely."),
     user("More?"), assistant("It is green."), user("Last one?"), assistant("Great question! Parks are nice.")],
]


def tokenized(rows, tokenizer, tmp_path, **kwargs):
    canonical, _ = normalise(Dataset.from_list(rows), "chats.jsonl")
    return tokenize_rows(canonical, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path / "cache",
                         source="chats.jsonl", **kwargs)[0]


def assistant_positions(ids, tokenizer):
    """Positions of assistant tokens read straight off the rendered ids: from after each <|assistant|> marker
    through the EOS that closes the turn (the tiny template's layout)."""
    marker, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    positions, inside = [], False
    for t, token in enumerate(ids):
        if inside:
            positions.append(t)
            inside = token != eos
        elif token == marker:
            inside = True
    return positions


def assistant_logps_from_full_logits(model, ids, positions):
    """Σ log p(ids[t] | ids[:t]) over ``positions``, from the full [L, V] logits of one forward."""
    logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, ids[t]] for t in positions)


def test_messages_rows_score_every_assistant_turn_and_nothing_else(tokenizer, tiny_model, tmp_path):
    rows = tokenized([{"messages": m} for m in CONVERSATIONS], tokenizer, tmp_path)
    model = tiny_model("llama").double()
    for layout in [(False, False), (True, True)]:
        batch = PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=layout[0], padding_free=layout[1],
                                   sft=True)(list(rows))
        got = completion_logps(model, **model_inputs(batch))
        for i, conversation in enumerate(CONVERSATIONS):
            last_assistant = max(t for t, m in enumerate(conversation) if m["role"] == "assistant")
            full = tokenizer.apply_chat_template(conversation[: last_assistant + 1], tokenize=True,
                                                 return_dict=True)["input_ids"]
            assert rows[i]["prompt_ids"] + rows[i]["completion_ids"] == full
            positions = assistant_positions(full, tokenizer)
            turns = sum(m["role"] == "assistant" for m in conversation)
            assert sum(full[t] == tokenizer.eos_token_id for t in positions) == turns
            assert got["tokens"][i] == len(positions)
            expected = assistant_logps_from_full_logits(model, full, positions)
            torch.testing.assert_close(got["logps"][i], expected, rtol=1e-9, atol=1e-9)


def test_conversations_may_open_with_a_system_or_a_user_turn(tokenizer, tmp_path):
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[2]}]
    canonical, report = normalise(Dataset.from_list(rows), "chats.jsonl")
    assert (report.format.kind, report.format.conversational, report.rows_out) == ("messages", True, 2)
    assert canonical[0]["prompt"] == CONVERSATIONS[0][:2] and canonical[0]["completion"] == CONVERSATIONS[0][2:]
    assert canonical[1]["prompt"] == CONVERSATIONS[2][:1] and canonical[1]["completion"] == CONVERSATIONS[2][1:]
    ids = tokenize_rows(canonical, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path)[0]
    assert tokenizer.decode(ids[0]["prompt_ids"]) == "<|bos|><|system|>Be kind.<|user|>Tell me about the weather." \
        "<|assistant|>"


def test_prompt_completion_rows_with_several_turns_score_only_the_assistant_turns(tokenizer, tmp_path):
    """Paired rows too: user turns inside chosen/rejected are context, not scored."""
    prompt = [user("Q?")]
    chosen = [assistant("yes"), user("sure?"), assistant("yes!")]
    rejected = [assistant("no"), user("sure?"), assistant("no!")]
    row = tokenized([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, tmp_path)[0]
    for name, answer in (("chosen", "yes"), ("rejected", "no")):
        scored = [t for t, keep in zip(row[f"{name}_ids"], row[f"{name}_mask"]) if keep]
        assert tokenizer.decode(row[f"{name}_ids"]) == f"{answer}<|eos|><|user|>sure?<|assistant|>{answer}!<|eos|>"
        assert tokenizer.decode(scored) == f"{answer}<|eos|>{answer}!<|eos|>"


def test_whitespace_after_an_earlier_turns_eos_stays_in_the_sequence_unscored(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", EOS_NEWLINE_TEMPLATE)
    row = tokenized([{"messages": [user("hi"), assistant("yes"), user("sure?"), assistant("yes!")]}], tokenizer,
                    tmp_path)[0]
    assert tokenizer.decode(row["completion_ids"]) == "yes<|eos|>\n<|user|>sure?<|assistant|>yes!<|eos|>"
    scored = [t for t, keep in zip(row["completion_ids"], row["completion_mask"]) if keep]
    assert tokenizer.decode(scored) == "yes<|eos|>yes!<|eos|>"


def test_a_template_that_changes_earlier_turns_names_the_row_and_the_turn(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", PAST_TURNS_CHANGE_TEMPLATE)
    rows = [{"messages": CONVERSATIONS[2]}, {"messages": CONVERSATIONS[0]}]  # single-turn rows are fine
    with pytest.raises(DataError) as caught:
        tokenized(rows, tokenizer, tmp_path)
    message = str(caught.value)
    assert message.startswith("chats.jsonl, row 1 (0-based), field 'completion': assistant turn 2 ")
    assert "(earlier)" in message and "Sure! The weather is lovely." in message
    assert (caught.value.row, caught.value.field) == (1, "completion")


@pytest.mark.parametrize("bad", [
    ({"messages": [system("s"), user("no reply")]}, "no assistant turn"),
    ({"messages": "plain text"}, "messages"),
])
def test_bad_messages_rows_are_refused_by_name(bad, tmp_path):
    row, detail = bad
    good = {"messages": CONVERSATIONS[2]}
    rows = [good, row] if isinstance(row["messages"], list) else [row]
    with pytest.raises(DataError, match=detail) as caught:
        normalise(Dataset.from_list(rows), "chats.jsonl")
    assert caught.value.field == "messages"


def assistant_nll(model, tokenizer, conversations):
    """Mean over conversations of the per-token NLL of their assistant tokens, from full logits."""
    values = []
    for conversation in conversations:
        full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        positions = assistant_positions(full, tokenizer)
        with torch.no_grad():
            values.append(-assistant_logps_from_full_logits(model, full, positions).item() / len(positions))
    return sum(values) / len(values)


def test_sft_on_messages_trains_on_the_assistant_tokens(tokenizer, tmp_path):
    conversations = CONVERSATIONS[:1] + CONVERSATIONS[2:]  # every one ends with an assistant turn
    before = assistant_nll(build_tiny_model(tokenizer, seed=0).double(), tokenizer, conversations)
    result = train(dict(method="sft", output_dir=str(tmp_path / "sft"), cache_dir=str(tmp_path / "cache"),
                        max_steps=10, num_train_epochs=10, per_device_train_batch_size=3, learning_rate=3e-3,
                        logging_steps=1, disable_tqdm=True, seed=0, bf16=False),
                   model=build_tiny_model(tokenizer, seed=0), tokenizer=tokenizer,
                   train_dataset=[{"messages": m} for m in conversations])
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    # Step 1's loss (one batch of all three rows, the untrained model) is the assistant-token NLL.
    assert metrics[0]["loss"] == pytest.approx(before, rel=1e-5)
    after = assistant_nll(AutoModelForCausalLM.from_pretrained(result.final_dir).double(), tokenizer, conversations)
    assert after < before - 1.0, f"assistant-token NLL {before:.3f} → {after:.3f}"


# ------------------------------------------------------------------------------------------ pairs files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_pairs_file_with_message_prompts_trains_with_the_chat_template(tokenizer, tmp_path):
    """The layout `preftune pairs` writes for message-list prompts: scores are extra columns, reported."""
    rows = [{"prompt": [system("Be kind."), user(f"Tell me about topic {i}.")],
             "chosen": [assistant(f"Sure! Topic {i} is lovely.")], "rejected": [assistant("No.")],
             "score_chosen": 0.9, "score_rejected": 0.1} for i in range(6)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    canonical, report = normalise(load_rows(source), source)
    assert (report.format.kind, report.format.conversational) == ("standard", True)
    assert report.ignored_columns == ["score_chosen", "score_rejected"]
    ids = tokenize_rows(canonical, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path / "c")[0]
    for row, ids_row in zip(rows, ids):
        for name in ("chosen", "rejected"):
            expected = tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=True,
                                                     return_dict=True)["input_ids"]
            assert ids_row["prompt_ids"] + ids_row[f"{name}_ids"] == expected

    result = train(dict(dataset=source, output_dir=str(tmp_path / "dpo"), cache_dir=str(tmp_path / "cache"),
                        max_steps=2, per_device_train_batch_size=3, logging_steps=1, disable_tqdm=True, seed=0,
                        bf16=False), model=build_tiny_model(tokenizer, seed=0), tokenizer=tokenizer)
    first = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert "ignored columns: score_chosen, score_rejected" in summary["data"]["train/rows"]


def test_plain_text_prompts_with_newlines_survive_a_jsonl_round_trip(tokenizer, tmp_path):
    """Anthropic HH style: multi-turn text prompts with blank lines, completions starting with a space."""
    prompt = "\n\nHuman: Tell me a joke.\n\nAssistant: Why?\n\nHuman: Another one.\n\nAssistant:"
    rows = [{"prompt": prompt, "chosen": " Why did the chicken cross the road?", "rejected": " No.",
             "score_chosen": 0.8, "score_rejected": 0.2}]
    source = write_jsonl(tmp_path / "hh.jsonl", rows)
    canonical, report = normalise(load_rows(source), source)
    assert canonical[0]["prompt"] == prompt and report.format.conversational is False
    row = tokenize_rows(canonical, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path)[0][0]
    assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == \
        f"<|bos|>{prompt} Why did the chicken cross the road?<|eos|>"
