"""Facts about the up-front model checks: a path is a folder or a Hub name, and a reference reads the policy's
vocabulary; each refusal names what to change."""

from __future__ import annotations

import pytest

from preftune.errors import ModelError
from preftune.modeling.loading import check_model_path, check_same_vocabulary, vocabulary_size
from preftune.modeling.tiny import build_tiny_model, build_tokenizer

TEXTS = ["the film was good", "the film was bad", "a fine day", "a dull day"]


def test_a_model_path_is_a_folder_or_a_hub_name(tmp_path):
    check_model_path("model_name_or_path", str(tmp_path))
    check_model_path("model_name_or_path", "Qwen/Qwen2.5-0.5B")
    with pytest.raises(ModelError, match=r"^model_name_or_path './x/y/z' is not a folder and not a Hub name"):
        check_model_path("model_name_or_path", "./x/y/z")


def test_a_reference_over_another_vocabulary_is_refused():
    tokenizer = build_tokenizer(TEXTS)
    policy, same, other = (build_tiny_model(tokenizer, seed=seed) for seed in range(3))
    other.resize_token_embeddings(len(tokenizer) + 8)  # another tokenizer's vocabulary
    assert vocabulary_size(policy) == len(tokenizer) == vocabulary_size(other) - 8
    check_same_vocabulary(policy, same)
    with pytest.raises(ModelError, match=f"vocabulary has {vocabulary_size(other)} entries, the policy's "
                                         f"{vocabulary_size(policy)}"):
        check_same_vocabulary(policy, other)
