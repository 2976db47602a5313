"""Two CPU processes (torchrun, gloo) give the same weights and the same evaluation as one process with the same
global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preftune.data.builtin import builtin_preferences
from preftune.modeling.tiny import default_model, default_tokenizer


def free_port() -> str:
    """A port nobody listens on now (a fixed one may still be held by an earlier run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, precompute):
    rows = builtin_preferences(32, seed=3)
    tok = default_tokenizer(rows)
    default_model(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 30 evaluation rows in batches of 8 per process: 2 processes see 4 batches of 8, 8, 8 and 6 rows between them;
    # Accelerate's even batches would repeat 2 rows in the last one.
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in builtin_preferences(30, seed=4)))

    # adam_epsilon=1: the update is proportional to the gradient, so all-reduce rounding stays tiny.
    common = [f"model_name_or_path={tmp_path / 'model'}", f"dataset={data}", "max_steps=3",
              "learning_rate=1e-2", "adam_epsilon=1", "disable_tqdm=true", f"cache_dir={tmp_path / 'cache'}",
              f"precompute_ref_log_probs={precompute}", "bf16=false", f"eval_dataset={held_out}",
              "per_device_eval_batch_size=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    two = subprocess.run([*torchrun, "-m", "preftune.cli", "train", *common, "per_device_train_batch_size=2",
                          f"output_dir={tmp_path / 'two'}"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr
    one = subprocess.run([sys.executable, "-m", "preftune.cli", "train", *common, "per_device_train_batch_size=4",
                          f"output_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    start = default_model(tok, seed=0).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)

    def evaluation(run: str) -> dict[str, float]:
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in records if "eval_loss" in r)

    one_eval, two_eval = evaluation("one"), evaluation("two")
    assert one_eval.keys() == two_eval.keys()
    for name in one_eval.keys() - {"eval_runtime", "eval_samples_per_second"}:  # wall-clock figures
        assert two_eval[name] == pytest.approx(one_eval[name], abs=1e-5), name
