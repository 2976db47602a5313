"""``optimizer_in_backward``: each parameter steps inside backward and its gradient is freed there. The update must
be the one the ordinary optimizer step takes (unclipped, no accumulation), through `preftune train` from YAML, with
the schedule reaching every parameter, across a resume, and refused where it cannot hold."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from preftune import PreferenceTrainer
from preftune.cli import main
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.optim import OptimizerInBackward

ROWS = builtin_preferences(24, seed=5)
# Warm-up then cosine decay: every step has its own learning rate, which must reach each parameter's optimizer.
SCHEDULE = "lr_scheduler_type: cosine\nwarmup_steps: 2\nlearning_rate: 1.0e-3\nweight_decay: 0.1\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("in_backward")
    tok = default_tokenizer(ROWS)
    build_tiny_model(tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _yaml(files, tmp_path, name: str, extra: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model_name_or_path: {files / 'sft'}\ndataset: {files / 'pairs.jsonl'}\nmethod: dpo\n"
                    f"max_steps: 5\nper_device_train_batch_size: 4\nbf16: false\ndisable_tqdm: true\nlogging_steps: 1\n"
                    f"cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / name}\n{SCHEDULE}{extra}")
    return str(path)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_update_equals_the_ordinary_step_from_yaml(files, tmp_path):
    """Same weights, losses, learning rates and logged gradient norms as the ordinary AdamW step with clipping out
    of reach (max_grad_norm 1e9), over 5 steps of a warm-up and cosine schedule with weight decay."""
    assert main(["train", _yaml(files, tmp_path, "ordinary", "max_grad_norm: 1.0e9\n")]) == 0
    assert main(["train", _yaml(files, tmp_path, "fused", "optimizer_in_backward: true\n")]) == 0
    ordinary, fused = _records(tmp_path / "ordinary"), _records(tmp_path / "fused")
    assert [r["learning_rate"] for r in fused] == [r["learning_rate"] for r in ordinary]
    assert len({r["learning_rate"] for r in fused}) == 5  # the schedule moved at every step
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in ordinary], rel=1e-5), key
    assert ordinary[-1]["grad_norm"] > 1  # a default max_grad_norm of 1.0 would have clipped: it is off here
    a = load_file(tmp_path / "ordinary" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fused" / "final" / "model.safetensors")
    moved = load_file(files / "sft" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(a[key], moved[key]) for key in a)  # it trained
    assert "optimizer_in_backward: true" in (tmp_path / "fused" / "config.yaml").read_text()


def test_no_gradient_outlives_its_parameters_step(files, tmp_path):
    """During backward, once a parameter has stepped no gradient of any trainable parameter is held (the one being
    summed next is the only one that exists); the memory report counts one gradient, the largest."""
    trainer = PreferenceTrainer(build_config(dict(
        model_name_or_path=str(files / "sft"), dataset=str(files / "pairs.jsonl"), method="dpo", max_steps=1,
        per_device_train_batch_size=4, bf16=False, disable_tqdm=True, optimizer_in_backward=True,
        cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"))))
    session = trainer._prepare()
    params = [p for p in session.model.parameters() if p.requires_grad]
    held, before = [], [p.detach().clone() for p in params]
    for p in params:  # registered after the optimizer's hooks: runs once each parameter has stepped
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    result = trainer.train()
    assert len(held) == len(params) and max(held) == 0
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every parameter stepped
    memory = json.loads((result.output_dir / "summary.json").read_text())["memory"]["roles"]["policy"]
    assert memory["gradients"] == max(p.numel() * p.element_size() for p in params)
    assert memory["optimizer"] == sum(2 * p.numel() * 4 + 4 for p in params)  # AdamW's m, v and step, measured
    assert isinstance(session.optimizer.optimizer, OptimizerInBackward)


def test_a_resumed_run_continues_the_per_parameter_states(files, tmp_path):
    """Checkpoint at step 2 and resume: the same final weights as the run that never stopped (AdamW's moments and
    step counts of every per-parameter optimizer come back)."""
    keys = "optimizer_in_backward: true\nsave_steps: 2\nsave_total_limit: 3\n"
    assert main(["train", _yaml(files, tmp_path, "whole", keys)]) == 0
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert main(["train", _yaml(files, tmp_path, "resumed", keys + "resume_from_checkpoint: true\n")]) == 0
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert [r["loss"] for r in _records(tmp_path / "resumed")][-2:] == \
        pytest.approx([r["loss"] for r in _records(tmp_path / "whole")][-2:], rel=1e-6)


@pytest.mark.parametrize("keys, message", [
    (dict(gradient_accumulation_steps=2), "there is no accumulation: set gradient_accumulation_steps: 1"),
    (dict(max_grad_norm=0.5), "the gradient is not clipped .* remove max_grad_norm: 0.5"),
    (dict(fp16=True), "fp16's loss scaler cannot unscale"),
])
def test_what_a_step_inside_backward_cannot_do_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dict(method="dpo", optimizer_in_backward=True, **keys))
    build_config(dict(method="dpo", **keys))  # each is fine without it
