"""The OneFlow service and role state table (services/flow/states.py)."""
import pytest

from services.flow.states import (ALL_STATES, ROLE_TRANSITIONS, SERVICE_TRANSITIONS,
                                  FlowTransitionError, allowed_sources, allows, next_state,
                                  service_action)


def test_the_states_are_opennebulas():
    assert set(ALL_STATES) == set(
        "PENDING DEPLOYING RUNNING UNDEPLOYING WARNING DONE FAILED_UNDEPLOYING FAILED_DEPLOYING "
        "SCALING FAILED_SCALING COOLDOWN DEPLOYING_NETS UNDEPLOYING_NETS FAILED_DEPLOYING_NETS "
        "FAILED_UNDEPLOYING_NETS HOLD".split())


@pytest.mark.parametrize("kind", ["role", "service"])
def test_the_deploy_scale_and_undeploy_paths(kind):
    path = [("deploy", "DEPLOYING"), ("deployed", "RUNNING"), ("warning", "WARNING"),
            ("recovered", "RUNNING"), ("scale", "SCALING"), ("scaled", "COOLDOWN"),
            ("cooled", "RUNNING"), ("undeploy", "UNDEPLOYING"), ("undeployed", "DONE")]
    state = "PENDING"
    for action, target in path:
        state = next_state(kind, state, action)
        assert state == target, action


@pytest.mark.parametrize("failed, back", [("FAILED_DEPLOYING", "DEPLOYING"),
                                          ("FAILED_SCALING", "SCALING"),
                                          ("FAILED_UNDEPLOYING", "UNDEPLOYING")])
def test_recover_goes_back_to_the_step_that_failed(failed, back):
    assert next_state("service", failed, "recover") == back
    assert next_state("role", failed, "recover") == back


def test_an_action_the_state_refuses_names_where_it_may_start():
    with pytest.raises(FlowTransitionError) as err:
        next_state("service", "DONE", "scale")
    assert str(err.value) == ("cannot scale a service in DONE; it must be in one of: "
                              "COOLDOWN, RUNNING, WARNING")
    assert not allows("service", "UNDEPLOYING", "undeploy")
    assert not allows("role", "DONE", "undeploy")
    # a held role is released, or undeployed, nothing else
    assert {t.action for t in ROLE_TRANSITIONS if "HOLD" in t.sources} == {"release", "undeploy"}


def test_no_transition_enters_the_network_states():
    for table in (ROLE_TRANSITIONS, SERVICE_TRANSITIONS):
        assert not [t for t in table if t.target.endswith("_NETS")]


@pytest.mark.parametrize("service, roles, action", [
    ("PENDING", ["PENDING", "PENDING"], "deploy"),
    ("DEPLOYING", ["RUNNING", "DEPLOYING"], None),
    ("DEPLOYING", ["RUNNING", "WARNING"], "deployed"),
    ("DEPLOYING", ["RUNNING", "FAILED_DEPLOYING"], "deploy_failure"),
    ("DEPLOYING", ["HOLD", "PENDING"], "hold"),
    ("HOLD", ["DEPLOYING", "PENDING"], "release"),
    ("RUNNING", ["RUNNING", "WARNING"], "warning"),
    ("WARNING", ["RUNNING", "RUNNING"], "recovered"),
    ("RUNNING", ["SCALING", "WARNING"], "scale"),
    ("SCALING", ["COOLDOWN", "RUNNING"], "scaled"),
    ("SCALING", ["FAILED_SCALING", "SCALING"], "scale_failure"),
    ("COOLDOWN", ["RUNNING"], "cooled"),
    ("UNDEPLOYING", ["DONE", "UNDEPLOYING"], None),
    ("UNDEPLOYING", ["DONE", "DONE"], "undeployed"),
    ("UNDEPLOYING", ["DONE", "FAILED_UNDEPLOYING"], "undeploy_failure"),
    ("FAILED_DEPLOYING", ["FAILED_DEPLOYING"], None),
])
def test_the_service_follows_its_roles(service, roles, action):
    assert service_action(service, roles) == action
    if action:
        assert allows("service", service, action)


def test_a_role_is_added_only_to_a_deployed_service():
    assert allowed_sources("service", "add_role") == ["COOLDOWN", "RUNNING", "WARNING"]
    assert next_state("service", "WARNING", "add_role") == "DEPLOYING"
    # the new role PENDING keeps the service DEPLOYING until it runs
    assert service_action("DEPLOYING", ["RUNNING", "PENDING"]) is None
    assert service_action("DEPLOYING", ["RUNNING", "COOLDOWN", "RUNNING"]) == "deployed"
