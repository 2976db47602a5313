"""FSDP exercised: two CPU processes launched with ``accelerate launch --config_file examples/accelerate/fsdp.yaml``
(gloo) shard the model with PyTorch's FSDP2, train to the same weights and evaluation as one process with the same
global batch, write sharded checkpoints that resume to the same run, and export a full final/ model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import free_port  # same folder (pytest puts it on sys.path)
from transformers import AutoModelForCausalLM

from preftune import train
from preftune.config import load_config
from preftune.data.builtin import builtin_preferences
from preftune.modeling.tiny import default_model, default_tokenizer

FSDP_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    rows = builtin_preferences(32, seed=3)
    tok = default_tokenizer(rows)
    default_model(tok, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in builtin_preferences(12, seed=4)))
    # adam_epsilon=1: the update is proportional to the gradient, so reduce-scatter rounding stays tiny.
    common = [f"model_name_or_path={root / 'model'}", f"dataset={root / 'prefs.jsonl'}", "max_steps=4",
              "learning_rate=1e-2", "adam_epsilon=1", "disable_tqdm=true", f"cache_dir={root / 'cache'}",
              "bf16=false", f"eval_dataset={root / 'held_out.jsonl'}", "per_device_eval_batch_size=4"]
    return root, common


def launch_fsdp(root: Path, common: list[str], out: str, *extra: str) -> subprocess.CompletedProcess:
    # The shipped FSDP config, with the two settings a CPU run needs: 2 processes, no bf16 autocast.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", free_port(),
               "-m", "preftune.cli", "train", *common, "per_device_train_batch_size=2", f"output_dir={root / out}",
               *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def evaluation(run: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if "eval_loss" in r)


def test_fsdp_on_two_cpu_processes_equals_one_process(setup):
    root, common = setup
    two = launch_fsdp(root, common, "fsdp", "save_steps=2")
    assert "FSDP2 on 2 CPU processes" in two.stderr  # not silently plain data parallelism
    # Sharded checkpoints: Accelerate's FSDP writer, with the optimizer state gathered from the shards.
    assert (root / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp.bin").exists()
    train(load_config(None, [*common, "per_device_train_batch_size=4", f"output_dir={root / 'one'}"]))

    a, b = load_file(root / "one/final/model.safetensors"), load_file(root / "fsdp/final/model.safetensors")
    start = default_model(default_tokenizer(builtin_preferences(32, seed=3)), seed=0).state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for key in a:  # final/ holds the full (gathered) weights, equal to one process's
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    one_eval, two_eval = evaluation(root / "one"), evaluation(root / "fsdp")
    for name in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert two_eval[name] == pytest.approx(one_eval[name], abs=1e-5), name
    assert AutoModelForCausalLM.from_pretrained(root / "fsdp" / "final") is not None


def test_fsdp_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(setup):
    root, common = setup
    if not (root / "fsdp" / "checkpoint-2").exists():
        launch_fsdp(root, common, "fsdp", "save_steps=2")
    resumed = root / "fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(root / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    result = launch_fsdp(root, common, "fsdp-resumed", "save_steps=2", "resume_from_checkpoint=true")
    assert "resumed from" in result.stderr
    a, b = load_file(root / "fsdp/final/model.safetensors"), load_file(resumed / "final/model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.parametrize("values, match", [
    ({"use_peft": True, "save_merged_model": True}, "merge the adapter in final/"),
    ({"use_peft": True, "load_in_4bit": True}, "cannot be sharded"),
])
def test_what_fsdp_cannot_do_is_refused_before_anything_loads(values, match):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from preftune.config import TrainConfig
    from preftune.errors import ConfigError
    from preftune.training.setup import check_fsdp

    cfg = TrainConfig(**values)  # not validated: load_in_4bit would need bitsandbytes installed
    with pytest.raises(ConfigError, match=match):
        check_fsdp(cfg, SimpleNamespace(distributed_type=DistributedType.FSDP))
    check_fsdp(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP merges and quantizes
