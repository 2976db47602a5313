"""Shared fixtures: tiny tokenizers and models built locally (nothing is downloaded)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

CORPUS = [
    "The movie was good and the acting was great.",
    "I did not like the plot; it was slow and dull.",
    "What is the capital of France? Paris is the capital of France.",
    "Human: tell me a joke. Assistant: Why did the chicken cross the road?",
    "A terrible film with a wonderful score, not bad at all.",
] * 20


@pytest.fixture(autouse=True)
def _own_log_handlers():
    """``preftune.cli.main`` adds a handler on the stderr of its test (``logging.basicConfig``): later tests must
    not write to a closed stream."""
    before = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in before:
            logging.root.removeHandler(handler)


@pytest.fixture(scope="session")
def tokenizer():
    from preftune.modeling.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def tiny_model(tokenizer):
    """Factory: ``tiny_model(arch="llama", seed=0)`` gives a fresh random causal LM in eval mode."""
    from preftune.modeling.tiny import build_tiny_model

    def make(arch: str = "llama", seed: int = 0, **overrides):
        return build_tiny_model(tokenizer, arch=arch, seed=seed, **overrides).eval()

    return make
