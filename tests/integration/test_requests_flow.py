"""OneFlow services through provisioning requests (issue 8), with the real
requests, lifecycle, scheduler and flow services and a simulated node: a
service's VMs count against quotas from its request on, one by one as flow
makes them, through scales and until they end; a scale over quota fails
its role with RESOURCE_EXHAUSTED; an instantiate repeated after a crash
finds the service the first one made."""
import json
import threading
import uuid

import pytest
from sqlalchemy import func, select

from cirrus import db
from cirrus.db.models import FlowService, QuotaCharge
from services.requests import approvals, provisioning, quotas, users
from tests.broker import rpc_proxy
from tests.procs import wait_until
from tests.requests_fixtures import (  # noqa: F401  (requests_dir: a fixture)
    admin_credentials, make_user, refused, requests_dir, user_id, write_config,
)
from tests.scheduling import running, simulated_node

HOST = "requests-flow-sim"
SMALL_VM = "CPU = 0.1\nVCPU = 1\nMEMORY = 64\n"
BIG_VM = "CPU = 0.1\nVCPU = 4\nMEMORY = 64\n"       # 4 vCPUs: the cloud administrator decides


@pytest.fixture(scope="module")
def cluster(cirrus_env, requests_dir, amqp_uri):
    cfg = write_config(requests_dir / "cirrus.yaml", requests_dir / "cmdb.jsonl")
    for procs in running(cirrus_env, requests_dir, ("requests", "lifecycle", "scheduler", "flow"),
                         CIRRUS_CONFIG=str(cfg), CIRRUS_SCHEDULER_SWEEP_INTERVAL="2",
                         CIRRUS_FLOW_CHECK_INTERVAL="1", CIRRUS_FLOW_DEFAULT_COOLDOWN="0"):
        procs.append(simulated_node(procs[0].env, requests_dir, amqp_uri, HOST))
        yield


@pytest.fixture
def rpc(cluster, amqp_uri):
    with rpc_proxy(amqp_uri, "requests") as proxy:
        yield proxy


@pytest.fixture
def flow(cluster, amqp_uri):
    with rpc_proxy(amqp_uri, "flow") as proxy:
        yield proxy


def service_template(rpc, user, *roles):
    """A straight service template of ``roles``: (name, cardinality[, VM])."""
    body = {"name": f"svc-{uuid.uuid4().hex[:6]}", "deployment": "straight",
            "roles": [{"name": name, "cardinality": count, "parents": [],
                       "vm_template_contents": vm[0] if vm else SMALL_VM}
                      for name, count, *vm in roles]}
    return rpc.create_flow_template(user, json.dumps(body))["id"]


def used(rpc, user):
    return rpc.get_quota(admin_credentials(), "user", user["username"])["used"]


def wait_state(rpc, user, service_id, state, timeout=60):
    def reached():
        service = rpc.get_flow(user, service_id)
        assert service["state"] == state or not service["state"].startswith("FAILED"), service
        return service["state"] == state
    wait_until(reached, timeout, what=f"service {service_id} {state}")
    return rpc.get_flow(user, service_id)


def vm_ids(service):
    return sorted(n["vm_id"] for role in service["roles"] for n in role["nodes"])


def vm_charges(service_id=None, vm_ids=()):
    """The unreleased charges of VMs, and of a service's reservation: {kind: [rows]}."""
    with db.session_factory()() as session:
        rows = session.scalars(select(QuotaCharge).where(
            QuotaCharge.released_at.is_(None),
            ((QuotaCharge.kind == "vm") & QuotaCharge.resource_id.in_(list(vm_ids)))
            | ((QuotaCharge.kind == "service") & (QuotaCharge.resource_id == service_id))
        )).all()
        return {kind: [(r.resource_id, r.vms, r.cpu) for r in rows if r.kind == kind]
                for kind in ("vm", "service")}


def test_a_service_is_counted_whole_at_request_time_then_vm_by_vm(rpc):
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 3, "cpu": 3})
    too_big = service_template(rpc, user, ("db", 1), ("web", 3))
    with refused("ResourceExhausted") as info:
        rpc.submit_flow(user, too_big)
    assert f"user {user['username']}'s quota of vms exceeded by 1" in info.value.value
    assert "this request needs 4" in info.value.value
    assert used(rpc, user)["vms"] == 0

    request = rpc.submit_flow(user, service_template(rpc, user, ("db", 1), ("web", 2)))
    assert request["state"] == "PROVISIONED"
    sid = request["service"]["id"]
    assert used(rpc, user)["vms"] == 3 and used(rpc, user)["cpu"] == 3
    # the quota is full: a VM of the user's own is refused while the service holds it
    with refused("ResourceExhausted"):
        rpc.create_vm(user, {"name": "one-more", "cpu": 0.1, "vcpu": 1, "memory": 64})
    service = wait_state(rpc, user, sid, "RUNNING")
    ids = vm_ids(service)
    assert len(ids) == 3
    # each VM now carries its own charge; nothing is left held for the service
    charges = vm_charges(sid, ids)
    assert sorted(charges["vm"]) == [(vm_id, 1, 1) for vm_id in ids]
    assert charges["service"] == []
    assert used(rpc, user)["vms"] == 3

    rpc.undeploy_flow(user, sid)
    wait_state(rpc, user, sid, "DONE")
    wait_until(lambda: used(rpc, user) == {"vms": 0, "cpu": 0, "memory": 0, "images": 0},
               what="the service's quota given back")


def test_a_waiting_service_request_holds_its_quota_and_a_rejection_frees_it(rpc):
    user, approver = make_user(), make_user("cloud-admin")
    rpc.set_quota(admin_credentials(), "user", user["username"], {"cpu": 8})
    request = rpc.submit_flow(user, service_template(rpc, user, ("big", 1, BIG_VM),
                                                     ("small", 2)))
    assert (request["state"], request["waiting_for"]) == ("WAITING", "cloud-admin")
    assert used(rpc, user)["cpu"] == 6 and used(rpc, user)["vms"] == 3
    with refused("ResourceExhausted") as info:
        rpc.submit_flow(user, service_template(rpc, user, ("big", 1, BIG_VM)))
    assert "quota of cpu exceeded by 2" in info.value.value
    rpc.decide_request(approver, request["id"], False, "not this quarter")
    assert used(rpc, user)["cpu"] == 0 and used(rpc, user)["vms"] == 0


def test_an_approved_service_is_charged_per_vm_out_of_what_its_request_held(rpc):
    user, approver = make_user(), make_user("cloud-admin")
    rpc.set_quota(admin_credentials(), "user", user["username"], {"cpu": 5})
    request = rpc.submit_flow(user, service_template(rpc, user, ("big", 1, BIG_VM),
                                                     ("small", 1)))
    assert used(rpc, user)["cpu"] == 5
    decided = rpc.decide_request(approver, request["id"], True, "")
    assert decided["state"] == "PROVISIONED"
    service = wait_state(rpc, user, decided["service_id"], "RUNNING")
    assert sorted(c for _, _, c in vm_charges(service["id"], vm_ids(service))["vm"]) == [1, 4]
    assert used(rpc, user)["cpu"] == 5
    rpc.undeploy_flow(user, service["id"])
    wait_until(lambda: used(rpc, user)["cpu"] == 0, what="quota given back")


def test_scales_are_counted_and_one_over_quota_fails_the_role_naming_it(rpc):
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 3})
    sid = rpc.submit_flow(user, service_template(rpc, user, ("web", 2)))["service"]["id"]
    wait_state(rpc, user, sid, "RUNNING")

    # two more would make 4: the role says why instead of waiting
    rpc.scale_flow(user, sid, "web", 4)
    service = wait_state(rpc, user, sid, "FAILED_SCALING")
    [web] = service["roles"]
    assert "RESOURCE_EXHAUSTED" in web["message"]
    assert f"user {user['username']}'s quota of vms exceeded by 1" in web["message"]
    assert len(web["nodes"]) == 2 and used(rpc, user)["vms"] == 2

    # with room, recover makes them, each counted
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 4})
    rpc.recover_flow(user, sid)
    service = wait_state(rpc, user, sid, "RUNNING")
    assert len(vm_ids(service)) == 4 and used(rpc, user)["vms"] == 4
    assert len(vm_charges(sid, vm_ids(service))["vm"]) == 4

    # a scale down gives back what its VMs held once they are DONE
    rpc.scale_flow(user, sid, "web", 1)
    wait_until(lambda: used(rpc, user)["vms"] == 1, timeout=60, what="scale down given back")
    service = wait_state(rpc, user, sid, "RUNNING")
    assert len(vm_ids(service)) == 1
    rpc.undeploy_flow(user, sid)
    wait_until(lambda: used(rpc, user)["vms"] == 0, timeout=60, what="undeploy given back")


def test_an_instantiate_repeated_with_its_request_id_returns_the_same_service(rpc, flow,
                                                                             amqp_uri):
    user, other = make_user(), make_user()
    template_id = service_template(rpc, user, ("web", 1))
    owner, key = user_id(user), uuid.uuid4().hex
    answers = []

    def instantiate():
        with rpc_proxy(amqp_uri, "flow") as own:    # two calls in flight at once
            answers.append(own.instantiate(template_id, owner, request_id=key)["id"])
    threads = [threading.Thread(target=instantiate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    again = flow.instantiate(template_id, owner, request_id=key)["id"]
    assert answers == [again, again]
    # unique per owner: another user's same id is another service
    theirs = flow.instantiate(template_id, user_id(other), request_id=key)["id"]
    assert theirs != again
    with db.session_factory()() as session:
        assert session.scalar(select(func.count()).select_from(FlowService).where(
            FlowService.owner_id == owner, FlowService.request_id == key)) == 1
    for sid in (again, theirs):
        rpc.undeploy_flow(admin_credentials(), sid)


def test_a_provisioning_cut_short_is_finished_on_the_same_service(rpc, flow):
    """A crash after flow made the service, before the request recorded it:
    housekeeping provisions the APPROVED request again and finds that service
    (one service, its VMs counted once)."""
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 2})
    template_id = service_template(rpc, user, ("web", 2))
    template = rpc.get_flow_template(user, template_id)
    caller = {"id": user_id(user), "name": user["username"], "role": "user"}
    with db.session_factory()() as session, session.begin():
        data = approvals.process_data("flow", {"vcpu": 2, "cpu": 0.2, "memory": 128},
                                      caller["name"], "user",
                                      users.group_names(session, caller["id"]),
                                      template["body"])
        req = provisioning.submit(session, caller, "flow",
                                  {"template_id": template_id, "request_id": None}, data,
                                  quotas.need_of(vms=2, cpu=2, memory=128))
        assert req.state == "APPROVED"
        request_id, held = req.id, quotas.held_for(session, req.id)
    # the first provisioning: flow made the service, then the requests service "died"
    first = flow.instantiate(template_id, caller["id"], request_id=f"request-{request_id}",
                             reservation=held)
    wait_until(lambda: rpc.get_request(user, request_id)["state"] == "PROVISIONED",
               timeout=30, what="the request provisioned again by housekeeping")
    assert rpc.get_request(user, request_id)["service_id"] == first["id"]
    service = wait_state(rpc, user, first["id"], "RUNNING")
    assert len(vm_ids(service)) == 2 and used(rpc, user)["vms"] == 2
    with db.session_factory()() as session:
        assert session.scalar(select(func.count()).select_from(FlowService).where(
            FlowService.owner_id == caller["id"])) == 1
    rpc.undeploy_flow(user, first["id"])
    wait_until(lambda: used(rpc, user)["vms"] == 0, timeout=60, what="undeploy given back")


def test_submit_flow_repeated_with_its_request_id_is_one_request(rpc):
    user = make_user()
    template_id = service_template(rpc, user, ("web", 1))
    key = uuid.uuid4().hex
    first = rpc.submit_flow(user, template_id, request_id=key)
    again = rpc.submit_flow(user, template_id, request_id=key)
    assert (again["id"], again["service_id"]) == (first["id"], first["service_id"])
    assert used(rpc, user)["vms"] == 1
    rpc.undeploy_flow(user, first["service_id"])
