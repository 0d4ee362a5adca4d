"""Fixtures and helpers for the image and network tests: a roomy host, and
driving a VM through lifecycle's logic by answering its driver commands."""
import threading
import uuid

import pytest
from sqlalchemy import select

from cirrus import db
from cirrus.db.models import Outbox, User
from cirrus.messages import COMMANDS, commands_in
from services.lifecycle import logic, monitoring


@pytest.fixture
def factory(cirrus_env):
    return db.session_factory()


@pytest.fixture
def admin_id(factory):
    with factory() as s:
        return s.scalar(select(User.id).where(User.name == "admin"))


@pytest.fixture
def host(factory):
    """A monitored host with room for a hundred small VMs."""
    with factory() as s, s.begin():
        h = logic.create_host(s, f"h-{uuid.uuid4().hex[:10]}")
        monitoring.handle_monitor(s, {"host": h.name, "monitoring": {
            "TOTALCPU": 100 * 100, "TOTALMEMORY": 100 * 1024 * 1024}})
        return h.id


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def outbox_commands(s):
    """Every driver command waiting in the outbox, oldest first."""
    return [cmd for row in s.scalars(select(Outbox).where(Outbox.exchange == COMMANDS.name)
                                     .order_by(Outbox.id))
            for cmd in commands_in(row.payload)]


def commands(s, vm_id):
    """The VM's driver commands in the outbox, oldest first."""
    return [cmd for cmd in outbox_commands(s) if cmd.get("vm_id") == vm_id]


def command_sent(s, command_id):
    """The driver command ``command_id`` as queued in the outbox (None if not there)."""
    return next((cmd for cmd in outbox_commands(s) if cmd["id"] == command_id), None)


def answer(s, vm_id, success=True, info=None):
    """Answer the VM's command in flight as its driver would."""
    vm = logic.get_vm_locked(s, vm_id)
    command = next(c for c in commands(s, vm_id) if c["id"] == vm.command_id)
    return logic.handle_result(s, {**command, "command_id": command["id"], "success": success,
                                   "info": info or {}, "error": None if success else "failed"})


def deploy_to_running(s, vm_id, host_id):
    assert logic.deploy(s, vm_id, host_id)["outcome"] == "deployed"
    answer(s, vm_id)                    # clone
    answer(s, vm_id, info={"deploy_id": f"cirrus-{vm_id}"})     # deploy
    assert logic.vm_status(logic.get_vm_locked(s, vm_id)) == "RUNNING"


def terminate_to_done(s, vm_id, saved=None):
    logic.vm_action(s, vm_id, "terminate", {"hard": True})
    answer(s, vm_id)                    # cancel
    answer(s, vm_id, info={"saved": saved} if saved else None)    # delete
    assert logic.vm_status(logic.get_vm_locked(s, vm_id)) == "DONE"


def deploy_each_on_its_own_host(factory, vm_ids):
    """Deploy every VM at once from its own thread and session, each to a
    host of its own, so that the deploys do not queue on a host row and
    really race for what else they take; returns the outcomes."""
    with factory() as s, s.begin():
        hosts = []
        for _ in vm_ids:
            h = logic.create_host(s, unique("race"))
            monitoring.handle_monitor(s, {"host": h.name, "monitoring": {
                "TOTALCPU": 100, "TOTALMEMORY": 1024 * 1024}})
            hosts.append(h.id)
    outcomes = []
    barrier = threading.Barrier(len(vm_ids))

    def race(vm_id, host_id):
        with factory() as s, s.begin():
            barrier.wait()
            outcomes.append(logic.deploy(s, vm_id, host_id)["outcome"])

    threads = [threading.Thread(target=race, args=pair) for pair in zip(vm_ids, hosts)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return outcomes


@pytest.fixture(scope="module")
def lifecycle_rpc(cirrus_env, amqp_uri, tmp_path_factory):
    """The lifecycle service as a process, and an RPC proxy to it."""
    from tests.broker import rpc_proxy
    from tests.procs import start_services
    [proc] = start_services(["lifecycle"], cirrus_env, tmp_path_factory.mktemp("lc"))
    try:
        with rpc_proxy(amqp_uri, "lifecycle") as proxy:
            yield proxy
    finally:
        proc.stop()
