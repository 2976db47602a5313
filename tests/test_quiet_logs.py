"""Facts about what `preftune train` prints: at the default level, preftune's own lines and nothing else — no
progress bar of another library under ``disable_tqdm: true``, no Accelerate checkpoint notes, no FutureWarnings;
``--debug`` shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.data.builtin import builtin_preferences
from preftune.modeling.tiny import build_tiny_model, default_tokenizer

# `preftune train …` as the console script runs it, once per argument list (one process: the imports once), with a
# FutureWarning raised during each run where a library would raise it (transformers raises them from inside its calls;
# none is certain to fire in this environment).
DRIVER = """
import json, sys, warnings
from preftune import cli
from preftune.training import checkpoint

saved = checkpoint.save_pretrained

def save_pretrained(*args, **kwargs):
    warnings.warn("`save_pretrained(foo=…)` is deprecated and will be removed in v9 (a library's FutureWarning)",
                  FutureWarning)
    return saved(*args, **kwargs)

checkpoint.save_pretrained = save_pretrained
for i, argv in enumerate(json.loads(sys.argv[1])):
    print(f"=== run {i}", file=sys.stderr, flush=True)
    if cli.main(argv) != 0:
        sys.exit(1)
"""

PROGRESS_BAR_TEXT = ("examples/s", "it/s", "Normalising rows", "Tokenizing", "Saving the dataset", "Loading weights",
                     "Writing model shards", "reference log-probs:", "%|")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A GPT-2 with tied embeddings (Accelerate notes "Removed shared tensor" on each checkpoint) and 16 pairs."""
    root = tmp_path_factory.mktemp("quiet")
    rows = builtin_preferences(16, seed=0)
    tok = default_tokenizer(rows)
    model = build_tiny_model(tok, "gpt2", seed=0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(root / "tied")
    tok.save_pretrained(root / "tied")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train(files: Path, *runs: list[str]) -> list[str]:
    """The stderr of each run (each with its own output folder), in order."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_VERBOSITY", "DISABLE_PROGRESS_BARS"))}
    env.pop("PREFTUNE_DEBUG", None)
    common = ["train", f"model_name_or_path={files / 'tied'}", f"dataset={files / 'pairs.jsonl'}", "max_steps=2",
              "save_steps=1", "per_device_train_batch_size=4", "disable_tqdm=true", "bf16=false",
              f"cache_dir={files / 'cache'}"]
    argvs = [[*common, f"output_dir={files / f'run{i}'}", *extra] for i, extra in enumerate(runs)]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.split("=== run ")[1:]


def test_the_default_log_holds_preftunes_lines_and_debug_adds_the_libraries(files):
    quiet, loud = train(files, [], ["--debug"])
    lines = quiet.splitlines()[1:]  # after the run's marker
    assert lines and all(" INFO preftune: " in line or " WARNING preftune" in line for line in lines), quiet
    assert any("methods dpo" in line for line in lines)  # what a user must know is still said
    assert not [text for text in PROGRESS_BAR_TEXT if text in quiet]
    assert "Removed shared tensor" not in quiet and "FutureWarning" not in quiet and "accelerate" not in quiet
    # --debug: Accelerate's note on each checkpoint (save_steps=1, 2 steps), its INFO lines, the FutureWarning.
    assert loud.count("Removed shared tensor") == 2 and "INFO accelerate" in loud and "FutureWarning" in loud
    assert not [text for text in PROGRESS_BAR_TEXT if text in loud]  # disable_tqdm still holds
