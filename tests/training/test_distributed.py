"""Two CPU processes (torchrun, gloo) give the same weights and the same evaluation as one process with the same
global batch, offline and online (where each prompt's samples are seeded by its row, not by its process); a launcher
that asked for two processes and started one says so."""

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


def _user_files(tmp_path, rows: list[dict]):
    """A user's model folder (the embedded tiny Llama, seed 0, with its tokenizer) and preference file, on disk."""
    tok = default_tokenizer(rows)
    default_model(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tok, data


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, precompute):
    rows = builtin_preferences(32, seed=3)
    tok, data = _user_files(tmp_path, rows)
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


JUDGE = """
def score(prompts, completions):
    return [float(len(c) % 7) + c.count("e") / 4 for c in completions]
"""


@pytest.mark.parametrize("method", ["grpo", "online_dpo"])
def test_two_processes_sample_and_train_online_as_one_with_the_same_global_batch(tmp_path, method):
    """Each prompt draws its samples from a generator seeded by (seed, epoch, its row): 2 processes × 2 prompts sample
    what 1 process × 4 prompts does, so the logged rewards per step and the final weights agree."""
    rows = builtin_preferences(16, seed=3)
    tok, data = _user_files(tmp_path, rows)
    (tmp_path / "judge.py").write_text(JUDGE)
    common = [f"method={method}", f"model_name_or_path={tmp_path / 'model'}", f"dataset={data}", "max_steps=3",
              f"judge={tmp_path / 'judge.py'}:score", "max_completion_length=8", "learning_rate=1e-2",
              "adam_epsilon=1", "logging_steps=1", "disable_tqdm=true", f"cache_dir={tmp_path / 'cache'}", "bf16=false",
              *(["num_generations=4"] if method == "grpo" else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    two = subprocess.run([*torchrun, "-m", "preftune.cli", "train", *common, "per_device_train_batch_size=2",
                          f"output_dir={tmp_path / 'two'}"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr and "asked for several processes" not in two.stderr
    one = subprocess.run([sys.executable, "-m", "preftune.cli", "train", *common, "per_device_train_batch_size=4",
                          f"output_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "reward" in r]

    one_log, two_log = logged("one"), logged("two")
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == [1, 2, 3]
    for name in ("reward", "completions/mean_length", "loss"):
        assert [r[name] for r in two_log] == pytest.approx([r[name] for r in one_log], abs=1e-5), name
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    start = default_model(tok, seed=0).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_a_launcher_that_asked_for_two_processes_and_started_one_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts the script once (Accelerate's simple launcher runs several
    CPU processes only through MPI): the run trains on 1 process, and its log says so and names what starts 2."""
    rows = builtin_preferences(8, seed=3)
    tok, data = _user_files(tmp_path, rows)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              free_port()]
    run = subprocess.run([*launch, "-m", "preftune.cli", "train", f"model_name_or_path={tmp_path / 'model'}",
                          f"dataset={data}", "max_steps=1", "per_device_train_batch_size=4", "disable_tqdm=true",
                          "bf16=false", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| 1 processes |" in run.stderr
    assert ("accelerate launch asked for several processes but started 1 (MASTER_ADDR is set, WORLD_SIZE is not)"
            in run.stderr)
    assert "`accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N" in run.stderr


def test_optimizer_in_backward_is_refused_on_two_processes(tmp_path):
    """A step inside backward would use a gradient DDP has not reduced yet: two processes stop before loading
    anything, with the reason and the exit code of a config error."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    run = subprocess.run([*torchrun, "-m", "preftune.cli", "train", "optimizer_in_backward=true", "max_steps=1",
                          "bf16=false", "disable_tqdm=true", f"output_dir={tmp_path / 'run'}"],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "before DDP, FSDP or DeepSpeed has reduced its gradient over the 2 processes" in run.stderr
    assert not (tmp_path / "run").exists()
