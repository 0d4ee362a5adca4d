"""Provisioning requests and their BPMN approvals (issue 8), through the real
requests and lifecycle services on the real broker and database: the issue's
worked examples and its "also test" list."""
import pytest

from cirrus import config
from tests.procs import start_services, wait_until
from tests.requests_fixtures import (  # noqa: F401  (fixtures)
    admin_credentials, cmdb_lines, make_user, refused, request_services, requests_dir,
    requests_env, rpc, vm_spec,
)

DEFAULT_BPMN = (config.REPO_ROOT / "deploy" / "processes" / "provision.bpmn").read_text()


@pytest.fixture
def people():
    return {"user": make_user("user"), "finance": make_user("finance"),
            "cloud-admin": make_user("cloud-admin")}


def test_one_vcpu_and_4_gb_is_provisioned_without_approval(rpc, people):
    vm = rpc.create_vm(people["user"], vm_spec(1, 4, name="small"))
    assert vm["name"] == "small" and vm["status"] == "PENDING"
    request = rpc.submit_vm(people["user"], vm_spec(1, 4, name="small-2"))
    assert request["state"] == "PROVISIONED" and request["vm"]["name"] == "small-2"
    assert request["vm_ids"] == [request["vm"]["id"]]
    shown = rpc.get_request(people["user"], request["id"])
    assert shown["decisions"] == []
    assert [e["action"] for e in shown["history"]] == [
        "request.submitted", "request.approved", "request.provisioned"]


def test_four_vcpus_wait_for_the_cloud_administrator_then_are_provisioned(rpc, people):
    request = rpc.submit_vm(people["user"], vm_spec(4, 4, name="medium"))
    assert (request["state"], request["waiting_for"], request["vm_ids"]) == \
        ("WAITING", "cloud-admin", [])
    assert request["step"] == "Cloud administrator approval"
    # the old VM create says where the request is instead of a VM
    with refused("FailedPrecondition") as info:
        rpc.create_vm(people["user"], vm_spec(4, 4))
    assert "waits for approval by cloud-admin" in info.value.value
    waiting = rpc.list_requests(people["cloud-admin"], waiting_for="cloud-admin")
    assert request["id"] in [r["id"] for r in waiting]

    done = rpc.decide_request(people["cloud-admin"], request["id"], True, "fits the budget")
    assert done["state"] == "PROVISIONED" and len(done["vm_ids"]) == 1
    assert done["vm"]["name"] == "medium" and done["vm"]["vcpu"] == 4
    assert [(d["role"], d["decision"], d["decided_by"], d["reason"]) for d in done["decisions"]] \
        == [("cloud-admin", "approved", people["cloud-admin"]["username"], "fits the budget")]


def test_a_rejected_request_provisions_nothing_and_the_requester_sees_why(rpc, people):
    before = len(rpc.list_vms(people["user"]))
    request = rpc.submit_vm(people["user"], vm_spec(4, 4, name="rejected"))
    with refused("InvalidArgument") as info:       # a rejection says why
        rpc.decide_request(people["cloud-admin"], request["id"], False, "")
    assert "reason" in info.value.value
    rpc.decide_request(people["cloud-admin"], request["id"], False, "no budget left")
    seen = rpc.get_request(people["user"], request["id"])
    assert (seen["state"], seen["reason"], seen["vm_ids"]) == ("REJECTED", "no budget left", [])
    assert len(rpc.list_vms(people["user"])) == before


def test_large_requests_wait_for_finance_then_the_administrator(rpc, people):
    request = rpc.submit_vm(people["user"], vm_spec(4, 32, name="large"))
    assert (request["state"], request["waiting_for"]) == ("WAITING", "finance")
    # the administrator is not asked yet: nothing waits for them, and they may not decide
    assert request["id"] not in [r["id"] for r in
                                 rpc.list_requests(people["cloud-admin"], waiting_for="cloud-admin")]
    with refused("PermissionDenied") as info:
        rpc.decide_request(people["cloud-admin"], request["id"], True, "early")
    assert "waits for finance" in info.value.value

    after_finance = rpc.decide_request(people["finance"], request["id"], True, "budgeted")
    assert (after_finance["state"], after_finance["waiting_for"]) == ("WAITING", "cloud-admin")
    # finance approving again: it already did
    with refused("FailedPrecondition") as info:
        rpc.decide_request(people["finance"], request["id"], True, "twice")
    assert "already approved" in info.value.value

    done = rpc.decide_request(people["cloud-admin"], request["id"], True, "capacity ok")
    assert done["state"] == "PROVISIONED" and done["vm"]["memory"] == 32 * 1024
    assert [d["role"] for d in done["decisions"]] == ["finance", "cloud-admin"]
    # a finished request takes no more decisions
    with refused("FailedPrecondition") as info:
        rpc.decide_request(people["cloud-admin"], request["id"], True, "again")
    assert "PROVISIONED" in info.value.value


def test_a_finance_rejection_never_reaches_the_administrator(rpc, people):
    request = rpc.submit_vm(people["user"], vm_spec(8, 64))
    rejected = rpc.decide_request(people["finance"], request["id"], False, "too expensive")
    assert rejected["state"] == "REJECTED"
    assert [d["role"] for d in rejected["decisions"]] == ["finance"]
    assert not any(e["details"].get("role") == "cloud-admin" for e in rejected["history"])


def test_users_without_the_role_are_refused(rpc, people):
    request = rpc.submit_vm(people["user"], vm_spec(4, 4))
    for who in (people["user"], people["finance"], admin_credentials()):
        with refused("PermissionDenied") as info:
            rpc.decide_request(who, request["id"], True, "me too")
        assert "waits for cloud-admin" in info.value.value
    assert rpc.get_request(people["user"], request["id"])["state"] == "WAITING"
    # another user does not even see it
    with refused("NotFound"):
        rpc.get_request(make_user("user"), request["id"])


def test_a_restart_while_a_request_waits_loses_nothing(rpc, people, request_services,
                                                       requests_env, requests_dir):
    request = rpc.submit_vm(people["user"], vm_spec(4, 32, name="survivor"))
    rpc.decide_request(people["finance"], request["id"], True, "ok")
    requests_proc = request_services[0]
    requests_proc.kill()
    request_services[0] = start_services(["requests"], requests_env, requests_dir)[0]
    seen = wait_until(lambda: _get(rpc, people["user"], request["id"]), timeout=30,
                      what="requests back")
    assert (seen["state"], seen["waiting_for"]) == ("WAITING", "cloud-admin")
    done = rpc.decide_request(people["cloud-admin"], request["id"], True, "after restart")
    assert done["state"] == "PROVISIONED" and done["vm"]["name"] == "survivor"


def _get(rpc, who, request_id):
    try:
        return rpc.get_request(who, request_id)
    except Exception:
        return None


def test_a_new_process_applies_to_new_requests_only(rpc, people):
    admin = admin_credentials()
    in_flight = rpc.submit_vm(people["user"], vm_spec(4, 4))
    before = rpc.get_process(admin)
    # the new rules: 2 vCPUs already need the cloud administrator
    lowered = DEFAULT_BPMN.replace("vcpu &gt;= 4 and memory_gb &lt; 32",
                                   "vcpu &gt;= 2 and not (vcpu &gt;= 4 and memory_gb &gt;= 32)")
    assert lowered != DEFAULT_BPMN
    try:
        loaded = rpc.load_process(admin, lowered)
        assert loaded["id"] > before["id"]
        two = rpc.submit_vm(people["user"], vm_spec(2, 4))
        assert (two["state"], two["waiting_for"], two["process_version"]) == \
            ("WAITING", "cloud-admin", loaded["id"])
        # the request made before keeps its process
        assert rpc.get_request(people["user"], in_flight["id"])["process_version"] == before["id"]
        done = rpc.decide_request(people["cloud-admin"], in_flight["id"], True, "old rules")
        assert done["state"] == "PROVISIONED"
    finally:
        rpc.load_process(admin, DEFAULT_BPMN)
    assert rpc.submit_vm(people["user"], vm_spec(2, 4))["state"] == "PROVISIONED"


@pytest.mark.parametrize("bpmn, says", [
    ("<definitions", "does not parse"),
    ('<?xml version="1.0"?><bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/'
     'MODEL" id="d" targetNamespace="x"/>', "has no process"),
    (DEFAULT_BPMN.replace('name="finance"', 'name="sales"'), "lane 'sales'"),
    (DEFAULT_BPMN.replace("memory_gb &lt; 32", "memory_gb &lt;"), "not an expression"),
])
def test_a_bad_process_is_refused_and_the_old_stays(rpc, people, bpmn, says):
    admin = admin_credentials()
    before = rpc.get_process(admin)
    with refused("InvalidArgument") as info:
        rpc.load_process(admin, bpmn)
    assert says in info.value.value
    assert rpc.get_process(admin)["id"] == before["id"]
    with refused("PermissionDenied"):
        rpc.load_process(people["cloud-admin"], DEFAULT_BPMN)


def test_every_decision_is_in_the_audit_log_and_the_cmdb_file(rpc, people, requests_dir):
    approved = rpc.submit_vm(people["user"], vm_spec(4, 32, name="audited"))
    rpc.decide_request(people["finance"], approved["id"], True, "finance says yes")
    rpc.decide_request(people["cloud-admin"], approved["id"], True, "admin says yes")
    rejected = rpc.submit_vm(people["user"], vm_spec(4, 4, name="audited-no"))
    rpc.decide_request(people["cloud-admin"], rejected["id"], False, "admin says no")

    entries = rpc.list_audit(admin_credentials(), object_kind="request")
    decisions = {(e["object_id"], e["action"], e["actor"], e["reason"]) for e in entries}
    assert {(str(approved["id"]), "request.approved", people["finance"]["username"],
             "finance says yes"),
            (str(approved["id"]), "request.approved", people["cloud-admin"]["username"],
             "admin says yes"),
            (str(rejected["id"]), "request.rejected", people["cloud-admin"]["username"],
             "admin says no")} <= decisions
    with refused("PermissionDenied"):
        rpc.list_audit(people["user"])

    def records():
        found = {r["request_id"]: r for r in cmdb_lines(requests_dir / "cmdb.jsonl")
                 if r.get("type") == "provision_request"}
        return found if {approved["id"], rejected["id"]} <= set(found) else None
    found = wait_until(records, timeout=15, what="CMDB records")
    assert found[approved["id"]]["state"] == "PROVISIONED"
    assert found[approved["id"]]["vm_ids"]
    assert [(d["role"], d["decision"], d["reason"]) for d in found[approved["id"]]["decisions"]] \
        == [("finance", "approved", "finance says yes"),
            ("cloud-admin", "approved", "admin says yes")]
    assert [(d["role"], d["decision"], d["reason"]) for d in found[rejected["id"]]["decisions"]] \
        == [("cloud-admin", "rejected", "admin says no")]


def test_stats_count_requests_per_step_with_the_median_wait(rpc, people):
    for _ in range(2):
        rpc.submit_vm(people["user"], vm_spec(4, 32))
    stats = rpc.request_stats(people["finance"])
    finance = [s for s in stats["steps"] if s["role"] == "finance"]
    assert finance and finance[0]["waiting"] >= 2 and finance[0]["median_wait_seconds"] >= 0
    assert stats["states"]["WAITING"] >= 2
    assert len(rpc.list_requests(people["finance"], waiting_for="finance")) >= 2
