"""Facts about `preftune report`: a self-contained page (no network, plots embedded) and a markdown summary with
every check's verdict, evidence and suggestion; the page renders in a real headless Chromium with every plot drawn
(and a blank plot would be caught)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from preftune.cli import main
from preftune.config import build_config
from preftune.errors import RunDirError
from preftune.evaluation.report import HEALTH_PLOTS, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def crafted_records() -> list[dict]:
    """A DPO run (β = 0.1) whose samples grow from 9.2 to 14.5 tokens and whose gold reward rises, peaks at
    step 80 and falls (Gao et al.'s RL form), with held-out evaluations every 50 steps; otherwise healthy."""
    records = []
    for step in range(10, 201, 10):
        t = step / 200
        if step % 40 == 0:
            d = 3 * t
            records.append({"step": step, "gold_reward": 0.48 + d * (0.3 - 0.25 * math.log(d)), "kl_to_ref": d * d,
                            "length": 9.2 + 5.3 * t, "eos_rate": 0.99 - 0.05 * t, "ref_gold_reward": 0.48,
                            "ref_length": 9.2, "ref_eos_rate": 0.99})
        records.append({"step": step, "loss": 0.69 - 0.3 * t, "grad_norm": 5 - 2 * t + 0.3 * math.sin(40 * t),
                        "learning_rate": 3e-4, "logps/chosen": -30 - 2 * t, "logps/rejected": -31 - 8 * t,
                        "rewards/chosen": -0.2 * t, "rewards/rejected": -0.8 * t, "rewards/margins": 0.6 * t,
                        "rewards/accuracies": 0.5 + 0.35 * t, "lengths/chosen": 10.4, "lengths/rejected": 9.6,
                        "lengths/margin_corr": 0.3 * t})
        if step % 50 == 0:
            records.append({"step": step, "eval_loss": 0.69 - 0.1 * t, "eval_logps/chosen": -29 - t,
                            "eval_logps/rejected": -30 - 3 * t, "eval_rewards/chosen": -0.1 * t,
                            "eval_rewards/rejected": -0.3 * t, "eval_rewards/margins": 0.2 * t,
                            "eval_rewards/accuracies": 0.5 + 0.2 * t, "eval_lengths/margin_corr": 0.1})
    return records


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in crafted_records()))
    config = build_config({"method": "dpo", "beta": 0.1, "learning_rate": 3e-4, "output_dir": str(run)})
    config.save(run / "config.yaml")
    return run


def test_the_page_is_self_contained_and_states_every_check(run_dir):
    report = write_report(run_dir)
    page = report.html.read_text()
    # Every plot has data in this run; those behind a warning come first.
    assert report.plots == ["verbosity", "over_optimisation", "likelihood", "saturation", "eos", "optimisation"]
    assert sorted(report.plots) == sorted(plot_id for plot_id, *_ in HEALTH_PLOTS)
    assert not re.search(r"https?://|<script|<link|@import", page)  # nothing to fetch, nothing to run
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(HEALTH_PLOTS) and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:  # each a real PNG
        assert Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).format == "PNG"
    statuses = {r.name: r.status for r in report.results}
    assert statuses["verbosity"] == statuses["over_optimisation"] == "warning"
    assert {s for name, s in statuses.items() if name not in ("verbosity", "over_optimisation")} == {"ok"}
    markdown = report.markdown.read_text()
    assert "**2 warning(s): verbosity, over_optimisation**" in markdown
    for result in report.results:
        assert html.escape(result.title) in page and result.title in markdown
    assert "9.2 tokens (π_ref) → 14.5 at step 200 (+58%)" in markdown and "ld_alpha=0.5" in markdown
    assert "stop earlier at step 80 (max_steps=80)" in markdown and "raise beta (0.1 → 0.2)" in markdown


def test_report_command_prints_the_summary_and_refuses_a_folder_without_metrics(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Response length (verbosity) | warning |" in printed and str(out / "report.html") in printed
    assert (out / "report.html").stat().st_size > 0 and not (run_dir / "report.html").exists()
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["report", str(empty)]) == RunDirError.exit_code
    assert "no metrics.jsonl here" in capsys.readouterr().err


def _chromium(args: list[str], profile, timeout: int = 90) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout, check=True)


PROBE = """<script>window.addEventListener('load', () => {
  const rects = [...document.querySelectorAll('figure.plot img')].map(img => {
    const r = img.getBoundingClientRect();
    return [img.parentElement.id, r.left + scrollX, r.top + scrollY, r.width, r.height];
  });
  document.body.setAttribute('data-probe', JSON.stringify({rects, height: document.documentElement.scrollHeight}));
});</script></body>"""


def render(html_path, tmp_path, width: int = 1400) -> tuple[Image.Image, dict]:
    """The page as Chromium draws it: a screenshot of the whole page and where each plot is. The layout comes from
    a copy of the page with a probe script (--dump-dom); the screenshot is of the page itself."""
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE))
    dom = _chromium(["--virtual-time-budget=5000", f"--window-size={width},1000", "--dump-dom", probe.as_uri()],
                    tmp_path / "profile-probe").stdout
    layout = json.loads(re.search(r"data-probe=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    shot = tmp_path / "shot.png"
    _chromium([f"--window-size={width},{layout['height']}", f"--screenshot={shot}", html_path.as_uri()],
              tmp_path / "profile-shot")
    return Image.open(shot).convert("RGB"), {name: (x, y, w, h) for name, x, y, w, h in layout["rects"]}


@pytest.mark.parametrize("step, shown", [('"ten"', "'ten'"), ("2.5", "2.5"), ("[3]", "[3]")])
def test_a_record_whose_step_is_not_a_whole_number_is_named_by_its_line(run_dir, capsys, step, shown):
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2].replace('"step": ', f'"step": {step}, "was": ', 1)
    metrics.write_text("\n".join(lines) + "\n")
    assert main(["report", str(run_dir)]) == RunDirError.exit_code
    err = capsys.readouterr().err
    assert err == (f"preftune: {metrics}, line 3: 'step' must be a whole number, got {shown}; fix or remove the "
                   "line\n")


def drawn(image: Image.Image, rect) -> tuple[int, float]:
    """Distinct colours in a plot's region and the fraction of its pixels that are not near-white."""
    x, y, w, h = (round(v) for v in rect)
    pixels = np.asarray(image.crop((x + 2, y + 2, x + w - 2, y + h - 2))).reshape(-1, 3)
    return len(np.unique(pixels, axis=0)), float((pixels.min(axis=1) < 230).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium_with_every_plot_drawn(run_dir, tmp_path):
    report = write_report(run_dir)
    image, rects = render(report.html, tmp_path)
    assert sorted(rects) == sorted(f"plot-{p}" for p in report.plots)
    for name, rect in rects.items():
        assert rect[2] > 300 and rect[3] > 200, f"{name} is laid out {rect}"
        assert rect[1] + rect[3] <= image.height, f"{name} lies outside the screenshot"
        colours, inked = drawn(image, rect)
        assert colours > 50 and inked > 0.02, f"{name} looks empty: {colours} colours, {inked:.1%} inked"

    # The check is not vacuous: the same page with one plot replaced by a blank image fails it.
    blank = io.BytesIO()
    Image.new("RGB", (900, 340), "white").save(blank, format="PNG")
    page = report.html.read_text()
    first = re.search(r'src="data:image/png;base64,[^"]*"', page).group(0)
    blanked = tmp_path / "blank.html"
    blank_source = f'src="data:image/png;base64,{base64.b64encode(blank.getvalue()).decode()}"'
    blanked.write_text(page.replace(first, blank_source))
    image, rects = render(blanked, tmp_path)
    colours, inked = drawn(image, rects[f"plot-{report.plots[0]}"])
    assert colours <= 3 and inked == 0.0


def test_the_experiments_page_renders_lists_bold_and_tables_and_escapes_the_rest():
    """``markdown_page``: a run of ``- `` lines is one list, ``**x**`` is bold, a pipe table's rule is not a row, and
    anything else (``<script>``) stays text."""
    from preftune.evaluation.report import markdown_page

    page = markdown_page("t", "m", "intro <script>\n\n- **a**: one\n- b < c\n\n| x | y |\n|---|---|\n| 1 | **2** |")
    assert "<p>intro &lt;script&gt;</p>" in page
    assert "<ul><li><strong>a</strong>: one</li><li>b &lt; c</li></ul>" in page
    assert "<table><tr><th>x</th><th>y</th></tr><tr><td>1</td><td><strong>2</strong></td></tr></table>" in page
    assert "<script>" not in page
