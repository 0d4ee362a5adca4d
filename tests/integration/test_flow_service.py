"""The flow service as a process, with lifecycle, the scheduler and a
simulated node, on the real broker and database: services deploy in
dependency order on events, wait for READY, go WARNING and back, scale,
recover only what failed, and undeploy children first."""
import json
from pathlib import Path

import pytest
from nameko.exceptions import RemoteError

from cirrus import messages
from tests.broker import FakeNodeTransport, rpc_proxy
from tests.procs import Proc, start_services, wait_until
from tests.scheduling import quiet_database, scheduler_env

HOST = "flow-sim"
SMALL_VM = "CPU = 0.1\nMEMORY = 64\n"
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "flow_templates"


@pytest.fixture(scope="module")
def cluster(cirrus_env, tmp_path_factory, amqp_uri):
    logs = tmp_path_factory.mktemp("flow")
    quiet_database()
    env = scheduler_env(cirrus_env, CIRRUS_SCHEDULER_SWEEP_INTERVAL="2",
                        CIRRUS_FLOW_CHECK_INTERVAL="1", CIRRUS_FLOW_DEFAULT_COOLDOWN="0")
    procs = start_services(["lifecycle", "scheduler", "flow"], env, logs)
    node = Proc(["cirrus-node", "--host", HOST, "--backend", "simulated"], env,
                logs / "node.log").start()
    procs.append(node)
    try:
        with rpc_proxy(amqp_uri, "lifecycle") as lifecycle:
            host = lifecycle.create_host(HOST)
            wait_until(lambda: lifecycle.get_host(host["id"])["state"] == "MONITORED",
                       what=f"{HOST} MONITORED")
        yield {"env": env, "logs": logs, "procs": procs}
    finally:
        for proc in procs:
            proc.stop()


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
    node = FakeNodeTransport(amqp_uri, HOST)
    node.publish(messages.VM_EVENT, {"host": HOST, "vm_id": vm_id, "state": "POWEROFF"})
    service = wait_state(flow, sid, "WARNING")
    assert roles_of(flow, sid)["web"]["state"] == "WARNING"
    assert f"VM {vm_id} POWEROFF" in roles_of(flow, sid)["web"]["message"]
    node.publish(messages.VM_EVENT, {"host": HOST, "vm_id": vm_id, "state": "RUNNING"})
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


def test_an_elasticity_policy_scales_after_its_periods_hold(flow, lifecycle):
    policy = {"type": "CHANGE", "adjust": 1, "expression": "MAX(LOAD) > 5", "period": 1,
              "period_number": 2, "cooldown": 0}
    made = flow.create_template(1, template("elastic", [
        role("web", min_vms=1, max_vms=2, elasticity_policies=[policy])]))
    sid = flow.instantiate(made["id"], 1)["id"]
    wait_state(flow, sid, "RUNNING")
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
