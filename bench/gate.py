"""OneGate: requests per second of PUT /vm and GET /service, and the time
from a guest's READY=YES to the child role's first VM.

    .venv/bin/python bench/gate.py [--seconds 10] [--connections 32] [--processes 1] [--ready-n 5]

Starts a cluster of its own (cirrus-launch: fresh database and vhost, one
node on test:///default, the gate with no rate limit), makes ``ready-n``
straight 2-role services with the READY gate (master, then slave) whose
VMs have a OneGate token, and for each pushes the master's READY=YES
through the gate and notes when the slave's first VM row is written. Then
it loads the gate over ``connections`` keep-alive connections: PUT /vm
from every VM of those services, and GET /service. Floors in the same
run: a bare Werkzeug hello world on the same server (eventlet WSGI, same
processes) and a bare Nameko RPC round trip. The last line is one JSON
object.
"""
import argparse
import json
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402
from vm_pipeline import BenchCluster, percentile  # noqa: E402

VM = "CPU = 0.05\nMEMORY = 8\nCONTEXT = [ TOKEN = \"YES\" ]\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"{what}: not in {timeout} s")


def put(url, vm_id, token, body):
    request = urllib.request.Request(url + "/vm", data=body.encode(), method="PUT", headers={
        "X-ONEGATE-VMID": str(vm_id), "X-ONEGATE-TOKEN": token})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status


def raw(method, path, vm_id, token, body=b""):
    return (f"{method} {path} HTTP/1.1\r\nHost: gate\r\nX-ONEGATE-VMID: {vm_id}\r\n"
            f"X-ONEGATE-TOKEN: {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--ready-n", type=int, default=5)
    args = parser.parse_args()

    from sqlalchemy import create_engine, text
    from cirrus.client import Client

    cluster = BenchCluster(port=free_port())
    gate_port = free_port()
    cluster.env.update(CIRRUS_GATE_PORT=str(gate_port), CIRRUS_GATE_RATE="0",
                       CIRRUS_GATE_PROCESSES=str(args.processes),
                       CIRRUS_GATE_ENDPOINT=f"http://127.0.0.1:{gate_port}")
    url = f"http://127.0.0.1:{gate_port}"
    with cluster:
        admin = Client(cluster.address, username="admin", password="cirrus")
        api = Client(cluster.address, token=admin.login()["token"])
        host = api.list_hosts()[0]["id"]
        wait(lambda: api.get_host(host)["state"] == "MONITORED", 60, "host MONITORED")
        engine = create_engine(cluster.env["CIRRUS_DATABASE_URL"])
        template = api.create_flow_template({
            "name": "bench-gate", "deployment": "straight", "ready_status_gate": True,
            "roles": [{"name": "master", "cardinality": 1, "vm_template_contents": VM},
                      {"name": "slave", "cardinality": 1, "parents": ["master"],
                       "vm_template_contents": VM}]})

        def nodes(service_id, role):
            roles = {r["name"]: r for r in api.get_flow(service_id)["roles"]}
            return roles[role].get("nodes") or []

        def token(vm_id):
            with engine.connect() as conn:
                return conn.execute(text("SELECT token FROM vm_devices WHERE vm_id = :id"),
                                    {"id": vm_id}).scalar()

        def first_slave_created(service_id):
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT min(v.created_at) FROM flow_nodes n JOIN flow_roles r "
                    "ON r.id = n.role_id JOIN vms v ON v.id = n.vm_id "
                    "WHERE n.service_id = :id AND r.name = 'slave'"), {"id": service_id}).scalar()

        ready_ms, guests = [], []
        for _ in range(args.ready_n):
            service_id = api.instantiate_flow_template(template["id"])["id"]
            [master] = wait(lambda: [n for n in nodes(service_id, "master")
                                     if n["status"] == "RUNNING"], 60, "master RUNNING")
            master_token = wait(lambda: token(master["vm_id"]), 10, "master's token")
            pushed = time.time()
            assert put(url, master["vm_id"], master_token, "READY = YES") == 200
            created = wait(lambda: first_slave_created(service_id), 30, "slave's first VM")
            ready_ms.append((created.timestamp() - pushed) * 1000)
            [slave] = wait(lambda: [n for n in nodes(service_id, "slave")
                                    if n["status"] == "RUNNING"], 60, "slave RUNNING")
            guests += [(master["vm_id"], master_token),
                       (slave["vm_id"], wait(lambda: token(slave["vm_id"]), 10, "token"))]

        puts = [raw("PUT", "/vm", vm, tok, f"LOAD = {i}".encode())
                for i in range(10) for vm, tok in guests]
        gets = [raw("GET", "/service", vm, tok) for vm, tok in guests]
        floors.http_load(gate_port, gets, 1, args.connections)          # warm up
        put_rps, put_codes = floors.http_load(gate_port, puts, args.seconds, args.connections)
        get_rps, get_codes = floors.http_load(gate_port, gets, args.seconds, args.connections)
        rpc_ms = floors.nameko_rpc_round_trip(cluster.amqp_uri, 300) * 1000
        engine.dispose()
    hello_rps = floors.werkzeug_hello_rps(args.seconds, args.processes, args.connections)

    print(f"PUT /vm        {put_rps:8.0f} req/s  {put_codes}")
    print(f"GET /service   {get_rps:8.0f} req/s  {get_codes}")
    print(f"  floor: Werkzeug hello world on the same server: {hello_rps:.0f} req/s")
    print(f"READY=YES -> child's first VM: median {statistics.median(ready_ms):.1f} ms, "
          f"max {max(ready_ms):.1f} ms over {len(ready_ms)} services")
    print(f"  floor: bare Nameko RPC round trip {rpc_ms:.2f} ms")
    print(json.dumps({
        "bench": "gate", "processes": args.processes, "connections": args.connections,
        "put_vm_rps": round(put_rps), "get_service_rps": round(get_rps),
        "put_vm_statuses": put_codes, "get_service_statuses": get_codes,
        "ready_to_child_ms_median": round(statistics.median(ready_ms), 1),
        "ready_to_child_ms_p90": round(percentile(ready_ms, 90), 1),
        "floor_werkzeug_hello_rps": round(hello_rps),
        "floor_rpc_round_trip_ms": round(rpc_ms, 2)}))


if __name__ == "__main__":
    main()
