"""Facts about ``eval_mode``: inside the block every module is in evaluation mode; afterwards, an exception included,
each module and each submodule is in the mode it was in before."""

from __future__ import annotations

import pytest
from torch import nn

from preftune.modeling.modes import eval_mode


def modes(module: nn.Module) -> list[bool]:
    return [sub.training for sub in module.modules()]


def model(training: bool) -> nn.Module:
    """Six modules: the outer Sequential, Linear, Dropout, and an inner Sequential with its Linear and Dropout."""
    inner = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    return nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), inner).train(training)


def test_every_module_is_in_eval_mode_inside_and_back_in_its_own_mode_after():
    training, evaluating = model(True), model(False)
    with eval_mode(training, evaluating):
        assert modes(training) == modes(evaluating) == [False] * 6
    assert modes(training) == [True] * 6
    assert modes(evaluating) == [False] * 6


def test_modes_come_back_after_an_exception():
    training, evaluating = model(True), model(False)
    with pytest.raises(RuntimeError, match="inside"), eval_mode(training, evaluating):
        raise RuntimeError("inside")
    assert modes(training) == [True] * 6
    assert modes(evaluating) == [False] * 6


def test_a_submodule_left_in_eval_mode_stays_there_and_one_module_given_twice_comes_back_once():
    policy = model(True)
    policy[2].eval()  # a frozen part of a model in training
    before = modes(policy)
    assert before == [True, True, True, False, False, False]
    with eval_mode(policy, policy):
        assert modes(policy) == [False] * 6
    assert modes(policy) == before
