"""Plots of a run, readable without explanation: titled axes with units, a legend, a title.

* :func:`plot_training_curves` — loss, implicit-reward accuracy and margin against the optimizer step,
  from ``metrics.jsonl`` files (TRL names: ``loss``, ``rewards/accuracies``, ``rewards/margins``).
* :func:`plot_reward_distributions` — histograms of gold rewards of samples, e.g. SFT against DPO.
* :func:`plot_frontier` — the DPO paper's reward–KL frontier (Fig. 2 left): every evaluated checkpoint as
  a point (x = KL(π‖π_ref) in nats, y = mean gold reward) and each method's upper envelope (the best reward
  reached at that KL or less); one colour per family of methods, one marker and line style per method within
  it, the legend outside the axes.

Each function saves a PNG and returns the matplotlib ``Figure`` (tests read its labels).

* :func:`write_report` — a run's health report (``preftune report RUN_DIR``): one self-contained HTML page (plots
  embedded as base64 PNG, no network) and a markdown summary, from ``metrics.jsonl`` and ``config.yaml``. Every
  check of :mod:`preftune.health` with its verdict, evidence and suggestion, and the curves behind it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from preftune.health import (  # noqa: E402
    CheckResult,
    RunContext,
    Thresholds,
    fit_gao,
    gold_points,
    grad_spikes,
    run_checks,
    series_from_records,
)
from preftune.metric_names import (  # noqa: E402
    EOS_RATE,
    EVAL_PREFIX,
    GRAD_NORM,
    LENGTH,
    LENGTHS_CHOSEN,
    LENGTHS_MARGIN_CORR,
    LENGTHS_REJECTED,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS,
    REF_EOS_RATE,
    REF_GOLD_REWARD,
    REF_LENGTH,
    REWARDS_ACCURACIES,
    REWARDS_CHOSEN,
    REWARDS_MARGINS,
    REWARDS_REJECTED,
    STEP,
)

CURVES = [(LOSS, "loss (nats per pair)", "Training loss"),
          (REWARDS_ACCURACIES, "implicit-reward accuracy (fraction of pairs)", "Reward accuracy"),
          (REWARDS_MARGINS, "reward margin β·Δlog-ratio (nats)", "Reward margin (chosen − rejected)")]


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
            points = [(r.get(STEP, i), r[key]) for i, r in enumerate(records) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.5)
        if key == LOSS:
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


def plot_frontier(points: Sequence[Mapping], out_png: str | Path, *, title: str | None = None,
                  max_kl: float | None = None) -> Figure:
    """Reward–KL frontier: ``points`` are dicts ``{method, kl, reward, step}`` (and optionally ``family``), one per
    evaluated checkpoint. Methods of one family share a colour and differ in marker and line style; a method
    without a family is its own. The legend, outside the axes, lists the methods under their families.
    ``max_kl``: when a run goes past it, the KL axis ends there and its label names the runs cut off."""
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
    beyond = sorted({p["method"] for p in points if max_kl is not None and p["kl"] > max_kl})
    if beyond:  # a run that diverged would squeeze every other run against the axis
        ax.set_xlim(0, max_kl)
        ax.set_xlabel(f"KL(π ‖ π_ref), summed over tokens (nats); past {max_kl:g}, not drawn: "
                      + ", ".join(beyond))
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
                  ncol=1 if len(handles) <= 34 else 2, title="points: checkpoints; lines: upper envelope",
                  title_fontsize=7)
    return _save(fig, out_png)


Band = tuple[float, float, float, float]  # (x, mean, low, high)


def plot_claims(panels: Mapping[str, Mapping[str, Sequence[Band]]], references: Mapping[str, Sequence[Band]],
                summary: Mapping[str, Sequence[Band]], compute: Mapping[str, tuple[Band, Band]], out_png: str | Path,
                *, title: str, compute_budget: float, bounds: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """The claims figure: one panel per family (each method's mean test reward against the KL budget with its 95%
    band over seeds; ``references`` — best-of-n and the DPO sweep — drawn in grey in every panel), a summary panel
    of the families' fitted frontiers, and a compute panel (reward at ``compute_budget`` against CPU seconds, both
    with their intervals). Legends sit below their panel, never over the data. The reward axis stays within
    ``bounds`` (the gold reward is a probability), so a wide band of few seeds does not flatten the others."""
    names = [*panels, "families", "compute"]
    columns = 3
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
    # one colour and marker per method across every panel, so a method is found by them in the compute panel too;
    # no grey, which the references use
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in range(10) if i != 7] + ["#393b79", "#000000", "#637939"]
    methods = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    methods += [label for label in compute if label not in methods]
    colour_of = {label: palette[i % len(palette)] for i, label in enumerate(methods)}
    marker_of = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(methods)}

    def draw(ax, curves: Mapping[str, Sequence[Band]], grey: bool = False) -> None:
        for i, (label, band) in enumerate(curves.items()):
            if not band:
                continue
            x, mean, low, high = zip(*band)
            colour = "0.55" if grey else colour_of.get(label, palette[i % len(palette)])
            style = LINESTYLES[i % len(LINESTYLES)] if grey else "-"
            ax.plot(x, mean, color=colour, linestyle=style, marker="" if grey else marker_of.get(label, "o"),
                    markersize=4, linewidth=1.2 if grey else 1.8, label=label)
            ax.fill_between(x, [max(v, bounds[0]) for v in low], [min(v, bounds[1]) for v in high], color=colour,
                            alpha=0.12 if grey else 0.2, linewidth=0)

    for ax, name in zip(axes.flat, names):
        if name == "compute":
            for label, ((x, _, x_low, x_high), (_, y, y_low, y_high)) in compute.items():
                ax.errorbar([x], [y], xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]],
                            fmt=marker_of[label], color=colour_of[label], capsize=3, label=label)
            if compute:
                ax.set_xscale("log")
                # seconds as plain numbers; of the minor ticks only 2, 3 and 5 × 10^k, so labels do not collide
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else ""))
            else:
                ax.text(0.5, 0.5, f"no method reached KL {compute_budget:g} at every seed", ha="center",
                        transform=ax.transAxes, color="0.4")
            ax.set_xlabel("CPU seconds (training + the SFT, pairs and reward model it needs)")
            ax.set_ylabel(f"test reward at KL {compute_budget:g}")
            ax.set_title(f"compute: reward at KL {compute_budget:g} against its cost")
        else:
            if name == "families":
                draw(ax, summary)
                ax.set_title("the families' frontiers (chosen on validation)")
            else:
                # a reference drawn as one of the panel's own methods is not drawn twice
                draw(ax, {label: band for label, band in references.items() if label not in panels[name]}, grey=True)
                draw(ax, panels[name])
                ax.set_title(name)
            ax.set_xlabel("KL(π ‖ π_ref) budget (nats)")
            ax.set_ylabel("test reward at the budget")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, frameon=False,
                      ncol=2)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------ health report


@dataclass
class HealthReport:
    """What :func:`write_report` wrote, and the verdicts on the page."""

    html: Path
    markdown: Path
    results: list[CheckResult]
    plots: list[str]  # the ids of the embedded plots, in page order


def run_context(run_dir: Path) -> RunContext:
    """The :class:`~preftune.health.RunContext` of a run folder, from its ``config.yaml`` (β, learning
    rate, methods); an empty one when the file is missing or no longer loads."""
    from preftune.config import load_config
    from preftune.errors import ConfigError

    path = run_dir / "config.yaml"
    if not path.is_file():
        return RunContext()
    try:
        return RunContext.from_config(load_config(path))
    except ConfigError:
        return RunContext()


def _points(series, key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    return [(s, v * scale) for s, v in series.get(key, ()) if math.isfinite(v)]


def _line(ax, points, label: str, **style) -> bool:
    if not points:
        return False
    ax.plot(*zip(*points), label=label, marker="o" if len(points) < 12 else None, markersize=3, **style)
    return True


def _finish(ax, ylabel: str, title: str, xlabel: str = "optimizer step") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _panels(n: int):
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8))
    return fig, list(axes) if n > 1 else [axes]


CHOSEN, REJECTED, HELD_OUT, REFERENCE = "tab:green", "tab:red", "tab:purple", "grey"


def _plot_likelihoods(series, ctx, th):
    if not series.get(LOGPS_CHOSEN):
        return None
    fig, (raw, ratio, unseen) = _panels(3)
    _line(raw, _points(series, LOGPS_CHOSEN), "chosen (training pairs)", color=CHOSEN)
    _line(raw, _points(series, LOGPS_REJECTED), "rejected (training pairs)", color=REJECTED)
    _line(raw, _points(series, EVAL_PREFIX + LOGPS_CHOSEN), "chosen (held-out)", color=CHOSEN, linestyle="--")
    _line(raw, _points(series, EVAL_PREFIX + LOGPS_REJECTED), "rejected (held-out)", color=REJECTED, linestyle="--")
    _finish(raw, "log π(y|x), summed over tokens (nats)", "Log-likelihood of responses")
    if ctx.beta:
        _line(ratio, _points(series, REWARDS_CHOSEN, 1 / ctx.beta), "chosen", color=CHOSEN)
        _line(ratio, _points(series, REWARDS_REJECTED, 1 / ctx.beta), "rejected", color=REJECTED)
        ratio.axhline(-th.likelihood_drop, color=REFERENCE, linestyle=":", label="warning threshold")
        _finish(ratio, "log π/π_ref (nats) = reward / β", "Training pairs, against the reference")
        chosen = _points(series, EVAL_PREFIX + REWARDS_CHOSEN, 1 / ctx.beta)
        rejected = dict(_points(series, EVAL_PREFIX + REWARDS_REJECTED, 1 / ctx.beta))
        _line(unseen, chosen, "chosen", color=CHOSEN)
        _line(unseen, sorted(rejected.items()), "rejected", color=REJECTED)
        _line(unseen, [(s, (v + rejected[s]) / 2) for s, v in chosen if s in rejected], "mean (unseen responses)",
              color=HELD_OUT, linewidth=2.5)
        unseen.axhline(-th.dispersion_drop, color=REFERENCE, linestyle=":", label="warning threshold")
        _finish(unseen, "log π/π_ref (nats)", "Held-out responses (dispersion)")
        if not chosen:
            unseen.text(0.5, 0.5, "no evaluation records\n(set eval_steps and an eval dataset)", ha="center",
                        va="center", transform=unseen.transAxes)
    else:
        for ax in (ratio, unseen):
            ax.text(0.5, 0.5, "no β: rewards are not log-ratios\nfor this method", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
    return fig


def _plot_saturation(series, ctx, th):
    if not series.get(REWARDS_MARGINS) and not series.get(REWARDS_ACCURACIES):
        return None
    fig, (margins, accuracy) = _panels(2)
    _line(margins, _points(series, REWARDS_MARGINS), "training pairs", color="tab:blue")
    _line(margins, _points(series, EVAL_PREFIX + REWARDS_MARGINS), "held-out pairs", color=HELD_OUT, linestyle="--")
    _finish(margins, "reward margin r(y_w) − r(y_l)", "Reward margin")
    _line(accuracy, _points(series, REWARDS_ACCURACIES), "training pairs", color="tab:blue")
    _line(accuracy, _points(series, EVAL_PREFIX + REWARDS_ACCURACIES), "held-out pairs", color=HELD_OUT,
          linestyle="--")
    accuracy.axhline(th.saturated_accuracy, color=REFERENCE, linestyle=":", label="saturation threshold")
    accuracy.set_ylim(0, 1.02)
    _finish(accuracy, "fraction of pairs with r(y_w) > r(y_l)", "Reward accuracy (saturation)")
    return fig


def _plot_verbosity(series, ctx, th):
    sampled, corr = _points(series, LENGTH), _points(series, LENGTHS_MARGIN_CORR)
    if not sampled and not corr and not series.get(LENGTHS_CHOSEN):
        return None
    fig, (length, correlation) = _panels(2)
    _line(length, sampled, "policy samples", color="tab:blue", linewidth=2.5)
    _line(length, _points(series, REF_LENGTH), "π_ref samples", color=REFERENCE, linestyle="--")
    _line(length, _points(series, LENGTHS_CHOSEN), "chosen (training pairs)", color=CHOSEN, linestyle=":")
    _line(length, _points(series, LENGTHS_REJECTED), "rejected (training pairs)", color=REJECTED, linestyle=":")
    _finish(length, "response length (tokens)", "Length over training (verbosity)")
    _line(correlation, corr, "training pairs", color="tab:blue")
    _line(correlation, _points(series, EVAL_PREFIX + LENGTHS_MARGIN_CORR), "held-out pairs", color=HELD_OUT,
          linestyle="--")
    correlation.axhline(0, color=REFERENCE, linewidth=0.8)
    correlation.set_ylim(-1, 1)
    _finish(correlation, "Pearson r(margin, |y_w| − |y_l|)", "Does the margin follow length?")
    return fig


def _plot_gold(series, ctx, th):
    import numpy as np

    points = gold_points(series)
    if not points:
        return None
    reference = _points(series, REF_GOLD_REWARD)
    r0 = reference[-1][1] if reference else None
    fig, (frontier, proxy) = _panels(2)
    steps, d, reward = zip(*points)
    frontier.plot(d, reward, color="tab:blue", marker="o", label="policy checkpoints")
    for step, x, y in points:
        frontier.annotate(str(step), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    if r0 is not None:
        frontier.scatter([0], [r0], color=REFERENCE, zorder=3, label="π_ref")
    fits = fit_gao(d, reward, r0)
    grid = np.linspace(0, max(d) * 1.15, 100)
    names = {"rl": "fit d(α − β·ln d)", "bon": "fit d(α − β·d) (best-of-n form)"}
    for form, style in (("rl", "-"), ("bon", ":")):
        if form in fits:
            frontier.plot(grid, fits[form](grid), color="tab:orange", linestyle=style, label=names[form])
    peak = max(points, key=lambda p: p[2])
    frontier.scatter([peak[1]], [peak[2]], s=120, facecolors="none", edgecolors="black", zorder=4,
                     label=f"peak (step {peak[0]})")
    _finish(frontier, "mean gold reward", "Gold reward against √KL (Gao et al.)", xlabel="√KL(π‖π_ref) (√nats)")
    _line(proxy, list(zip(steps, reward)), "gold reward", color="tab:blue")
    _finish(proxy, "mean gold reward", "Gold reward and the proxy over steps")
    margins = _points(series, REWARDS_MARGINS)
    if margins:
        twin = proxy.twinx()
        twin.plot(*zip(*margins), color="tab:orange", linestyle="--", label="training reward margin (proxy)")
        twin.set_ylabel("training reward margin")
        handles = proxy.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        proxy.legend(handles, [h.get_label() for h in handles], fontsize=8)
    return fig


def _plot_eos(series, ctx, th):
    eos = _points(series, EOS_RATE)
    if not eos:
        return None
    fig, (ax,) = _panels(1)
    _line(ax, eos, "policy samples", color="tab:blue", linewidth=2.5)
    _line(ax, _points(series, REF_EOS_RATE), "π_ref samples", color=REFERENCE, linestyle="--")
    ax.set_ylim(0, 1.02)
    _finish(ax, "fraction of samples ending with EOS", "EOS rate")
    return fig


def _plot_optimisation(series, ctx, th):
    norms, loss = _points(series, GRAD_NORM), series.get(LOSS, [])
    if not norms and not loss:
        return None
    fig, (grad, losses) = _panels(2)
    _line(grad, norms, "gradient norm (before clipping)", color="tab:blue")
    spikes = grad_spikes(norms, th)
    if spikes:
        grad.scatter([s for s, _, _ in spikes], [v for _, v, _ in spikes], color="red", zorder=3, label="spike")
    _finish(grad, "‖g‖₂", "Gradient norm")
    _line(losses, [(s, v) for s, v in loss if math.isfinite(v)], "training loss", color="tab:blue")
    _line(losses, _points(series, EVAL_PREFIX + LOSS), "held-out loss", color=HELD_OUT, linestyle="--")
    bad = sorted({s for points in series.values() for s, v in points if not math.isfinite(v)})
    for i, step in enumerate(bad):
        losses.axvline(step, color="red", alpha=0.6, label="non-finite value" if i == 0 else None)
    _finish(losses, "loss", "Loss (non-finite values in red)")
    return fig


# (plot id, title, the checks it illustrates, function)
HEALTH_PLOTS = [
    ("likelihood", "Log-likelihoods: training pairs and held-out responses", ("likelihood", "dispersion"),
     _plot_likelihoods),
    ("saturation", "Margins and accuracies", ("saturation",), _plot_saturation),
    ("verbosity", "Length", ("verbosity",), _plot_verbosity),
    ("over_optimisation", "Gold reward against √KL", ("over_optimisation",), _plot_gold),
    ("eos", "EOS rate", ("eos",), _plot_eos),
    ("optimisation", "Gradient norm and loss", ("grad_spikes", "non_finite"), _plot_optimisation),
]


def _png_base64(fig: Figure, dpi: int = 90) -> tuple[str, int, int]:
    """The figure as a base64 PNG and its size in pixels (the page reserves the space before decoding it)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    width, height = (round(x * dpi) for x in fig.get_size_inches())
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 20px 28px;
       max-width: 1500px; color: #1d1d1f; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
td, th { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; font-size: 12px; }
.ok { background: #d9f2dd; color: #17612a; } .warning { background: #fde2c4; color: #8a4200; }
.nodata { background: #e8e8ec; color: #555; }
figure { margin: 10px 0 22px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #333; margin-top: 4px; }
"""


def _badge(status: str) -> str:
    css = {"ok": "ok", "warning": "warning"}.get(status, "nodata")
    return f'<span class="badge {css}">{html.escape(status)}</span>'


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, thresholds=None) -> HealthReport:
    """Write ``report.html`` and ``report.md`` for the run in ``run_dir`` (into ``out_dir``, default the run folder).

    Reads ``metrics.jsonl`` (training, ``eval_`` and sample-evaluation records) and ``config.yaml`` (β, learning
    rate, for the suggestions); runs every check of :mod:`preftune.health`.
    """
    from preftune.errors import RunDirError

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"{run_dir}: no metrics.jsonl here; give the folder of a run (output_dir of "
                          "`preftune train`, e.g. runs/demo/dpo)")
    records = _read_records(metrics)
    if not records:
        raise RunDirError(f"{metrics} holds no records yet; run again once the run has logged (logging_steps)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = thresholds or Thresholds()
    ctx = run_context(run_dir)
    series = series_from_records(records)
    results = run_checks(series, ctx, thresholds)
    by_name = {r.name: r for r in results}
    summary = _read_json(run_dir / "summary.json")
    last_step = max((s for points in series.values() for s, _ in points), default=0)
    title = f"Health report: {run_dir.resolve().name}"
    beta = f"β = {ctx.beta:g}" if ctx.beta else "β: not a log-ratio method"
    meta = (f"{run_dir} · methods {', '.join(ctx.methods) or '?'} · {beta} · learning rate "
            f"{ctx.learning_rate if ctx.learning_rate is not None else '?'} · {len(records)} records up to step "
            f"{last_step}" + (f" · {summary['train_runtime_s']:.0f} s of training" if "train_runtime_s" in summary
                              else ""))
    warnings = [r for r in results if r.warning]
    verdict = (f"{len(warnings)} warning(s): {', '.join(r.name for r in warnings)}" if warnings
               else "no warnings")

    rows = "".join(f"<tr><td>{html.escape(r.title)}</td><td>{_badge(r.status)}</td><td>{html.escape(r.evidence)}"
                   f"</td><td>{html.escape(r.suggestion) if r.warning else ''}</td></tr>" for r in results)
    sections, plots = [], []
    # The plots behind warnings first: what needs attention is at the top of the page.
    ordered = sorted(HEALTH_PLOTS, key=lambda plot: not any(by_name[c].warning for c in plot[2]))
    for plot_id, plot_title, checks, draw in ordered:
        fig = draw(series, ctx, thresholds)
        notes = "".join(f"<li>{_badge(by_name[c].status)} {html.escape(by_name[c].title)}: "
                        f"{html.escape(by_name[c].evidence)}</li>" for c in checks)
        if fig is None:
            body = '<p class="meta">no data for this plot in metrics.jsonl</p>'
        else:
            plots.append(plot_id)
            png, width, height = _png_base64(fig)
            body = (f'<figure id="plot-{plot_id}" class="plot"><img alt="{html.escape(plot_title)}" width="{width}" '
                    f'height="{height}" src="data:image/png;base64,{png}"><figcaption><ul>{notes}</ul></figcaption>'
                    "</figure>")
        sections.append(f"<h2>{html.escape(plot_title)}</h2>{body}")
    page = _html_page(title, meta, f"<p><b>{html.escape(verdict)}</b></p><table><tr><th>check</th><th>status</th>"
                      f"<th>evidence</th><th>suggestion</th></tr>{rows}</table>{''.join(sections)}")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(health_markdown(results, title, meta, verdict), encoding="utf-8")
    return HealthReport(html_path, md_path, results, plots)


def markdown_page(title: str, meta: str, markdown: str, figures: Sequence[tuple[str | Path, str]] = ()) -> str:
    """An HTML page in the health report's style: ``figures`` (PNG files, embedded, each with its caption) above
    ``markdown``'s paragraphs, bullet lists and pipe tables, with ``**bold**`` (the subset the experiments write: a
    table is a run of lines starting with ``|``, its second line the rule; a list is a run of lines starting with
    ``- ``). Everything else is escaped text."""
    body = []
    for path, caption in figures:
        png = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rows = block[0], block[2:]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                                  for row in rows) + "</table>")
            continue
        if lines[i].startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        if lines[i].strip():
            body.append(f"<p>{_inline(lines[i])}</p>")
        i += 1
    return _html_page(title, meta, "".join(body))


def _inline(text: str) -> str:
    """Escaped text with ``**bold**`` as ``<strong>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _html_page(title: str, meta: str, body: str) -> str:
    """A page in the reports' style: the title, a line of context, then ``body`` (HTML)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">{html.escape(meta)}</p>{body}</body></html>\n')


def health_markdown(results, title: str, meta: str, verdict: str) -> str:
    """The checks as a markdown page: verdict, then one table row per check."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = [f"# {title}", "", meta, "", f"**{verdict}**", "", "| check | status | evidence | suggestion |",
             "|---|---|---|---|"]
    lines += [f"| {r.title} | {r.status} | {cell(r.evidence)} | {cell(r.suggestion) if r.warning else ''} |"
              for r in results]
    return "\n".join(lines) + "\n"


def _read_records(metrics: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, each a JSON object whose ``step`` (when given) is a whole number; a line that
    is not is a RunDirError naming it (the checks and plots order records by step)."""
    from preftune.config import shown
    from preftune.errors import RunDirError

    records = []
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                raise RunDirError(f"{metrics}, line {number}: not valid JSON ({getattr(err, 'msg', err)}); each line "
                                  "is one JSON object as training logs it") from None
            if not isinstance(record, dict):
                raise RunDirError(f"{metrics}, line {number}: expected a JSON object of metrics, got "
                                  f"{type(record).__name__}")
            step = record.get(STEP)
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                                     or not math.isfinite(step) or step != int(step)):
                raise RunDirError(f"{metrics}, line {number}: 'step' must be a whole number, got {shown(step)}; fix "
                                  "or remove the line")
            records.append(record)
    return records


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def report_command(run_dir: str, out: str | None = None) -> str:
    """``preftune report``: write the report; return the markdown summary and where the files are."""
    report = write_report(run_dir, out)
    return f"{report.markdown.read_text(encoding='utf-8')}\nwritten: {report.html} and {report.markdown}"
