"""Floors measured in the same run as a benchmark: what the platform cannot beat."""
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOMAIN = """<domain type='test'><name>floor-{i}</name><memory unit='MiB'>8</memory>
<vcpu>1</vcpu><os><type>hvm</type></os></domain>"""


def libvirt_define_create(n, uri="test:///default"):
    """Median seconds of a raw defineXML + create on the same driver, in-process."""
    import libvirt
    conn = libvirt.open(uri)
    times = []
    try:
        for i in range(n):
            start = time.perf_counter()
            dom = conn.defineXML(DOMAIN.format(i=i))
            dom.create()
            times.append(time.perf_counter() - start)
            dom.destroy()
            dom.undefine()
    finally:
        conn.close()
    return statistics.median(times)


def nameko_rpc_round_trip(amqp_uri, n):
    """Median seconds of a bare Nameko RPC to a service that only echoes."""
    from nameko.standalone.rpc import ClusterRpcProxy
    echo = subprocess.Popen([sys.executable, str(Path(__file__).with_name("echo_service.py")),
                             amqp_uri], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().startswith("echo ready")
        with ClusterRpcProxy({"AMQP_URI": amqp_uri, "serializer": "json"}) as proxy:
            proxy.bench_echo.echo(0)    # warm up the reply queue
            times = []
            for i in range(n):
                start = time.perf_counter()
                proxy.bench_echo.echo(i)
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        echo.terminate()
        echo.wait(10)


def rolled_back_seconds(url, work):
    """Seconds ``work(conn, host_ids)`` takes in a transaction that is then rolled back."""
    from sqlalchemy import text
    from cirrus import db
    with db.engine(url).connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM hosts ORDER BY id"))]
        conn.rollback()
        tx = conn.begin()
        start = time.perf_counter()
        work(conn, ids)
        elapsed = time.perf_counter() - start
        tx.rollback()
    return elapsed


def reservation_floor(url, n):
    """Seconds for n raw conditional UPDATEs (the reservation alone) in one transaction."""
    from sqlalchemy import text

    def work(conn, ids):
        for i in range(n):
            conn.execute(text(
                "UPDATE hosts SET cpu_usage = cpu_usage + 100, mem_usage = mem_usage + 1024, "
                "running_vms = running_vms + 1 WHERE id = :id AND state = 'MONITORED' "
                "AND max_cpu - reserved_cpu - cpu_usage >= 100 "
                "AND max_mem - reserved_mem - mem_usage >= 1024 RETURNING id"),
                {"id": ids[i % len(ids)]}).scalar()
    return rolled_back_seconds(url, work)


def confirmed_publish_floor(amqp_uri, n=2000):
    """Seconds per persistent message published with a publisher confirm, as
    the outbox relay publishes each event and command (2 per placed VM)."""
    from kombu import Connection, Exchange, Queue
    exchange = Exchange("bench.floor", type="direct", durable=True, delivery_mode=2)
    queue = Queue("bench.floor", exchange, routing_key="floor", durable=True)
    with Connection(amqp_uri, transport_options={"confirm_publish": True}) as conn:
        with conn.Producer() as producer:
            producer.publish({"warm": True}, exchange=exchange, routing_key="floor",
                             declare=[queue], serializer="json")
            start = time.perf_counter()
            for i in range(n):
                producer.publish({"i": i, "vm": {"id": i, "template": {"CPU": "1"}}},
                                 exchange=exchange, routing_key="floor", serializer="json",
                                 delivery_mode=2)
            elapsed = time.perf_counter() - start
        queue(conn.default_channel).delete()
    return elapsed / n


def set_reservation_floor(url, n, batch=500):
    """Seconds for n VMs reserved set-based, as deploy_many does and nothing
    else: per batch of ``batch`` VMs spread over the hosts, one conditional
    UPDATE ... FROM unnest(arrays) taking each host's share; rolled back."""
    from collections import Counter
    from sqlalchemy import text

    def work(conn, ids):
        for first in range(0, n, batch):
            shares = sorted(Counter(ids[i % len(ids)] for i in range(first, min(n, first + batch)))
                            .items())
            conn.execute(text(
                "UPDATE hosts SET cpu_usage = cpu_usage + need.cpu, "
                "mem_usage = mem_usage + need.memory, running_vms = running_vms + need.vms "
                "FROM unnest(CAST(:hosts AS integer[]), CAST(:cpus AS integer[]), "
                "CAST(:memories AS integer[]), CAST(:counts AS integer[])) "
                "AS need(host_id, cpu, memory, vms) WHERE hosts.id = need.host_id "
                "AND hosts.state = 'MONITORED' "
                "AND hosts.max_cpu - hosts.reserved_cpu - hosts.cpu_usage >= need.cpu "
                "AND hosts.max_mem - hosts.reserved_mem - hosts.mem_usage >= need.memory "
                "RETURNING hosts.id"),
                {"hosts": [h for h, _ in shares], "cpus": [100 * c for _, c in shares],
                 "memories": [1024 * c for _, c in shares], "counts": [c for _, c in shares]}
            ).all()
    return rolled_back_seconds(url, work)


# ---------------------------------------------------------------- HTTP

HELLO_SERVER = """
import warnings; warnings.simplefilter("ignore")
import eventlet; eventlet.monkey_patch()
import os, sys
from eventlet import wsgi
from werkzeug.wrappers import Request, Response
def app(environ, start_response):
    Request(environ).get_data()
    return Response('{"hello": "world"}', content_type='application/json')(environ, start_response)
sock = eventlet.listen(('127.0.0.1', 0), backlog=1024)
for _ in range(int(sys.argv[1]) - 1):
    if os.fork() == 0:
        break
print(sock.getsockname()[1], flush=True)
wsgi.server(sock, app, log=None, log_output=False, max_size=2000)
"""


def http_load(port, requests, seconds, connections=32, host="127.0.0.1"):
    """Requests per second over ``connections`` keep-alive connections for
    ``seconds``, cycling through ``requests`` (raw HTTP/1.1 bytes); returns
    (rate, {status: count})."""
    import asyncio
    from collections import Counter

    async def one(index, stop_at, counts):
        reader, writer = await asyncio.open_connection(host, port)
        i = index
        while time.perf_counter() < stop_at:
            writer.write(requests[i % len(requests)])
            i += connections
            status = int((await reader.readline()).split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            counts[status] += 1
        writer.close()

    async def run():
        counts = Counter()
        start = time.perf_counter()
        await asyncio.gather(*(one(i, start + seconds, counts) for i in range(connections)))
        return sum(counts.values()) / (time.perf_counter() - start), dict(counts)

    return asyncio.run(run())


def werkzeug_hello_rps(seconds=5, processes=1, connections=32):
    """Requests per second of a bare Werkzeug hello world on eventlet's WSGI
    server (the gate's server, with nothing behind it), ``processes`` forked
    on one socket as the gate runs them."""
    import os
    import signal
    server = subprocess.Popen([sys.executable, "-c", HELLO_SERVER, str(processes)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = int(server.stdout.readline())
        request = b"GET / HTTP/1.1\r\nHost: floor\r\n\r\n"
        http_load(port, [request], 1, connections)        # warm up
        return http_load(port, [request], seconds, connections)[0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
