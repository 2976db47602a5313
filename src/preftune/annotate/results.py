"""What the votes say: preference rows for ``preftune train``, agreement, position bias, the human win rate.

Each item's votes are read as labels a / b / tie / both_bad (:mod:`preftune.annotate.store`). An item's
**decision** is the label with the most votes, or ``split`` when two labels share the most (one vote each for
a and b, say). Exported as a preference row: items decided a or b, the winner as ``chosen``; items decided tie
or both_bad, split items and items nobody labelled are left out and counted.

**Human win rate** (blind evaluation, a = the policy, b = the reference): each vote scores the policy 1 (a), 0
(b) or ½ (tie, and both_bad, which says neither is preferred either); an item's score is the mean of its
votes, the win rate the mean over labelled items, and its 95% interval a percentile bootstrap over items
(:func:`preftune.annotate.stats.bootstrap_mean_intervals`; items, not votes, are the independent units when
several people label one item). The judge's win rate on the same items (its scores: 1 if the policy's is
higher, ½ if equal, 0 if lower — as ``preftune eval`` counts) is resampled with the same draws beside it.

**Position bias**: the fraction of decisive votes (left or right) that chose the left side, with its Wilson
interval; 0.5 is unbiased. The sides are drawn at random per item and annotator, so a bias adds noise to the
labels but no systematic preference for a or b.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from preftune.annotate.stats import bootstrap_mean_intervals, cohen_kappa, krippendorff_alpha, wilson_interval
from preftune.annotate.store import LABELS, AnnotationStore
from preftune.errors import DataError

POLICY_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


def decide(labels: list[str]) -> str:
    """The label with the most votes, or ``split`` when several share the most."""
    counts = Counter(labels).most_common()
    if not counts:
        raise ValueError("an item without votes has no decision")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "split"
    return counts[0][0]


def _notes_by_item(votes: list[dict]) -> dict[int, list[dict]]:
    """Each item's notes, ``[{"annotator", "note"}]`` in the order cast (votes without a note left out)."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    for vote in votes:
        if vote["note"]:
            by_item[vote["item_id"]].append({"annotator": vote["annotator"], "note": vote["note"]})
    return by_item


def _labels_by_item(votes: list[dict]) -> dict[int, list[str]]:
    by_item: dict[int, list[str]] = defaultdict(list)
    for vote in votes:
        by_item[vote["item_id"]].append(vote["label"])
    return by_item


def _judge_label(item: dict) -> str | None:
    """The judge's label of an item from its scores (a higher, b higher, tie); without scores, a pairs file's
    order (its ``chosen``, a, is the judge's pick) and nothing for evaluation samples."""
    if item["a_score"] is None or item["b_score"] is None:
        return None
    if item["a_score"] == item["b_score"]:
        return "tie"
    return "a" if item["a_score"] > item["b_score"] else "b"


# ------------------------------------------------------------------------------------ export


@dataclass
class ExportReport:
    """Counts of :func:`export_preferences`: ``items = exported + tie + both_bad + split + unlabelled``."""

    task: str
    items: int = 0
    exported: int = 0
    tie: int = 0
    both_bad: int = 0
    split: int = 0
    unlabelled: int = 0
    against_file_order: int = 0  # exported rows whose chosen was the file's second response (b)
    path: str | None = None

    def __str__(self) -> str:
        return (f"exported {self.exported} of {self.items} {self.task} items as preference rows"
                + (f" to {self.path}" if self.path else "")
                + f"; left out {self.tie} decided tie, {self.both_bad} decided both bad, {self.split} split votes, "
                f"{self.unlabelled} unlabelled; {self.against_file_order} exported rows reverse the file's order")


def _response(prompt, value):
    """A response in the row's format: a conversational prompt takes a list of messages."""
    if isinstance(prompt, list) and isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return value


def preference_rows(store: AnnotationStore, task: str = "pairs", source: str | None = None
                    ) -> tuple[list[dict], ExportReport]:
    """Rows ``{prompt, chosen, rejected, votes, notes}`` of the items decided a or b (see the module docstring),
    in load order, with prompts and responses as loaded (conversational rows stay conversational); ``notes`` are
    the annotators' notes on the item's live votes, ``[{"annotator", "note"}]`` (``preftune train`` ignores them)."""
    items = [i for i in store.items(task) if source is None or i["source"] == source]
    if source is not None and not items:
        raise DataError(source, None, None, f"no {task} items were loaded from this file; give --source as "
                        "`preftune annotate report` lists the sources")
    kinds = {isinstance(i["prompt"], list) for i in items}
    if len(kinds) > 1:
        sources = sorted({i["source"] for i in items})
        raise DataError(store.name, None, None, f"the {task} items mix text and conversation prompts (from "
                        f"{', '.join(sources)}); a training file holds one kind, so export each with --source FILE")
    votes_cast = store.votes(task)
    labels, notes = _labels_by_item(votes_cast), _notes_by_item(votes_cast)
    report, rows = ExportReport(task=task, items=len(items)), []
    for item in items:
        votes = labels.get(item["id"], [])
        if not votes:
            report.unlabelled += 1
            continue
        decision = decide(votes)
        if decision in ("tie", "both_bad", "split"):
            setattr(report, decision, getattr(report, decision) + 1)
            continue
        chosen, rejected = (item["a"], item["b"]) if decision == "a" else (item["b"], item["a"])
        report.against_file_order += decision == "b"
        rows.append({"prompt": item["prompt"], "chosen": _response(item["prompt"], chosen),
                     "rejected": _response(item["prompt"], rejected), "votes": len(votes),
                     "notes": notes.get(item["id"], [])})
    report.exported = len(rows)
    return rows, report


def export_preferences(store: AnnotationStore, out: str | Path, task: str = "pairs", source: str | None = None
                       ) -> ExportReport:
    """Write :func:`preference_rows` as JSON Lines to ``out`` (atomically: a complete file or none)."""
    rows, report = preference_rows(store, task, source)
    if not rows:
        raise DataError(store.name, None, None, f"no {task} item is decided a or b yet ({report}); nothing to "
                        "export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    partial.replace(out)
    report.path = str(out)
    return report


# ------------------------------------------------------------------------------------ report


def _agreement(votes: list[dict]) -> dict:
    """Krippendorff's α over items with ≥ 2 labels, and Cohen's κ for each pair of annotators sharing items."""
    by_item = _labels_by_item(votes)
    several = [labels for labels in by_item.values() if len(labels) >= 2]
    per_annotator: dict[str, dict[int, str]] = defaultdict(dict)
    for vote in votes:
        per_annotator[vote["annotator"]][vote["item_id"]] = vote["label"]
    kappas = []
    for x, y in combinations(sorted(per_annotator), 2):
        shared = sorted(per_annotator[x].keys() & per_annotator[y].keys())
        if shared:
            kappas.append({"annotators": [x, y], "items": len(shared),
                           "kappa": cohen_kappa([per_annotator[x][i] for i in shared],
                                                [per_annotator[y][i] for i in shared])})
    return {"items_with_several_labels": len(several), "krippendorff_alpha": krippendorff_alpha(several),
            "cohen_kappa": kappas}


def _position(votes: list[dict]) -> dict:
    decisive = [v for v in votes if v["choice"] in ("left", "right")]
    left = sum(v["choice"] == "left" for v in decisive)
    return {"decisive_votes": len(decisive), "left_rate": left / len(decisive) if decisive else None,
            "ci95": wilson_interval(left, len(decisive))}


def _task_report(store: AnnotationStore, task: str) -> dict:
    items = store.items(task)
    votes = store.votes(task)
    labels = _labels_by_item(votes)
    decisions = {i: decide(v) for i, v in labels.items()}
    report: dict = {
        "items": len(items),
        "labelled_items": len(labels),
        "votes": len(votes),
        "sources": dict(Counter(i["source"] for i in items)),
        "annotators": dict(Counter(v["annotator"] for v in votes)),
        "labels": {label: sum(v["label"] == label for v in votes) for label in LABELS},
        "decisions": dict(Counter(decisions.values())),
        "median_seconds_per_vote": statistics.median(v["seconds"] for v in votes) if votes else None,
        "agreement": _agreement(votes),
        "position": _position(votes),
        "notes": sum(bool(v["note"]) for v in votes),
        "changes": store.changes(task),  # per annotator: votes undone (not counted above) and skips
    }
    judged = {i["id"]: _judge_label(i) if task == "eval" or i["a_score"] is not None else "a" for i in items}
    decided = [i for i, d in decisions.items() if d in ("a", "b") and judged.get(i) in ("a", "b")]
    report["judge_agreement"] = {
        "items": len(decided),
        "rate": sum(decisions[i] == judged[i] for i in decided) / len(decided) if decided else None,
    }
    if task == "eval":
        report.update(_win_rates(items, labels))
    return report


def _win_rates(items: list[dict], labels: dict[int, list[str]]) -> dict:
    """The policy's human win rate and the judge's, on the same labelled items, with paired bootstrap intervals."""
    judges = sorted({i["judge"] for i in items if i["judge"]})
    scored = [i for i in items if _judge_label(i) is not None]
    judge_score = {i["id"]: POLICY_SCORE[_judge_label(i)] for i in scored}
    labelled = [i["id"] for i in items if i["id"] in labels]
    human = [statistics.fmean(POLICY_SCORE[label] for label in labels[i]) for i in labelled]
    both = [i for i in labelled if i in judge_score]
    human_on_both = [statistics.fmean(POLICY_SCORE[label] for label in labels[i]) for i in both]
    judge_on_both = [judge_score[i] for i in both]
    (human_ci,) = bootstrap_mean_intervals([human])
    both_ci = bootstrap_mean_intervals([human_on_both, judge_on_both]) if both else [None, None]
    all_votes = [label for i in labelled for label in labels[i]]
    return {
        "human_win_rate": {
            "value": statistics.fmean(human) if human else None, "ci95": human_ci, "items": len(human),
            "wins": all_votes.count("a"), "losses": all_votes.count("b"), "ties": all_votes.count("tie"),
            "both_bad": all_votes.count("both_bad")},
        "judge_win_rate": {
            "judge": ", ".join(judges) or None, "items": len(both),
            "value": statistics.fmean(judge_on_both) if both else None, "ci95": both_ci[1],
            "human_on_these_items": statistics.fmean(human_on_both) if both else None,
            "human_ci95_on_these_items": both_ci[0],
            "all_items": statistics.fmean(judge_score.values()) if judge_score else None,
            "all_items_n": len(judge_score)},
    }


def overview(store: AnnotationStore, votes_per_item: int = 1) -> dict:
    """What whoever runs the task watches (``GET /api/overview``), counts only, for each task with items:
    ``{task: {items, complete, votes, annotators: {name: {votes, retracted, skipped}}, agreement: {items,
    krippendorff_alpha}, split: [{id, source, line, labels: {label: count}}]}}``. No one's individual votes."""
    shown = {}
    for task, n in store.count_items().items():
        if not n:
            continue
        items = {i["id"]: i for i in store.items(task)}
        votes = store.votes(task)
        labels = _labels_by_item(votes)
        annotators: dict[str, dict[str, int]] = {}
        for name, changed in store.changes(task).items():
            annotators[name] = {"votes": 0, **changed}
        for vote in votes:
            annotators.setdefault(vote["annotator"], {"votes": 0, "retracted": 0, "skipped": 0})["votes"] += 1
        several = [v for v in labels.values() if len(v) >= 2]
        split = [{"id": i, "source": items[i]["source"], "line": items[i]["line"], "labels": dict(Counter(v))}
                 for i, v in sorted(labels.items()) if decide(v) == "split"]
        shown[task] = {"items": n, "complete": sum(len(v) >= votes_per_item for v in labels.values()),
                       "votes": len(votes), "annotators": dict(sorted(annotators.items())),
                       "agreement": {"items": len(several), "krippendorff_alpha": krippendorff_alpha(several)},
                       "split": split}
    return shown


def annotation_report(store: AnnotationStore) -> dict:
    """Everything :func:`format_report` prints, as JSON-ready data, for each task with items."""
    counts = store.count_items()
    return {"database": store.name, **{task: _task_report(store, task) for task, n in counts.items() if n}}


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(ci) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_report(report: dict) -> str:
    """The report as lines a person reads."""
    lines = [f"annotation database {report['database']}"]
    if len(report) == 1:
        lines.append("no items loaded yet: `preftune annotate load --pairs FILE` or `--samples FILE`")
    for task, title in (("pairs", "preference pairs"), ("eval", "blind evaluation (a = policy, b = reference)")):
        r = report.get(task)
        if r is None:
            continue
        labels = ", ".join(f"{k} {v}" for k, v in r["labels"].items())
        annotators = ", ".join(f"{k} {v}" for k, v in sorted(r["annotators"].items())) or "none yet"
        agreement = r["agreement"]
        position = r["position"]
        lines += [
            "",
            f"{title}: {r['items']} items, {r['labelled_items']} labelled, {r['votes']} votes ({labels}); "
            f"{r['notes']} notes"
            + "".join(f"; {name} undid {c['retracted']} and skipped {c['skipped']}"
                      for name, c in sorted(r["changes"].items())),
            f"  annotators: {annotators}; median {_num(r['median_seconds_per_vote'], 1)} s per vote",
            f"  agreement on {agreement['items_with_several_labels']} items with several labels: Krippendorff's α "
            f"{_num(agreement['krippendorff_alpha'])}"
            + "".join(f"; Cohen's κ {k['annotators'][0]}–{k['annotators'][1]} {_num(k['kappa'])} ({k['items']} items)"
                      for k in agreement["cohen_kappa"]),
            f"  position: left chosen in {_num(position['left_rate'])}{_interval(position['ci95'])} of "
            f"{position['decisive_votes']} decisive votes (0.5 = no position bias)",
            f"  humans agree with the judge on {_num(r['judge_agreement']['rate'])} of "
            f"{r['judge_agreement']['items']} items both decided",
        ]
        if task == "eval":
            human, judge = r["human_win_rate"], r["judge_win_rate"]
            lines += [
                f"  human win rate of the policy: {_num(human['value'])}{_interval(human['ci95'])} on "
                f"{human['items']} items ({human['wins']} wins, {human['losses']} losses, {human['ties']} ties, "
                f"{human['both_bad']} both bad; ties and both bad count ½; 95% bootstrap over items)",
                f"  judge ({judge['judge'] or 'unnamed'}) win rate on the same {judge['items']} items: "
                f"{_num(judge['value'])}{_interval(judge['ci95'])}; on all {judge['all_items_n']} items: "
                f"{_num(judge['all_items'])}",
            ]
    return "\n".join(lines)

