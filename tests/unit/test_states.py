import pytest

from cirrus import states
from cirrus.states import TransitionError, next_transition, result_action, split, status


def test_status_names_lcm_state_only_while_active():
    assert status("ACTIVE", "RUNNING") == "RUNNING"
    assert status("PENDING", "LCM_INIT") == "PENDING"
    assert split("RUNNING") == (states.VmState.ACTIVE, states.LcmState.RUNNING)
    assert split("DONE") == (states.VmState.DONE, states.LcmState.LCM_INIT)
    with pytest.raises(ValueError, match="ACTIVE"):
        split("ACTIVE")


@pytest.mark.parametrize("name", states.ALL_STATUSES)
def test_every_status_round_trips_and_has_a_short_name(name):
    state, lcm = split(name)
    assert status(state, lcm) == name
    assert len(states.SHORT_NAMES[name]) == 4


def test_every_transition_uses_known_statuses():
    for tr in states.TRANSITIONS:
        split(tr.target)
        for src in tr.sources:
            split(src)


def test_the_deploy_path_and_its_commands():
    path = [("deploy", "PENDING"), ("prolog_success", "PROLOG"), ("boot_success", "BOOT")]
    commands = [next_transition(src, action).command for action, src in path]
    assert commands == ["clone", "deploy", None]
    assert next_transition("BOOT", "boot_success").target == "RUNNING"


def test_terminate_paths():
    assert next_transition("RUNNING", "terminate").command == "shutdown"
    assert next_transition("RUNNING", "terminate_hard").command == "cancel"
    assert next_transition("PENDING", "terminate").target == "DONE"
    assert next_transition("SHUTDOWN", "shutdown_success").target == "EPILOG"
    assert next_transition("SHUTDOWN", "shutdown_failure").target == "RUNNING"
    assert next_transition("EPILOG", "epilog_success").target == "DONE"
    assert next_transition("BOOT_FAILURE", "terminate").command == "delete"


def test_driver_failures_lead_to_failure_states():
    assert next_transition("PROLOG", result_action("PROLOG", False)).target == "PROLOG_FAILURE"
    assert next_transition("BOOT", result_action("BOOT", False)).target == "BOOT_FAILURE"
    assert next_transition("EPILOG", result_action("EPILOG", False)).target == "EPILOG_FAILURE"


def test_a_disallowed_action_names_the_current_and_needed_states():
    with pytest.raises(TransitionError) as err:
        next_transition("DONE", "terminate")
    message = str(err.value)
    assert "DONE" in message and "RUNNING" in message and "PENDING" in message
    assert err.value.allowed == states.allowed_sources("terminate")


def test_capacity_is_held_exactly_between_deploy_and_done():
    assert "PENDING" not in states.ON_HOST and "DONE" not in states.ON_HOST
    assert next_transition("PENDING", "deploy").target in states.ON_HOST
