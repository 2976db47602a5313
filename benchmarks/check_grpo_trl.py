"""preftune's GRPO and GSPO losses against TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same tensors.

A generation batch is sampled, judged and turned into experience by preftune (``steps_per_generation`` 4,
``num_iterations`` 2, so π_old is the sampler's), the policy is then moved, and every micro-batch's loss and
gradient are computed twice: by preftune's driver path (:func:`preftune.training.objective.batch_loss`) and by
TRL's method itself, called on a stand-in trainer whose per-token log-probs are the same tensors (in TRL's
right-padded ``[B, T]`` layout). Needs the ``bench`` extra (``trl==1.16.0``) in its own venv::

    .venv-bench/bin/python benchmarks/check_grpo_trl.py
"""

from __future__ import annotations

import platform
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer

from preftune import PreferenceTrainer
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.modeling.logprobs import model_inputs
from preftune.modeling.reference import ModelReference
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.objective import LossSpec, batch_loss
from preftune.training.tracking import MetricWindow

ROWS = builtin_preferences(32, seed=7)


def padded(flat: torch.Tensor, seq_tokens: torch.Tensor) -> torch.Tensor:
    out = flat.new_zeros(len(seq_tokens), int(seq_tokens.max()))
    for i, (start, n) in enumerate(zip((torch.cumsum(seq_tokens, 0) - seq_tokens).tolist(), seq_tokens.tolist())):
        out[i, :n] = flat[start : start + n]
    return out


class Accelerator:  # what _compute_loss asks of TRL's accelerator, one process
    num_processes, sync_gradients = 1, True

    def gather(self, t):
        return t.reshape(-1) if t.dim() == 0 else t

    def reduce(self, t, reduction="sum"):
        return t

    gather_for_metrics = gather


def trl_trainer(cfg, loss_type: str, level: str, logps: torch.Tensor, steps_per_generation: int):
    """A stand-in GRPOTrainer with the attributes ``_compute_loss`` reads; its log-probs are ``logps``."""
    self = object.__new__(GRPOTrainer)
    self.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=cfg.beta,
        loss_type=loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=cfg.gradient_accumulation_steps, accelerator=Accelerator(),
        max_completion_length=cfg.max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=steps_per_generation))
    self._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return self


def compare(tok, method: str, loss_type: str, beta: float) -> tuple[float, float]:
    """Largest relative difference of the loss and of the gradient over the 4 micro-batches of a generation batch."""
    keys = dict(method=method, output_dir="/tmp/check-grpo-trl", num_generations=4, per_device_train_batch_size=1,
                steps_per_generation=4, num_iterations=2, temperature=0.7, max_completion_length=6, seed=0,
                bf16=False, beta=beta, epsilon=0.05, epsilon_high=0.08, scale_rewards="group")
    if method == "grpo":
        keys["grpo_loss_type"] = loss_type
    trainer = PreferenceTrainer(build_config(keys), model=build_tiny_model(tok, seed=2).double(), tokenizer=tok,
                                train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
                                judge=lambda p, c: [float(len(x) % 7) for x in c])
    session = trainer._prepare()
    rows = [{"prompt": r["prompt"], "prompt_ids": tok(r["prompt"])["input_ids"], "source_row": i}
            for i, r in enumerate(ROWS[:4])]
    with torch.no_grad():
        batches, _ = trainer.algorithm.generation_batch(iter([[r] for r in rows]), 0, MetricWindow())
        for p in session.policy.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    reference = ModelReference(build_tiny_model(tok, seed=3).double().eval(), 1024, "other")
    spec, params = LossSpec.from_config(trainer.cfg), [p for p in session.policy.parameters() if p.requires_grad]
    num_items = torch.tensor(float(sum(int(b["seq_tokens"].sum()) for b in batches)), dtype=torch.float64)
    worst_loss = worst_grad = 0.0
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != "ref_token_logps"}
        ours = batch_loss(session.policy, reference, batch, spec, MetricWindow())
        out = session.policy(**model_inputs(batch))
        n = batch["seq_tokens"]
        with torch.no_grad():
            ref = reference.outputs(batch)["token_logps"]
        rewards = batch["rewards"].view(-1, 4)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        mask = padded(torch.ones_like(out["token_logps"]), n)
        inputs = {"prompt_ids": torch.zeros(len(n), 1, dtype=torch.long), "prompt_mask": torch.ones(len(n), 1),
                  "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
                  "advantages": advantages.double(), "old_per_token_logps": padded(batch["old_token_logps"], n),
                  "ref_per_token_logps": padded(ref, n), "num_items_in_batch": num_items}
        level = "sequence" if method == "gspo" else "token"
        theirs = GRPOTrainer._compute_loss(trl_trainer(trainer.cfg, loss_type, level, padded(out["token_logps"], n),
                                                       4), None, inputs)
        worst_loss = max(worst_loss, abs((ours - theirs) / theirs).item())
        for mine, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
            worst_grad = max(worst_grad, ((mine - want).norm() / want.norm().clamp(min=1e-30)).item())
    return worst_loss, worst_grad


def main() -> int:
    tok = default_tokenizer(ROWS)
    print(f"# GRPO / GSPO against TRL 1.16 _compute_loss ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}); float64, π_old ≠ π, steps_per_generation 4, num_iterations 2, T = 0.7\n")
    print("| method | loss_type | β | max rel. diff, loss | max rel. diff, gradient (norm) |\n|---|---|---|---|---|")
    worst = 0.0
    for method, loss_type in (("grpo", "dapo"), ("grpo", "grpo"), ("grpo", "dr_grpo"), ("gspo", "grpo")):
        for beta in (0.0, 0.3):
            loss, grad = compare(tok, method, loss_type, beta)
            worst = max(worst, loss, grad)
            print(f"| {method} | {loss_type} | {beta} | {loss:.1e} | {grad:.1e} |")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
