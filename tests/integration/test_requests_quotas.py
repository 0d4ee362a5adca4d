"""Quotas (issue 8) through the real requests and lifecycle services: refused
with RESOURCE_EXHAUSTED naming the quota and by how much, counted atomically
under concurrent requests, and given back when a VM reaches DONE."""
import threading

import pytest

from tests.broker import rpc_proxy
from tests.procs import wait_until
from tests.requests_fixtures import (  # noqa: F401  (fixtures)
    admin_credentials, make_user, refused, request_services, requests_dir, requests_env, rpc,
    vm_spec,
)


def used(rpc, scope, ref, resource):
    return rpc.get_quota(admin_credentials(), scope, ref)["used"][resource]


def test_over_the_vm_quota_is_refused_naming_it_and_by_how_much(rpc):
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 2})
    for _ in range(2):
        rpc.create_vm(user, vm_spec(1, 1))
    with refused("ResourceExhausted") as info:
        rpc.create_vm(user, vm_spec(1, 1))
    assert f"user {user['username']}'s quota of vms exceeded by 1" in info.value.value
    assert "2 VMs allowed, 2 in use" in info.value.value
    assert used(rpc, "user", user["username"], "vms") == 2


def test_cpu_and_memory_quotas_say_by_how_much(rpc):
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"cpu": 3, "memory": 4096})
    rpc.create_vm(user, vm_spec(2, 2))
    with refused("ResourceExhausted") as info:
        rpc.create_vm(user, vm_spec(2, 4))
    assert "quota of cpu exceeded by 1" in info.value.value
    assert "quota of memory exceeded by 2048" in info.value.value
    # nothing was charged by the refused request
    assert used(rpc, "user", user["username"], "memory") == 2048


def test_a_group_quota_counts_every_member(rpc):
    admin = admin_credentials()
    group = f"team-{make_user()['username']}"
    rpc.create_group(admin, group)
    first, second = make_user(), make_user()
    for member in (first, second):
        rpc.group_add_user(admin, group, member["username"])
    rpc.set_quota(admin, "group", group, {"vms": 1})
    rpc.create_vm(first, vm_spec(1, 1))
    with refused("ResourceExhausted") as info:
        rpc.create_vm(second, vm_spec(1, 1))
    assert f"group {group}'s quota of vms exceeded by 1" in info.value.value


def test_concurrent_requests_cannot_both_slip_under_the_limit(rpc, amqp_uri):
    user = make_user()
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 3})
    outcomes = []

    def create():
        with rpc_proxy(amqp_uri, "requests") as own:
            try:
                own.create_vm(user, vm_spec(1, 1))
                outcomes.append("made")
            except Exception as exc:    # noqa: BLE001  (the outcome is what is counted)
                outcomes.append(getattr(exc, "exc_type", repr(exc)))
    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["ResourceExhausted"] * 5 + ["made"] * 3
    assert used(rpc, "user", user["username"], "vms") == 3
    assert len(rpc.list_vms(user)) == 3


def test_a_vm_at_done_and_a_rejection_give_the_quota_back(rpc):
    user, admin = make_user(), make_user("cloud-admin")
    rpc.set_quota(admin_credentials(), "user", user["username"], {"vms": 1, "cpu": 4})
    vm = rpc.create_vm(user, vm_spec(1, 1))
    rpc.vm_action(user, vm["id"], "terminate", {"hard": True})   # PENDING: DONE at once
    wait_until(lambda: used(rpc, "user", user["username"], "vms") == 0, timeout=20,
               what="quota released at DONE")
    # a waiting request holds its quota; a rejection gives it back
    waiting = rpc.submit_vm(user, vm_spec(4, 1))
    assert used(rpc, "user", user["username"], "cpu") == 4
    with refused("ResourceExhausted"):
        rpc.create_vm(user, vm_spec(1, 1))
    rpc.decide_request(admin, waiting["id"], False, "not now")
    assert used(rpc, "user", user["username"], "cpu") == 0
    assert rpc.create_vm(user, vm_spec(1, 1))["id"]


@pytest.mark.parametrize("limits, says", [
    ({"vms": -5}, "a whole number, 0 or more"),
    ({"disks": 1}, "unknown resource disks"),
    ({}, "give at least one"),
])
def test_bad_quotas_are_refused(rpc, limits, says):
    with refused("InvalidArgument") as info:
        rpc.set_quota(admin_credentials(), "user", make_user()["username"], limits)
    assert says in info.value.value


def test_only_administrators_set_quotas_and_users_read_their_own(rpc):
    user, other = make_user(), make_user()
    with refused("PermissionDenied"):
        rpc.set_quota(user, "user", user["username"], {"vms": 100})
    assert rpc.get_quota(user, "user", user["username"])["limits"]["vms"] is None
    with refused("PermissionDenied"):
        rpc.get_quota(user, "user", other["username"])
