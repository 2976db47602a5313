"""From votes to what a user keeps: preference rows (ties, both-bad and split items left out and counted,
conversations kept), agreement, position bias, and the human win rate beside the judge's."""

from __future__ import annotations

import json

import pytest
from annotate_helpers import text_pairs, write_jsonl

from preftune.annotate.items import read_items
from preftune.annotate.results import annotation_report, decide, export_preferences, format_report, preference_rows
from preftune.annotate.stats import krippendorff_alpha
from preftune.annotate.store import AnnotationStore
from preftune.errors import DataError


@pytest.fixture
def store(database):
    with AnnotationStore(database) as s:
        yield s


def cast(store: AnnotationStore, annotator: str, item_id: int, label: str, note: str = "") -> str:
    """Vote ``label`` (a, b, tie, both_bad) on an item by clicking the side it was shown on; returns the click."""
    shown = store.show(item_id, annotator)
    a = next(i["a"] for i in store.items(store_task(store, item_id)) if i["id"] == item_id)
    choice = {"a": "left" if shown["left"] == a else "right", "b": "right" if shown["left"] == a else "left"}.get(
        label, label)
    assert store.vote(item_id, annotator, choice, note)["label"] == label
    return choice


def store_task(store: AnnotationStore, item_id: int) -> str:
    return "pairs" if any(i["id"] == item_id for i in store.items("pairs")) else "eval"


def test_decide_takes_the_most_voted_label_or_calls_it_split():
    assert decide(["a", "a", "b"]) == "a" and decide(["tie"]) == "tie"
    assert decide(["a", "b"]) == "split" and decide(["a", "b", "tie", "tie"]) == "tie"


def test_export_keeps_decided_pairs_and_counts_the_rest(store, tmp_path):
    rows = text_pairs(7)
    store.add_items(read_items(write_jsonl(tmp_path / "pairs.jsonl", rows), "pairs"))
    cast(store, "x", 1, "a")
    cast(store, "x", 2, "b")  # the human reverses the judge
    cast(store, "x", 3, "tie")
    cast(store, "x", 4, "both_bad")
    cast(store, "x", 5, "a")
    cast(store, "y", 5, "b")  # one each: split
    for who, label in (("x", "a"), ("y", "a"), ("z", "b")):
        cast(store, who, 7, label)  # 2 against 1: a
    report = export_preferences(store, tmp_path / "out" / "prefs.jsonl")
    assert (report.items, report.exported, report.tie, report.both_bad, report.split, report.unlabelled,
            report.against_file_order) == (7, 3, 1, 1, 1, 1, 1)
    assert str(report).startswith("exported 3 of 7 pairs items as preference rows to ")
    written = [json.loads(line) for line in (tmp_path / "out" / "prefs.jsonl").read_text().splitlines()]
    assert written == [
        {"prompt": rows[0]["prompt"], "chosen": rows[0]["chosen"], "rejected": rows[0]["rejected"], "votes": 1,
         "notes": []},
        {"prompt": rows[1]["prompt"], "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"], "votes": 1,
         "notes": []},
        {"prompt": rows[6]["prompt"], "chosen": rows[6]["chosen"], "rejected": rows[6]["rejected"], "votes": 3,
         "notes": []},
    ]


def test_conversations_export_as_conversations_and_kinds_are_not_mixed(store, tmp_path):
    chat = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"No {i}."}]} for i in range(2)]
    chat_file = write_jsonl(tmp_path / "chat.jsonl", chat)
    store.add_items(read_items(chat_file, "pairs"))
    cast(store, "x", 1, "b")
    cast(store, "x", 2, "a")
    rows, report = preference_rows(store)
    assert rows == [{**chat[0], "chosen": chat[0]["rejected"], "rejected": chat[0]["chosen"], "votes": 1,
                     "notes": []}, {**chat[1], "votes": 1, "notes": []}]
    # Eval samples hold text completions of a conversation: exported as one assistant message each.
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": chat[0]["prompt"], "policy": "Yes.",
                                                        "reference": "No."}])
    store.add_items(read_items(samples, "eval"))
    cast(store, "x", 3, "a")
    assert preference_rows(store, "eval")[0] == [{"prompt": chat[0]["prompt"], "votes": 1, "notes": [],
                                                  "chosen": [{"role": "assistant", "content": "Yes."}],
                                                  "rejected": [{"role": "assistant", "content": "No."}]}]
    text_file = write_jsonl(tmp_path / "text.jsonl", text_pairs(1))
    store.add_items(read_items(text_file, "pairs"))
    with pytest.raises(DataError, match="mix text and conversation prompts.*--source"):
        preference_rows(store)
    assert preference_rows(store, source=str(chat_file))[1].exported == 2
    with pytest.raises(DataError, match="nothing to export"):
        export_preferences(store, tmp_path / "t.jsonl", source=str(text_file))
    assert not (tmp_path / "t.jsonl").exists()


def test_agreement_and_position_in_the_report(store, tmp_path):
    store.add_items(read_items(write_jsonl(tmp_path / "pairs.jsonl", text_pairs(5)), "pairs"))
    clicks = []
    for item, (x, y) in enumerate([("a", "a"), ("a", "b"), ("b", "b"), ("tie", "tie")], start=1):
        clicks += [cast(store, "x", item, x), cast(store, "y", item, y)]
    clicks.append(cast(store, "x", 5, "a", note="close call"))
    report = annotation_report(store)["pairs"]
    # x: a a b tie, y: a b b tie → p_o = 3/4, p_e = (2·1 + 1·2 + 1·1)/16 = 5/16, κ = (3/4 − 5/16)/(11/16) = 7/11.
    assert report["agreement"]["cohen_kappa"] == [
        {"annotators": ["x", "y"], "items": 4, "kappa": pytest.approx(7 / 11)}]
    assert report["agreement"]["krippendorff_alpha"] == pytest.approx(
        krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b"], ["tie", "tie"]]))
    assert report["agreement"]["items_with_several_labels"] == 4
    decisive = [c for c in clicks if c in ("left", "right")]
    assert report["position"]["decisive_votes"] == len(decisive) == 7
    assert report["position"]["left_rate"] == pytest.approx(decisive.count("left") / 7)
    low, high = report["position"]["ci95"]
    assert low <= report["position"]["left_rate"] <= high  # the sides are drawn at random: 0 of 7 left may happen
    assert low < high
    assert report["labels"] == {"a": 4, "b": 3, "tie": 2, "both_bad": 0} and report["notes"] == 1
    assert report["decisions"] == {"a": 2, "split": 1, "b": 1, "tie": 1}
    # The file's scores make a the judge's pick: items decided a or b are 1, 3 and 5; humans side with a on 1 and 5.
    assert report["judge_agreement"] == {"items": 3, "rate": pytest.approx(2 / 3)}
    text = format_report(annotation_report(store))
    assert "Krippendorff's α" in text and "Cohen's κ x–y 0.636 (4 items)" in text


def test_human_win_rate_beside_the_judges_on_the_same_items(store, tmp_path):
    samples = [{"prompt": f"p{i}", "policy": f"mine {i}", "reference": f"theirs {i}", "policy_score": s,
                "reference_score": r, "judge": "gold", "sample": 0}
               for i, (s, r) in enumerate([(0.9, 0.1), (0.2, 0.8), (0.5, 0.5), (0.1, 0.3), (0.7, 0.2)])]
    store.add_items(read_items(write_jsonl(tmp_path / "samples.jsonl", samples), "eval"))
    for item, label in zip((1, 2, 3, 4), ("a", "a", "tie", "b")):  # item 5 stays unlabelled
        cast(store, "x", item, label)
    cast(store, "y", 1, "both_bad")
    report = annotation_report(store)["eval"]
    human, judge = report["human_win_rate"], report["judge_win_rate"]
    # Per item: (1 + ½)/2, 1, ½, 0 → mean 0.5625; the judge on the same items: 1, 0, ½, 0 → 0.375; on all five 0.5.
    assert human["value"] == pytest.approx(0.5625) and human["items"] == 4
    assert (human["wins"], human["losses"], human["ties"], human["both_bad"]) == (2, 1, 1, 1)
    assert judge == {"judge": "gold", "items": 4, "value": pytest.approx(0.375), "ci95": judge["ci95"],
                     "human_on_these_items": pytest.approx(0.5625), "human_ci95_on_these_items": human["ci95"],
                     "all_items": pytest.approx(0.5), "all_items_n": 5}
    assert human["ci95"][0] <= 0.5625 <= human["ci95"][1] and judge["ci95"][0] <= 0.375 <= judge["ci95"][1]
    assert 0 <= human["ci95"][0] < human["ci95"][1] <= 1
    text = format_report(annotation_report(store))
    assert "human win rate of the policy: 0.562 [" in text
    assert "judge (gold) win rate on the same 4 items: 0.375" in text
