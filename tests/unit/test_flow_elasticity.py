"""Elasticity expressions and aggregates, policy adjustments and schedules
(services/flow/elasticity.py)."""
from datetime import datetime, timezone

import pytest

from cirrus.errors import InvalidArgument
from services.flow.elasticity import (adjusted_cardinality, compile_expression,
                                      next_recurrence, schedule_problem, vm_attributes)

VMS = [{"CPU": "90", "MEM": "10", "ROLE": "db"}, {"CPU": "50", "MEM": "30"},
       {"CPU": "70", "ROLE": "web"}]


@pytest.mark.parametrize("text, expected", [
    ("CPU > 69", True),             # a bare attribute is the average: 70
    ("CPU > 70", False),
    ("AVG(CPU) >= 70", True),
    ("MIN(CPU) < 55", True),
    ("MAX(CPU) = 90", True),
    ("MAX(CPU) != 90", False),
    ("MEM == 20", True),            # the average of the VMs that have it
    ("ANY(CPU > 85)", True),
    ("ALL(CPU > 45)", True),
    ("ALL(CPU > 55)", False),
    ("ANY(ROLE = \"web\")", True),
    ("CPU > 60 & MEM < 25", True),
    ("CPU > 80 && MEM < 25", False),
    ("CPU > 80 | MEM < 25", True),
    ("CPU > 80 || MEM > 25", False),
    ("!(CPU > 80)", True),
    ("(CPU > 80 | MEM < 25) & MIN(CPU) > 40", True),
])
def test_expressions_over_the_running_vms(text, expected):
    assert compile_expression(text).evaluate(VMS) is expected


@pytest.mark.parametrize("text", ["NOPE > 1", "NOPE < 1", "!(NOPE > 1)", "MIN(NOPE) < 5",
                                  "ANY(NOPE > 1)", "ALL(NOPE > 1)", "NOPE > 1 & CPU > 1"])
def test_an_attribute_no_vm_has_makes_the_expression_false(text):
    assert compile_expression(text).evaluate(VMS) is False


def test_no_running_vm_makes_it_false():
    assert compile_expression("CPU < 100").evaluate([]) is False


@pytest.mark.parametrize("text, message", [
    ("", "the expression is empty"),
    ("CPU >", "expected a number, a \"string\" or an attribute at column 6, found the end"),
    ("CPU 80", "expected a comparison (> < >= <= = !=) at column 5"),
    ("(CPU > 1", "expected ')' at column 9, found the end"),
    ("CPU > 1 ^ 2", "unexpected '^ 2' at column 9"),
])
def test_a_bad_expression_says_where(text, message):
    with pytest.raises(InvalidArgument) as err:
        compile_expression(text)
    assert message in str(err.value)


def test_attributes_are_the_user_template_then_monitoring_then_the_template():
    attrs = vm_attributes({"LOAD": "9"}, {"LOAD": "5", "CPU": 30}, {"CPU": "1", "X": "t",
                                                                   "DISK": [{"SIZE": "1"}]})
    assert attrs == {"LOAD": "9", "CPU": 30, "X": "t"}


@pytest.mark.parametrize("policy, cardinality, expected", [
    ({"type": "CHANGE", "adjust": 2}, 3, 5),
    ({"type": "CHANGE", "adjust": -5}, 3, 1),                      # min_vms 1
    ({"type": "CARDINALITY", "adjust": 9}, 3, 6),                  # max_vms 6
    ({"type": "PERCENTAGE_CHANGE", "adjust": 50}, 4, 6),
    ({"type": "PERCENTAGE_CHANGE", "adjust": 10}, 4, 4),           # 0.4 -> 0
    ({"type": "PERCENTAGE_CHANGE", "adjust": 10, "min_adjust_step": 2}, 2, 4),
    ({"type": "PERCENTAGE_CHANGE", "adjust": -10, "min_adjust_step": 1}, 3, 2),
])
def test_adjustments_stay_within_min_and_max(policy, cardinality, expected):
    assert adjusted_cardinality(policy, cardinality, 1, 6) == expected


def test_schedules():
    assert schedule_problem({"recurrence": "0 9 * * mon-fri"}) is None
    assert "not a cron expression" in schedule_problem({"recurrence": "9am"})
    assert schedule_problem({"start_time": "2026-12-24T18:00:00Z"}) is None
    assert schedule_problem({"start_time": 1700000000}) is None
    assert "not a time" in schedule_problem({"start_time": "Christmas"})
    after = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)     # a Monday
    assert next_recurrence("0 9 * * mon-fri", after) == datetime(2026, 1, 6, 9, 0,
                                                                 tzinfo=timezone.utc)
