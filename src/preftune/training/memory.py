"""What a run holds in memory, per role: each model's weights, gradients and optimizer state, in bytes.

DPO's argument against RLHF is partly this count: PPO holds a policy, a reference, a reward model and a value model
(two of them trained: gradients and optimizer state for both), DPO a policy and a reference — or only the policy,
when the reference's log-probs are precomputed. :func:`account` states it for a run, from the tensors themselves:

* ``weights`` — Σ numel × element size over the role's parameters (a parameter shared with an earlier role, e.g.
  the policy's trunk under a shared value head, is counted once, under the first);
* ``gradients`` — what backward allocates for its trainable parameters (one tensor like each; under
  ``optimizer_in_backward`` each is freed as soon as its parameter has stepped, so at most the largest);
* ``optimizer`` — the optimizer's state tensors for those parameters, measured once the first step has made them,
  or before it what they will be: AdamW keeps two tensors like each parameter (and a step count), RMSprop one
  (more with momentum or ``centered``);
* ``other`` — bytes that are not parameters (the precomputed reference log-probs of the dataset).

Each role has a ``kind``: ``model`` (a network of its own; ``models_held`` counts these), ``head`` (a few weights on
another role's body), ``shared`` (the policy itself, e.g. with LoRA adapters off), ``cache``, ``function`` (a judge
that is not a torch model), ``none``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from preftune.modeling.reference import AdaptersOffReference, ModelReference, NoReference, PrecomputedReference
from preftune.training.optim import OptimizerInBackward

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _expected_state_bytes(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> int:
    """Optimizer state a parameter will hold after the first step (its own dtype; step counts as fp32 scalars)."""
    group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
    if group is None:
        return 0
    if isinstance(optimizer, torch.optim.RMSprop):
        tensors = 1 + (group.get("momentum", 0) > 0) + bool(group.get("centered", False))
        return tensors * _nbytes(p) + 4
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return (2 + bool(group.get("amsgrad", False))) * _nbytes(p) + 4
    return 0


def _state_bytes(optimizer: torch.optim.Optimizer | None, p: nn.Parameter) -> int:
    if optimizer is None or not p.requires_grad:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    if isinstance(inner, OptimizerInBackward):
        inner = inner.part_of(p)
    state = inner.state.get(p)
    if state:
        return sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return _expected_state_bytes(inner, p)


def model_bytes(model: nn.Module | None, optimizer: torch.optim.Optimizer | None = None, *,
                seen: set[int] | None = None, kind: str = "model", what: str = "") -> dict:
    """The role of ``model``: parameter counts and bytes of weights, gradients and optimizer state (see the module
    docstring). ``seen`` holds ids of parameters already counted under another role; this role's are added."""
    seen = set() if seen is None else seen
    params = []
    for p in (model.parameters() if model is not None else ()):
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    trainable = [p for p in params if p.requires_grad]
    gradients = [_nbytes(p) for p in trainable]
    in_backward = isinstance(getattr(optimizer, "optimizer", optimizer), OptimizerInBackward)
    return {"kind": kind, "what": what, "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "weights": sum(_nbytes(p) for p in params),
            "gradients": max(gradients, default=0) if in_backward else sum(gradients),
            "optimizer": sum(_state_bytes(optimizer, p) for p in trainable), "other": 0}


def other_bytes(kind: str, what: str, nbytes: int = 0) -> dict:
    """A role that holds no parameters of its own: a cache of ``nbytes``, a function, the policy itself, nothing."""
    return {"kind": kind, "what": what, "parameters": 0, "trainable_parameters": 0, "weights": 0, "gradients": 0,
            "optimizer": 0, "other": nbytes}


def reference_bytes(reference, datasets: Iterable = (), seen: set[int] | None = None) -> dict:
    """The reference role of a run of the driver: a model of its own (a frozen copy, a checkpoint), the policy
    with adapters off, the precomputed log-prob columns of its datasets (as Arrow holds them), or none."""
    if isinstance(reference, ModelReference):
        return model_bytes(reference.module.model, seen=seen, what=f"reference ({reference.name})")
    if isinstance(reference, AdaptersOffReference):
        return other_bytes("shared", "the policy with its adapters off")
    if isinstance(reference, PrecomputedReference):
        cached = sum(data.data.column(c).nbytes for data in datasets if data is not None
                     for c in REFERENCE_COLUMNS if c in data.column_names)
        return other_bytes("cache", "precomputed reference log-probs", cached)
    if isinstance(reference, NoReference):
        return other_bytes("none", "no reference")
    return other_bytes("none", type(reference).__name__)


def one_loop(policy: nn.Module, optimizer: torch.optim.Optimizer, reference, datasets: Iterable = ()) -> dict:
    """The memory report of a run of the driver: the policy (with its gradients and optimizer state) and its
    reference (a model, the policy with adapters off, a precomputed cache, or none)."""
    seen: set[int] = set()
    return account({"policy": model_bytes(policy, optimizer, seen=seen, what="policy (trained)"),
                    "reference": reference_bytes(reference, datasets, seen)})


def account(roles: dict[str, dict]) -> dict:
    """The run's memory report: the roles, ``models_held`` (roles of kind ``model``), and totals in bytes."""
    fields = ("weights", "gradients", "optimizer", "other")
    totals = {f: sum(r[f] for r in roles.values()) for f in fields}
    return {"models_held": sum(r["kind"] == "model" for r in roles.values()), "roles": roles,
            "total": {**totals, "all": sum(totals.values())}}


def describe(report: dict) -> str:
    """One log line: each role's weights + gradients + optimizer state in MiB."""
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    parts = []
    for name, r in report["roles"].items():
        if r["kind"] in ("model", "head"):
            parts.append(f"{name} {mib(r['weights'])}+{mib(r['gradients'])}+{mib(r['optimizer'])}")
        else:
            parts.append(f"{name}: {r['what']}" + (f" {mib(r['other'])}" if r["other"] else ""))
    return (f"{report['models_held']} model(s) in memory, MiB of weights+gradients+optimizer state: "
            f"{'; '.join(parts)}; total {mib(report['total']['all'])}")
