"""Heartbeats and status (issue 9) through the real requests service, broker
and database: heartbeats sent by cirrus.heartbeat become rows that status()
reports UP with their queues' depths, STOPPED after a clean stop, DOWN once
silent for status.down_after; late beats never overwrite newer ones."""
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection, Producer
from sqlalchemy import update

import cirrus
from cirrus import db, heartbeat, messages
from cirrus.db.models import Instance
from cirrus.instance import Identity
from services.requests import status
from tests.broker import rpc_proxy
from tests.procs import start_services, wait_until
from tests.requests_fixtures import admin_credentials, make_user, refused

DOWN_AFTER = 2.0


@pytest.fixture(scope="module")
def status_env(cirrus_env):
    return {**cirrus_env, "CIRRUS_STATUS_HEARTBEAT_INTERVAL": "0.5",
            "CIRRUS_STATUS_DOWN_AFTER": str(DOWN_AFTER)}


@pytest.fixture(scope="module")
def requests_service(status_env, tmp_path_factory):
    procs = start_services(["requests"], status_env, tmp_path_factory.mktemp("status"))
    yield procs[0]
    procs[0].stop()


@pytest.fixture
def rpc(requests_service, amqp_uri):
    with rpc_proxy(amqp_uri, "requests") as proxy:
        yield proxy


def identity(service="node"):
    return Identity(service=service, name=f"{service}-test-{uuid.uuid4().hex[:6]}",
                    host="test-host", pid=4242, version=cirrus.__version__,
                    started_at=time.time())


def sender(amqp_uri, who, interval=0.3):
    return heartbeat.Heartbeat(who, amqp_uri, interval, expiration=DOWN_AFTER)


def listed(rpc, name):
    found = [i for i in rpc.status(admin_credentials())["instances"] if i["name"] == name]
    return found[0] if found else None


def in_state(rpc, name, state):
    return wait_until(lambda: (i := listed(rpc, name)) and i["state"] == state and i,
                      timeout=10, what=f"{name} {state}")


@pytest.fixture
def waiting_queue(amqp_uri):
    """A node queue holding three commands that nobody consumes."""
    host = f"status-{uuid.uuid4().hex[:6]}"
    with Connection(amqp_uri) as conn:
        queue = messages.node_queue(host)(conn.default_channel)
        queue.declare()
        for _ in range(3):
            Producer(conn.default_channel).publish({"action": "poll"}, exchange=messages.COMMANDS,
                                                   routing_key=host, serializer="json")
        yield queue.name
        queue.delete()


def test_a_beating_process_is_up_with_its_queue_depths_then_stopped(rpc, amqp_uri,
                                                                    waiting_queue):
    who = identity()
    missing = f"cirrus.node.absent-{uuid.uuid4().hex[:6]}"
    heartbeat.serving([waiting_queue, missing], ["h1", "h2"])
    beating = sender(amqp_uri, who).start()
    try:
        up = in_state(rpc, who.name, "UP")
    finally:
        beating.stop()
        heartbeat.serving()
    assert (up["service"], up["host"], up["pid"], up["version"]) == \
        ("node", "test-host", 4242, cirrus.__version__)
    assert up["queues"] == [
        {"name": waiting_queue, "messages": 3, "consumers": 0, "missing": False},
        {"name": missing, "messages": None, "consumers": None, "missing": True}]
    assert (up["queue_count"], up["hosts"], up["host_count"]) == (2, ["h1", "h2"], 2)
    assert 0 <= up["uptime_seconds"] < 30 and up["last_seen_seconds"] < DOWN_AFTER
    assert datetime.fromisoformat(up["started_at"]).timestamp() == pytest.approx(who.started_at)
    stopped = in_state(rpc, who.name, "STOPPED")
    assert stopped["stopped_at"] is not None and stopped["pid"] == 4242


def test_a_process_that_falls_silent_goes_down(rpc, amqp_uri):
    who = identity()
    sender(amqp_uri, who).send()        # one beat, then nothing: as if killed
    up = in_state(rpc, who.name, "UP")
    time.sleep(DOWN_AFTER)
    down = in_state(rpc, who.name, "DOWN")
    assert down["last_seen"] == up["last_seen"] and down["last_seen_seconds"] > DOWN_AFTER
    # uptime stops at the last beat
    assert down["uptime_seconds"] == pytest.approx(up["uptime_seconds"] -
                                                   up["last_seen_seconds"], abs=0.01)


def test_the_requests_service_reports_itself_and_its_queues(rpc):
    answer = rpc.status(admin_credentials(), "requests")
    assert answer["down_after"] == DOWN_AFTER and answer["heartbeat_interval"] == 0.5
    mine = [i for i in answer["instances"] if i["state"] == "UP"]
    assert mine and {i["service"] for i in answer["instances"]} == {"requests"}
    queues = {q["name"]: q for q in mine[0]["queues"]}
    assert queues["rpc-requests"]["consumers"] >= 1
    assert "evt-cirrus-heartbeat--requests.on_heartbeat" in queues
    assert not any(name.startswith("rpc.reply") for name in queues)


def test_a_service_process_beats_until_it_stops_cleanly(rpc, status_env, tmp_path):
    proc = start_services(["scheduler"], status_env, tmp_path)[0]
    try:
        def beating():
            found = [i for i in rpc.status(admin_credentials(), "scheduler")["instances"]
                     if i["pid"] == proc.popen.pid]
            # the first beat comes before the service consumes anything
            return found and found[0]["state"] == "UP" and found[0]["queues"] and found[0]
        up = wait_until(beating, timeout=10, what="the scheduler UP with its queues")
    finally:
        proc.stop()
    assert up["name"].startswith("scheduler@") and up["version"] == cirrus.__version__
    assert "evt-lifecycle-vm.state--scheduler.on_vm_state" in [q["name"] for q in up["queues"]]
    assert up["metrics_url"].startswith("http://")
    assert in_state(rpc, up["name"], "STOPPED")["pid"] == proc.popen.pid


def test_status_is_for_administrators_and_cloud_administrators(rpc):
    assert rpc.status(make_user("cloud-admin"))["instances"]
    with refused("PermissionDenied"):
        rpc.status(make_user("finance"))
    with refused("InvalidArgument") as info:
        rpc.status(admin_credentials(), "database")
    assert "choose from requests, scheduler" in info.value.value


def beat(name, started_at, number, stopping=False):
    return {"name": name, "service": "node", "host": "h", "pid": number, "version": "1",
            "started_at": started_at.isoformat(), "beat": number, "stopping": stopping,
            "metrics_url": None, "queues": [], "queue_count": 0, "hosts": [], "host_count": 0}


def row(name):
    with db.session_factory()() as session:
        return session.get(Instance, name)


def record(payload):
    with db.session_factory()() as session, session.begin():
        status.record(session, payload)


def test_a_late_beat_never_overwrites_a_newer_one(cirrus_env):
    name = f"order-{uuid.uuid4().hex[:6]}"
    first = datetime.now(timezone.utc) - timedelta(minutes=5)
    record(beat(name, first, 5, stopping=True))
    record(beat(name, first, 4))                  # handled after the stopping one
    assert (row(name).beat, row(name).stopped_at is not None) == (5, True)
    restarted = first + timedelta(minutes=1)
    record(beat(name, restarted, 1))              # the same name started again
    assert (row(name).beat, row(name).started_at, row(name).stopped_at) == (1, restarted, None)
    record(beat(name, first, 6))                  # the old process's, late
    assert row(name).started_at == restarted


def test_processes_silent_past_forget_after_are_forgotten(rpc):
    name = f"old-{uuid.uuid4().hex[:6]}"
    record(beat(name, datetime.now(timezone.utc), 1))
    with db.session_factory()() as session, session.begin():
        session.execute(update(Instance).where(Instance.name == name)
                        .values(last_seen=Instance.last_seen - timedelta(hours=2)))
    assert listed(rpc, name) is None and row(name) is None
