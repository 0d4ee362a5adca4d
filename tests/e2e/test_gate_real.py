"""OneGate's reference scenario for real: a 2-role straight service with the
READY gate on qemu:///system. Each tiny guest boots, reads its context CD
and pushes READY=YES through the gate over qemu user-mode networking (the
host is 10.0.2.2, mapped to the host's loopback where the gate listens);
the slave role deploys once the master said READY. Skipped with
CIRRUS_SKIP_QEMU=1."""
import os
import time

import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import Cluster
from tests.e2e.test_real_guests import remove_domains_under, tiny_guest, tiny_template  # noqa: F401
from tests.procs import wait_until

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1"),
]


@pytest.fixture
def gate_cluster(tmp_path_factory):
    """A qemu:///system cluster whose gate listens on a port of its own,
    which the guests reach as 10.0.2.2."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), nodes=("qemu-1",), uri="qemu:///system")
    cluster.env["CIRRUS_GATE_ENDPOINT"] = f"http://10.0.2.2:{cluster.gate_port}"
    cluster.start().isolate_vm_ids()
    try:
        yield cluster
    finally:
        remove_domains_under(cluster.datastore)
        cluster.stop()


def test_real_guests_push_ready_through_the_gate_and_the_child_role_follows(
        gate_cluster, tiny_guest, tmp_path):   # noqa: F811
    cluster = gate_cluster
    net = tmp_path / "gate.net"
    net.write_text('NAME = "gate-net"\nNETWORK_MASK = "255.255.255.0"\n'
                   'AR = [ TYPE = IP4, IP = 192.168.151.20, SIZE = 4 ]\n')
    cluster.cli("vnet", "create", "--file", net)
    guest = tiny_template(tiny_guest, 128, 'NIC = [ NETWORK = "gate-net" ]\n'
                                           'CONTEXT = [ TOKEN = "YES", REPORT_READY = "YES" ]\n')
    api = cluster.client(timeout=60)
    template = api.create_flow_template({
        "name": "gate-real", "deployment": "straight", "ready_status_gate": True,
        "roles": [{"name": "master", "cardinality": 1, "vm_template_contents": guest},
                  {"name": "slave", "cardinality": 1, "parents": ["master"],
                   "vm_template_contents": guest}]})
    started = time.monotonic()
    sid = api.instantiate_flow_template(template["id"])["id"]
    wait_until(lambda: api.get_flow(sid)["state"] == "RUNNING", timeout=300, interval=0.5,
               what="the service RUNNING")
    took = time.monotonic() - started
    print(f"instantiate -> RUNNING with 2 real TCG guests: {took:.1f} s")

    roles = {r["name"]: r for r in api.get_flow(sid)["roles"]}
    [master] = [n["vm_id"] for n in roles["master"]["nodes"]]
    [slave] = [n["vm_id"] for n in roles["slave"]["nodes"]]
    engine = create_engine(cluster.db_url)
    with engine.connect() as conn:
        def ready_at(vm_id):
            return conn.execute(text(
                "SELECT min(at) FROM audit_log WHERE actor = :actor AND action = 'gate.vm.update' "
                "AND details -> 'set' ->> 'READY' = 'YES'"), {"actor": f"vm:{vm_id}"}).scalar()
        master_ready, slave_ready = ready_at(master), ready_at(slave)
        slave_made = conn.execute(text("SELECT created_at FROM vms WHERE id = :id"),
                                  {"id": slave}).scalar()
        templates = dict(conn.execute(text(
            "SELECT id, template -> 'USER_TEMPLATE' ->> 'READY' FROM vms WHERE id IN (:a, :b)"),
            {"a": master, "b": slave}).all())
    engine.dispose()
    # both guests said READY through the gate; the slave was made only after the master did
    assert master_ready is not None and slave_ready is not None
    assert templates == {master: "YES", slave: "YES"}
    assert slave_made >= master_ready
    for vm_id in (master, slave):
        log = cluster.datastore / str(vm_id) / "console.log"
        assert "ONEGATE READY=YES sent" in log.read_text(errors="replace")

    api.delete_flow(sid)
    wait_until(lambda: api.get_flow(sid)["state"] == "DONE", timeout=120, interval=0.5,
               what="the service DONE")
