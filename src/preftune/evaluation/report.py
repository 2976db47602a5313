"""Plots of a run, readable without explanation: titled axes with units, a legend, a title.

* :func:`plot_training_curves` — loss, implicit-reward accuracy and margin against the optimizer step,
  from ``metrics.jsonl`` files (TRL names: ``loss``, ``rewards/accuracies``, ``rewards/margins``).
* :func:`plot_reward_distributions` — histograms of gold rewards of samples, e.g. SFT against DPO.
* :func:`plot_frontier` — the DPO paper's reward–KL frontier (Fig. 2 left): every evaluated checkpoint as
  a point (x = KL(π‖π_ref) in nats, y = mean gold reward) and each method's upper envelope (the best reward
  reached at that KL or less); one colour per family of methods, one marker and line style per method within
  it, the legend outside the axes.

Each function saves a PNG and returns the matplotlib ``Figure`` (tests read its labels).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CURVES = [("loss", "loss (nats per pair)", "Training loss"),
          ("rewards/accuracies", "implicit-reward accuracy (fraction of pairs)", "Reward accuracy"),
          ("rewards/margins", "reward margin β·Δlog-ratio (nats)", "Reward margin (chosen − rejected)")]


def read_metrics(source: str | Path | Iterable[Mapping]) -> list[dict]:
    """Records of a ``metrics.jsonl`` path, or the given records themselves."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return [dict(r) for r in source]


def _named_runs(runs) -> dict[str, list[dict]]:
    if isinstance(runs, Mapping):
        return {name: read_metrics(src) for name, src in runs.items()}
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if runs and all(isinstance(r, (str, Path)) for r in runs):
        return {Path(r).parent.name or str(r): read_metrics(r) for r in runs}
    return {"run": read_metrics(runs)}


def _save(fig: Figure, out_png: str | Path) -> Figure:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120, bbox_inches="tight")  # a legend outside the axes stays in the file
    plt.close(fig)  # the Figure object stays usable for inspection; pyplot just forgets it
    return fig


def plot_training_curves(
    runs: str | Path | Sequence[str | Path] | Sequence[Mapping] | Mapping[str, str | Path | Sequence[Mapping]],
    out_png: str | Path,
) -> Figure:
    """Loss, reward accuracy and reward margin against step, one line per run.

    ``runs``: a ``metrics.jsonl`` path, a list of such paths (each run named by its folder), a list of
    records, or ``{run name: path or records}``. Records
    without ``step`` are numbered in order; a metric a run never logged is left out of its panel.
    """
    named = _named_runs(runs)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, (key, ylabel, title) in zip(axes, CURVES):
        for name, records in named.items():
            points = [(r.get("step", i), r[key]) for i, r in enumerate(records) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.5)
        if key == "loss":
            ax.axhline(0.6931, color="grey", linestyle=":", linewidth=1, label="ln 2 (DPO at step 0)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, out_png)


def plot_reward_distributions(rewards: Mapping[str, Sequence[float]], out_png: str | Path, bins: int = 20) -> Figure:
    """Overlaid histograms of gold rewards in [0, 1], one per policy (e.g. ``{"SFT": r1, "DPO": r2}``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    edges = [i / bins for i in range(bins + 1)]
    colours = plt.get_cmap("tab10")
    for i, (name, values) in enumerate(rewards.items()):
        values = list(values)
        mean = sum(values) / max(len(values), 1)
        colour = colours(i % 10)
        ax.hist(values, bins=edges, alpha=0.5, color=colour, label=f"{name} (mean {mean:.2f}, n={len(values)})")
        ax.axvline(mean, color=colour, linestyle="--", linewidth=1.5)  # the mean, which the legend states
    ax.set_xlim(0, 1)
    ax.set_xlabel("gold reward p(positive) of a sample (0 = negative, 1 = positive)")
    ax.set_ylabel("number of samples")
    ax.set_title("Gold reward of policy samples on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, out_png)


def _upper_envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The running maximum of reward over increasing KL: the best reward reached within each KL budget."""
    envelope, best = [], float("-inf")
    for kl, reward in sorted(points):
        if reward > best:
            best = reward
            envelope.append((kl, reward))
    return envelope


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1", "2", "3")
LINESTYLES = ("-", "--", "-.", ":")


def plot_frontier(points: Sequence[Mapping], out_png: str | Path, *, title: str | None = None) -> Figure:
    """Reward–KL frontier: ``points`` are dicts ``{method, kl, reward, step}`` (and optionally ``family``), one per
    evaluated checkpoint. Methods of one family share a colour and differ in marker and line style; a method
    without a family is its own. The legend, outside the axes, lists the methods under their families."""
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(p["method"] for p in points))
    family_of = {p["method"]: p.get("family") or p["method"] for p in points}
    families = list(dict.fromkeys(family_of[m] for m in methods))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 6))
    handles: list = []
    for f, name in enumerate(families):
        colour = colours(f % 10)
        members = [m for m in methods if family_of[m] == name]
        if len(members) > 1 or members[0] != name:  # a header line for the family in the legend
            handles.append(Line2D([], [], linestyle="none", label=name))
        for j, method in enumerate(members):
            mine = [(float(p["kl"]), float(p["reward"])) for p in points if p["method"] == method]
            marker, style = MARKERS[j % len(MARKERS)], LINESTYLES[j // len(MARKERS) % len(LINESTYLES)]
            if len(members) > len(MARKERS):
                style = LINESTYLES[j % len(LINESTYLES)]
            ax.scatter(*zip(*mine), s=14, alpha=0.45, color=colour, marker=marker)
            (line,) = ax.plot(*zip(*_upper_envelope(mine)), color=colour, linewidth=1.6, linestyle=style,
                              drawstyle="steps-post", marker=marker, markersize=5,
                              label=f"  {method}" if len(members) > 1 or members[0] != name else method)
            handles.append(line)
    ax.set_xlabel("KL(π ‖ π_ref), summed over tokens (nats)")
    ax.set_ylabel("mean gold reward p(positive)")
    ax.set_title(title or "Reward vs KL to the reference")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
                  ncol=1 if len(handles) <= 34 else 2, title="points: checkpoints; lines: upper envelope",
                  title_fontsize=7)
    return _save(fig, out_png)
