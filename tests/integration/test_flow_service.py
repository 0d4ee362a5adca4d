"""The flow service as a process, with lifecycle, the scheduler and a
simulated node, on the real broker and database: services deploy in
dependency order on events, wait for READY, go WARNING and back, scale,
recover only what failed, and undeploy children first."""
import json
from pathlib import Path

import pytest
from nameko.exceptions import RemoteError

from services.drivers.worker import send_control
from tests.broker import rpc_proxy
from tests.procs import Proc, wait_until
from tests.scheduling import running, simulated_node

HOST = "flow-sim"
SMALL_VM = "CPU = 0.1\nMEMORY = 64\n"
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "flow_templates"


@pytest.fixture(scope="module")
def cluster(cirrus_env, tmp_path_factory, amqp_uri):
    logs = tmp_path_factory.mktemp("flow")
    for procs in running(cirrus_env, logs, ("lifecycle", "scheduler", "flow"),
                         CIRRUS_SCHEDULER_SWEEP_INTERVAL="2", CIRRUS_FLOW_CHECK_INTERVAL="1",
                         CIRRUS_FLOW_DEFAULT_COOLDOWN="0"):
        env = procs[0].env
        procs.append(simulated_node(env, logs, amqp_uri, HOST))
        yield {"env": env, "logs": logs, "procs": procs}


@pytest.fixture
def flow(cluster, amqp_uri):
    with rpc_proxy(amqp_uri, "flow") as proxy:
        yield proxy


@pytest.fixture
def lifecycle(cluster, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as proxy:
        yield proxy


def role(name, parents=(), cardinality=1, contents=SMALL_VM, **more):
    return {"name": name, "cardinality": cardinality, "parents": list(parents),
            "vm_template_contents": contents, **more}


def template(name, roles, **more):
    return {"name": name, "deployment": "straight", "roles": roles, **more}


def roles_of(flow, service_id):
    return {r["name"]: r for r in flow.get_service(service_id)["roles"]}


def wait_state(flow, service_id, state, timeout=30):
    def reached():
        service = flow.get_service(service_id)
        assert not (service["state"].startswith("FAILED") and not state.startswith("FAILED")), \
            service
        return service["state"] == state
    wait_until(reached, timeout, what=f"service {service_id} {state}")
    return flow.get_service(service_id)


def vm_ids(flow, service_id, role_name):
    return [n["vm_id"] for n in roles_of(flow, service_id)[role_name]["nodes"]]


def make_ready(lifecycle, ids):
    for vm_id in ids:
        lifecycle.update_vm_template(vm_id, {"READY": "YES"})


def test_a_diamond_deploys_parents_first_and_waits_for_ready(flow, lifecycle):
    body = template("diamond", [role("db"), role("left", ["db"]), role("right", ["db"]),
                                role("front", ["left", "right"], cardinality=2)],
                    ready_status_gate=True, custom_attrs={"DB_NAME": "M|text|database||"})
    made = flow.create_template(1, json.dumps(body))
    service = flow.instantiate(made["id"], 1, custom_attrs={"DB_NAME": "blog"})
    sid = service["id"]

    # db runs, but only READY counts: its children wait
    wait_until(lambda: [n["status"] for n in roles_of(flow, sid)["db"]["nodes"]] == ["RUNNING"],
               what="db's VM RUNNING")
    roles = roles_of(flow, sid)
    assert roles["db"]["state"] == "DEPLOYING"
    assert "not READY" in roles["db"]["message"]
    assert {roles[n]["state"] for n in ("left", "right", "front")} == {"PENDING"}
    [db_vm] = vm_ids(flow, sid, "db")
    context = lifecycle.get_vm(db_vm)["template"]["CONTEXT"]
    assert (context["SERVICE_ID"], context["ROLE_NAME"], context["DB_NAME"]) == \
        (str(sid), "db", "blog")

    make_ready(lifecycle, [db_vm])
    wait_until(lambda: all(roles_of(flow, sid)[n]["state"] == "DEPLOYING"
                           for n in ("left", "right")), what="left and right DEPLOYING")
    assert roles_of(flow, sid)["front"]["state"] == "PENDING"
    wait_until(lambda: len(vm_ids(flow, sid, "left")) == 1 and len(vm_ids(flow, sid, "right"))
               == 1, what="left and right VMs")
    make_ready(lifecycle, vm_ids(flow, sid, "left"))
    wait_until(lambda: roles_of(flow, sid)["left"]["state"] == "RUNNING", what="left RUNNING")
    # one parent of front is not running yet
    assert roles_of(flow, sid)["front"]["state"] == "PENDING"
    make_ready(lifecycle, vm_ids(flow, sid, "right"))
    wait_until(lambda: len(vm_ids(flow, sid, "front")) == 2, what="front's 2 VMs")
    make_ready(lifecycle, vm_ids(flow, sid, "front"))
    service = wait_state(flow, sid, "RUNNING")
    assert [r["state"] for r in service["roles"]] == ["RUNNING"] * 4
    assert all(n["ready"] for r in service["roles"] for n in r["nodes"])

    # undeploy: children first (front's VMs end before db's is asked to)
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")
    ended = {}
    for name, ids in (("front", service["roles"][3]["nodes"]), ("db", service["roles"][0]["nodes"])):
        for node in ids:
            history = lifecycle.get_vm(node["vm_id"])["history"]
            ended[(name, node["vm_id"])] = (
                next(h["at"] for h in history if h["action"] == "terminate"),
                history[-1]["at"], history[-1]["to"])
    db_asked = min(v[0] for k, v in ended.items() if k[0] == "db")
    front_done = max(v[1] for k, v in ended.items() if k[0] == "front")
    assert all(v[2] == "DONE" for v in ended.values())
    assert front_done <= db_asked


def test_mandatory_custom_attributes_and_networks_are_named_when_missing(flow):
    body = template("attrs", [role("only")], custom_attrs={
        "A": "M|text|first||", "B": "M|number|second||", "C": "O|text|third||x"},
        networks={"Public": "M|network|the public network||"})
    made = flow.create_template(1, body)
    with pytest.raises(RemoteError) as err:
        flow.instantiate(made["id"], 1, custom_attrs={"A": "1"}, networks={"Public": 1})
    assert err.value.exc_type == "InvalidArgument"
    assert "mandatory attribute(s) without a value: B" in err.value.value
    with pytest.raises(RemoteError) as err:
        flow.instantiate(made["id"], 1, custom_attrs={"A": "1", "B": "two"},
                         networks={"Public": 1})
    assert "custom_attrs/B: 'two' is not a number" in err.value.value
    with pytest.raises(RemoteError) as err:
        flow.instantiate(made["id"], 1, custom_attrs={"A": "1", "B": "2"})
    assert "mandatory network(s) without a value: Public" in err.value.value
    with pytest.raises(RemoteError) as err:
        flow.instantiate(made["id"], 1, custom_attrs={"A": "1", "B": "2"},
                         networks={"Public": 99999})
    assert "networks/Public: network 99999 does not exist" in err.value.value
    # nothing half-written
    assert not [s for s in flow.list_services() if s["name"] == "attrs"]


def test_a_bad_template_is_refused_naming_the_field(flow):
    bad = template("bad", [role("a"), role("b", ["nope"], cardinality=-1)])
    with pytest.raises(RemoteError) as err:
        flow.create_template(1, bad)
    assert err.value.exc_type == "InvalidArgument"
    assert "roles/1/cardinality: -1 is less than the minimum of 0" in err.value.value
    with pytest.raises(RemoteError) as err:
        flow.create_template(1, template("bad", [{"name": "a", "vm_template": 99999}]))
    assert "roles/0/vm_template: VM template 99999 does not exist" in err.value.value


def test_poweroff_behind_its_back_is_a_warning_and_running_again_recovers(flow, amqp_uri):
    made = flow.create_template(1, template("warn", [role("web")]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    [vm_id] = vm_ids(flow, sid, "web")

    def change(state):      # `cirrus-node simulate-change` on the simulated node
        answer = send_control(amqp_uri, HOST, {"what": "change", "vm_id": vm_id, "state": state})
        assert answer["ok"], answer
    change("POWEROFF")
    service = wait_state(flow, sid, "WARNING")
    assert roles_of(flow, sid)["web"]["state"] == "WARNING"
    assert f"VM {vm_id} POWEROFF" in roles_of(flow, sid)["web"]["message"]
    change("RUNNING")
    wait_state(flow, sid, "RUNNING")
    assert any("POWEROFF" in entry["message"] for entry in service["log"])
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_scale_respects_min_and_max_unless_forced_and_a_vm_ended_outside_is_replaced(
        flow, lifecycle):
    made = flow.create_template(1, template("scale", [role("web", min_vms=1, max_vms=3)]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    with pytest.raises(RemoteError) as err:
        flow.scale(sid, "web", 4)
    assert err.value.exc_type == "FailedPrecondition"
    assert "above max_vms 3" in err.value.value
    flow.scale(sid, "web", 2)
    wait_until(lambda: len(vm_ids(flow, sid, "web")) == 2
               and flow.get_service(sid)["state"] == "RUNNING", what="2 VMs RUNNING")
    flow.scale(sid, "web", 0, True)      # forced below min_vms
    # min_vms is a floor: the role scales itself back up
    wait_until(lambda: any("scale 0 -> 1 (cardinality 0 is below min_vms 1)" in e["message"]
                           for e in flow.get_service(sid)["log"])
               and len(vm_ids(flow, sid, "web")) == 1
               and flow.get_service(sid)["state"] == "RUNNING", what="back to min_vms")
    assert roles_of(flow, sid)["web"]["cardinality"] == 1

    # terminated outside the service: cardinality follows, then min_vms restores it
    [vm_id] = vm_ids(flow, sid, "web")
    lifecycle.vm_action(vm_id, "terminate", {"hard": True})
    wait_until(lambda: vm_ids(flow, sid, "web") and vm_ids(flow, sid, "web") != [vm_id]
               and flow.get_service(sid)["state"] == "RUNNING", what="a new VM")
    log = [e["message"] for e in flow.get_service(sid)["log"]]
    assert any(f"VM {vm_id} of role web was terminated outside the service" in m for m in log)
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_a_failed_deploy_is_failed_deploying_and_recover_retries_only_the_failed_vm(
        flow, lifecycle):
    failing = SMALL_VM + 'SIMULATE_FAIL = "deploy"\n'
    made = flow.create_template(1, template("fail", [
        role("good"), role("bad", ["good"], cardinality=2, contents=failing)]))
    sid = flow.instantiate(made["id"], 1)["id"]
    service = wait_state(flow, sid, "FAILED_DEPLOYING")
    roles = roles_of(flow, sid)
    assert (roles["good"]["state"], roles["bad"]["state"]) == ("RUNNING", "FAILED_DEPLOYING")
    assert "BOOT_FAILURE" in roles["bad"]["message"]
    assert "simulated deploy failure" in service["message"]
    [good_vm] = vm_ids(flow, sid, "good")
    good_seq = lifecycle.get_vm(good_vm)["seq"]
    flow.recover(sid)
    wait_state(flow, sid, "FAILED_DEPLOYING")
    for vm_id in vm_ids(flow, sid, "bad"):
        actions = [h["action"] for h in lifecycle.get_vm(vm_id)["history"]]
        assert actions.count("retry") == 1
    assert lifecycle.get_vm(good_vm)["seq"] == good_seq     # left alone
    with pytest.raises(RemoteError) as err:
        flow.release(sid)
    assert err.value.exc_type == "FailedPrecondition"
    flow.recover(sid, True)     # --delete
    wait_state(flow, sid, "DONE")
    assert all(lifecycle.get_vm(v)["status"] == "DONE" for v in [good_vm])


def test_on_hold_waits_for_release(flow, lifecycle):
    made = flow.create_template(1, template("held", [role("a"), role("b", ["a"])], on_hold=True))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "HOLD")
    [vm_id] = vm_ids(flow, sid, "a")
    assert lifecycle.get_vm(vm_id)["status"] == "HOLD"
    assert roles_of(flow, sid)["b"]["state"] == "PENDING"
    flow.release(sid)
    wait_state(flow, sid, "RUNNING")
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_an_opennebula_template_loads_unchanged(flow, lifecycle):
    vm_template = lifecycle.create_template(1, "flow-small", {"CPU": "0.1", "MEMORY": "64"})
    text = (FIXTURES / "opennebula_wordpress.json").read_text()
    body = json.loads(text.replace('"vm_template": 0', f'"vm_template": {vm_template["id"]}'))
    made = flow.create_template(1, body)
    assert made["body"] == body     # unknown keys kept
    assert flow.get_template(made["id"])["body"]["registration_time"] == body["registration_time"]


def test_kill_9_of_flow_during_a_straight_deploy_then_restart_reaches_running(
        flow, lifecycle, cluster):
    made = flow.create_template(1, template("crash", [role("master"), role("slave", ["master"])],
                                            ready_status_gate=True))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_until(lambda: [n["status"] for n in roles_of(flow, sid)["master"]["nodes"]]
               == ["RUNNING"], what="master RUNNING")
    flow_proc = next(p for p in cluster["procs"] if p.args[-1] == "flow")
    flow_proc.kill()
    # the READY arrives while flow is down
    make_ready(lifecycle, _nodes_from_db(sid, "master"))
    restarted = Proc(["cirrus-service", "flow"], cluster["env"],
                     cluster["logs"] / "flow-2.log").start()
    cluster["procs"].append(restarted)
    restarted.wait_for("flow started")
    wait_until(lambda: len(vm_ids(flow, sid, "slave")) == 1, what="slave's VM")
    make_ready(lifecycle, vm_ids(flow, sid, "slave"))
    wait_state(flow, sid, "RUNNING")
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def _nodes_from_db(service_id, role_name):
    """A role's VM ids read from the database (while flow is down)."""
    from sqlalchemy import select
    from cirrus import db
    from cirrus.db.models import FlowNode, FlowRole
    with db.session_factory()() as s:
        return s.scalars(select(FlowNode.vm_id).join(FlowRole, FlowRole.id == FlowNode.role_id)
                         .where(FlowRole.service_id == service_id,
                                FlowRole.name == role_name)).all()


def running_elastic(flow, name, policy, **role_more):
    """A RUNNING service of one role, web, with one elasticity policy."""
    made = flow.create_template(1, template(name, [
        role("web", min_vms=1, elasticity_policies=[policy], **role_more)]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    return sid


def test_an_elasticity_policy_scales_after_its_periods_hold(flow, lifecycle):
    policy = {"type": "CHANGE", "adjust": 1, "expression": "MAX(LOAD) > 5", "period": 1,
              "period_number": 2, "cooldown": 0}
    sid = running_elastic(flow, "elastic", policy, max_vms=2)
    [vm_id] = vm_ids(flow, sid, "web")
    lifecycle.update_vm_template(vm_id, {"LOAD": "9"})
    wait_until(lambda: len(vm_ids(flow, sid, "web")) == 2
               and flow.get_service(sid)["state"] == "RUNNING", what="scaled to 2")
    log = [e["message"] for e in flow.get_service(sid)["log"]]
    assert any("scale 1 -> 2 (elasticity policy 0: MAX(LOAD) > 5)" in m for m in log)
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_a_scale_whose_vms_cannot_be_placed_says_so_on_the_role(flow):
    made = flow.create_template(1, template("big", [role("web")]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    service = flow.get_service(sid)
    body = flow.get_template(made["id"])["body"]
    assert body["roles"][0]["vm_template_contents"] == SMALL_VM
    # the simulated host has 16 cores: 64 CPUs fit nowhere
    flow.update_template(made["id"], template("big", [role("web", contents="CPU = 64\n"
                                                             "MEMORY = 64\n")]))
    big = flow.instantiate(made["id"], 1)["id"]
    # the scheduler's reason sends no VM event: the backstop check brings it to the role
    wait_until(lambda: "Not enough CPU capacity" in roles_of(flow, big)["web"]["message"],
               what="the role's message")
    assert roles_of(flow, big)["web"]["message"].startswith("1 VM(s) not placed (")
    assert flow.get_service(big)["state"] == "DEPLOYING"
    for one in (service["id"], big):
        flow.undeploy(one)
        wait_state(flow, one, "DONE")


def log_of(flow, service_id):
    return [e["message"] for e in flow.get_service(service_id)["log"]]


def test_a_role_is_added_to_a_running_service_and_removed_again(flow, lifecycle):
    made = flow.create_template(1, template("grow", [role("db")]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")

    # bad roles are named and change nothing
    for bad, problem in (({"name": "db", "vm_template_contents": SMALL_VM},
                          "role: name: role 'db' is defined twice"),
                         (role("web", ["nope"]), "role: parents: no role named 'nope'"),
                         ({"name": "web", "vm_template": 99999},
                          "role: vm_template: VM template 99999 does not exist"),
                         ("{not json", "role is not JSON")):
        with pytest.raises(RemoteError) as err:
            flow.add_role(sid, bad)
        assert err.value.exc_type == "InvalidArgument"
        assert problem in err.value.value
    assert list(roles_of(flow, sid)) == ["db"]

    answer = flow.add_role(sid, json.dumps(role("web", ["db"], cardinality=2)))
    assert [r["name"] for r in answer["roles"]] == ["db", "web"]
    assert "RUNNING -> DEPLOYING" in [e["message"] for e in answer["log"]]
    service = wait_state(flow, sid, "RUNNING")
    web_vms = vm_ids(flow, sid, "web")
    assert len(web_vms) == 2
    assert lifecycle.get_vm(web_vms[0])["template"]["CONTEXT"]["ROLE_NAME"] == "web"

    with pytest.raises(RemoteError) as err:
        flow.remove_role(sid, "db")
    assert err.value.exc_type == "FailedPrecondition"
    assert "role db: role(s) web depend on it" in err.value.value

    flow.remove_role(sid, "web")
    wait_until(lambda: list(roles_of(flow, sid)) == ["db"]
               and flow.get_service(sid)["state"] == "RUNNING", what="web removed")
    assert {lifecycle.get_vm(v)["status"] for v in web_vms} == {"DONE"}
    assert "role web removed" in log_of(flow, sid)
    with pytest.raises(RemoteError) as err:
        flow.remove_role(sid, "db")
    assert "only role of service" in err.value.value
    # a role of the same name can come back (its VMs' request ids are new)
    flow.add_role(sid, role("web", ["db"]))
    wait_until(lambda: len(vm_ids(flow, sid, "web")) == 1
               and flow.get_service(sid)["state"] == "RUNNING", what="web again")
    assert service["id"] == sid
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_a_role_action_with_period_and_number_acts_in_spaced_batches(flow, lifecycle):
    made = flow.create_template(1, template("batches", [role("web", cardinality=3)]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    ids = vm_ids(flow, sid, "web")
    flow.role_action(sid, "web", "poweroff-hard", period=2, number=1)
    # one VM at once, the others wait their turn (the backstop runs the batches)
    assert [lifecycle.get_vm(v)["status"] for v in ids].count("RUNNING") >= 2
    wait_until(lambda: all(lifecycle.get_vm(v)["status"] == "POWEROFF" for v in ids), 30,
               what="every VM POWEROFF")
    asked = sorted(next(h["at"] for h in lifecycle.get_vm(v)["history"]
                        if h["action"].startswith("poweroff")) for v in ids)
    from datetime import datetime
    gaps = [(datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
            for a, b in zip(asked, asked[1:])]
    assert all(gap >= 1.9 for gap in gaps), gaps
    assert wait_state(flow, sid, "WARNING")
    flow.role_action(sid, "web", "resume")
    wait_state(flow, sid, "RUNNING")
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def scale_times(flow, service_id):
    """(from, to, when) of each scale in the service's log."""
    import re
    from datetime import datetime
    out = []
    for entry in flow.get_service(service_id)["log"]:
        found = re.search(r"scale (\d+) -> (\d+)", entry["message"])
        if found:
            out.append((int(found[1]), int(found[2]), datetime.fromisoformat(entry["at"])))
    return out


def test_a_policy_that_holds_waits_for_the_cooldown_before_scaling_again(flow, lifecycle):
    policy = {"type": "CHANGE", "adjust": 1, "expression": "MAX(LOAD) > 5", "period": 1,
              "period_number": 1, "cooldown": 3}
    sid = running_elastic(flow, "cooldown", policy, max_vms=3)
    lifecycle.update_vm_template(vm_ids(flow, sid, "web")[0], {"LOAD": "9"})
    wait_until(lambda: len(scale_times(flow, sid)) == 2, 30, what="two scales")
    (one, two, first), (_, three, second) = scale_times(flow, sid)
    assert (one, two, three) == (1, 2, 3)
    assert (second - first).total_seconds() >= 3     # the policy held all along
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_percentage_change_adds_at_least_min_adjust_step(flow, lifecycle):
    policy = {"type": "PERCENTAGE_CHANGE", "adjust": 50, "min_adjust_step": 2,
              "expression": "LOAD > 5", "period": 1, "period_number": 1, "cooldown": 600}
    sid = running_elastic(flow, "percent", policy, cardinality=2, max_vms=10)
    for vm_id in vm_ids(flow, sid, "web"):
        lifecycle.update_vm_template(vm_id, {"LOAD": "9"})
    # 50% of 2 is 1, below the step of 2
    wait_until(lambda: len(vm_ids(flow, sid, "web")) == 4, 30, what="4 VMs")
    assert [(a, b) for a, b, _ in scale_times(flow, sid)] == [(2, 4)]
    wait_state(flow, sid, "COOLDOWN")
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")


def test_a_scheduled_policy_fires_at_its_start_time(flow):
    from datetime import datetime, timedelta, timezone
    start = datetime.now(timezone.utc) + timedelta(seconds=3)
    policy = {"type": "CARDINALITY", "adjust": 2, "start_time": start.isoformat()}
    made = flow.create_template(1, template("scheduled", [
        role("web", min_vms=1, max_vms=2, scheduled_policies=[policy])]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
    assert roles_of(flow, sid)["web"]["cardinality"] == 1
    wait_until(lambda: len(vm_ids(flow, sid, "web")) == 2
               and flow.get_service(sid)["state"] == "RUNNING", 30, what="2 VMs")
    [(one, two, when)] = scale_times(flow, sid)
    assert (one, two) == (1, 2) and when >= start
    assert "scheduled policy 0" in " ".join(log_of(flow, sid))
    flow.undeploy(sid)
    wait_state(flow, sid, "DONE")
