"""Evaluation mode for the length of a block: sampling, judging and scoring a model in the middle of training leave it
in the mode they found it in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in evaluation mode (dropout off) inside the block; on the way out, an exception included, each
    module and each of its submodules gets back its own earlier mode.

    Each module is switched back through its own ``train()`` (transformers' models do more there than set flags), and
    then every submodule's flag is set as it was: ``module.train(was_training)`` alone would also switch on a part
    deliberately left in evaluation mode (a frozen submodule of a model in training). The same module may be given
    twice (a policy that is its own reference)."""
    before = [[(sub, sub.training) for sub in module.modules()] for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, modes in zip(modules, before):
            module.train(modes[0][1])  # modules() starts with the module itself
            for sub, training in modes:
                sub.training = training
