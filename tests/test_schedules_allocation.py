"""Argument checks of the schedule and allocation functions (through lightning_fedprune.validation).

Every message names the argument and shows the bad value (with its type where the type is wrong), so
a YAML typo that reaches these pure functions is as clear as one caught by a callback's constructor.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.pruning import (
    adaptive_allocation,
    layer_importance,
    sparsity_at,
    uniform_allocation,
    validate_schedule,
)

SCHEDULE = dict(target=0.5, start_round=10, end_round=20, schedule="linear", power=3.0, num_steps=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="exp"), "`schedule` must be one of ('one_shot', 'linear', 'cubic', 'step'), got 'exp'."),
    (dict(target="0.5"), "`target` must be a number in [0, 1), got '0.5' (a str)."),
    (dict(target=math.nan), "`target` must be a number in [0, 1), got nan."),
    (dict(target=True), "`target` must be a number in [0, 1), got True (a bool)."),
    (dict(start_round=1.5), "`start_round` must be an integer >= 0, got 1.5."),
    (dict(end_round=5), "`end_round` must be an integer >= `start_round` (10), got 5."),
    (dict(end_round="20"), "`end_round` must be an integer >= 0, got '20' (a str)."),
    (dict(power=math.inf), "`power` must be a finite number > 0, got inf."),
    (dict(num_steps=True), "`num_steps` must be a positive integer, got True (a bool)."),
    (dict(num_steps=0), "`num_steps` must be a positive integer, got 0."),
])
def test_schedule_messages_name_the_argument_and_show_the_value(kwargs, message):
    args = {**SCHEDULE, **kwargs}
    for call in (lambda: validate_schedule(**args), lambda: sparsity_at(12, **args)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def test_round_message():
    with pytest.raises(ValueError, match=r"^`round` must be an integer >= 0, got 2\.5\.$"):
        sparsity_at(2.5, **SCHEDULE)
    assert sparsity_at(15, **SCHEDULE) == 0.25  # a valid call still computes the schedule


ALLOCATION = dict(importance={"a": 1.0, "b": 2.0}, sizes={"a": 3, "b": 4}, target=0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=[3, 4]), "`sizes` must be a mapping name -> parameter count, got [3, 4] (a list)."),
    (dict(sizes={"a": 3, "b": 2.5}), "`sizes['b']` must be a positive integer, got 2.5."),
    (dict(sizes={"a": 3, "b": True}), "`sizes['b']` must be a positive integer, got True (a bool)."),
    (dict(importance=(1.0, 2.0)), "`importance` must be a mapping name -> float, got (1.0, 2.0) (a tuple)."),
    (dict(importance={"a": 1.0, "b": "x"}), "`importance['b']` must be a finite number, got 'x' (a str)."),
    (dict(importance={"a": 1.0, "b": torch.tensor(math.inf)}), "`importance['b']` must be a finite number, got inf."),
    (dict(target="0.5"), "`target` must be a number in [0, 1), got '0.5' (a str)."),
    (dict(max_layer_sparsity=1.5), "`max_layer_sparsity` must be a number in [0, 1], got 1.5."),
    (dict(temperature=True), "`temperature` must be a finite number >= 0, got True (a bool)."),
    (dict(temperature=-1.0), "`temperature` must be a finite number >= 0, got -1.0."),
])
def test_allocation_messages_name_the_argument_and_show_the_value(kwargs, message):
    with pytest.raises(ValueError) as info:
        adaptive_allocation(**{**ALLOCATION, **kwargs})
    assert str(info.value) == message


def test_uniform_allocation_checks_like_adaptive():
    with pytest.raises(ValueError, match=r"^`target` must be a number in \[0, 1\), got 1\.0\.$"):
        uniform_allocation({"a": 3}, 1.0)
    with pytest.raises(ValueError, match=r"^`sizes\['a'\]` must be a positive integer, got 0\.$"):
        uniform_allocation({"a": 0}, 0.5)
    assert uniform_allocation({"a": 3, "b": 4}, 0.25) == {"a": 0.25, "b": 0.25}


def test_integer_like_arguments_are_normalised():
    # an int target / temperature is accepted and gives the same allocation as the float
    as_int = adaptive_allocation({"a": 1.0, "b": 2.0}, {"a": 3, "b": 4}, 0, temperature=1)
    assert as_int == adaptive_allocation({"a": 1.0, "b": 2.0}, {"a": 3, "b": 4}, 0.0, temperature=1.0)
    assert all(isinstance(v, float) for v in as_int.values())


def test_layer_importance_messages():
    with pytest.raises(ValueError, match=r"^`scores` must be a torch\.Tensor, got \[1\.0\] \(a list\)\.$"):
        layer_importance([1.0])
    with pytest.raises(ValueError, match=r"^`normalize` must be one of \('fan_in', 'none'\), got 'fan_out'\.$"):
        layer_importance(torch.ones(2, 2), normalize="fan_out")
