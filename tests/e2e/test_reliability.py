"""Reliability: the shared PostgreSQL and RabbitMQ restarted under a running
cluster, and a driver worker killed mid-deploy. Each restart test restarts
the machine's one server, so each runs once and brings it back whatever
happens."""
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cirrus.client import ClientError
from tests.procs import wait_until

PG_CLUSTER = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if \
    Path("/etc/postgresql").exists() else []


def pg_ctl(action):
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", PG_CLUSTER[-1], "main",
                    action], check=True, capture_output=True, timeout=120)


@contextmanager
def postgres_down():
    """PostgreSQL stopped for the body of the with, started again whatever happens."""
    pg_ctl("stop")
    try:
        yield
    finally:
        pg_ctl("start")


def outage_error(call):
    """The ClientError ``call`` raises during an outage, and how long it took."""
    started = time.monotonic()
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value, time.monotonic() - started


@pytest.mark.skipif(not PG_CLUSTER, reason="no local PostgreSQL cluster to restart")
def test_postgres_restart_fails_calls_unavailable_then_recovers(make_cluster):
    cluster = make_cluster(nodes=("pg-1",))
    client = cluster.client(timeout=25)
    wait_until(lambda: client.list_hosts()[0]["state"] == "MONITORED", what="host monitored")
    before = client.create_vm(name="before", cpu=0.1, memory=16)["id"]
    client.wait_vm(before, "RUNNING", timeout=60)
    # these deploy across the outage: driver results and monitoring reports
    # arrive while the database is away
    in_flight = [client.create_vm(name=f"across-{i}", cpu=0.1, memory=16)["id"]
                 for i in range(5)]

    with postgres_down():
        down_at = time.monotonic()
        calls = {"list": lambda: client.list_vms(),
                 "get": lambda: client.get_vm(before),
                 "create": lambda: client.create_vm(name="during", cpu=0.1, memory=16)}
        for name, call in calls.items():
            error, took = outage_error(call)
            # a clear refusal well inside the client's deadline, not a hang
            assert error.code == "UNAVAILABLE", (name, error)
            assert "database" in error.details.lower(), (name, error)
            assert took < 15, (name, took)
        time.sleep(max(0.0, 5 - (time.monotonic() - down_at)))

    # the services reconnect by themselves: the same processes serve again
    wait_until(lambda: _answers(client), timeout=60, what="the API answering again")
    ids = [client.create_vm(name=f"after-{i}", cpu=0.1, memory=16)["id"] for i in range(3)]
    everyone = [before, *in_flight, *ids]
    for vm_id in everyone:
        client.wait_vm(vm_id, "RUNNING", timeout=60)
    assert "during" not in {vm["name"] for vm in client.list_vms(include_done=True)}
    for vm_id in everyone:
        client.terminate_vm(vm_id, hard=True)
    for vm_id in everyone:
        client.wait_vm(vm_id, "DONE", timeout=60)


def _answers(client):
    try:
        client.list_vms()
        return True
    except ClientError:
        return False
