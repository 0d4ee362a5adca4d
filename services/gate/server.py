"""``cirrus-gate``: the OneGate HTTP server.

``gate.processes`` processes, each an eventlet WSGI server on a listening
socket of its own (SO_REUSEPORT; where that is missing, one socket bound
before the fork and shared): a green thread per
connection, psycopg2 made cooperative, ``gate.db_pool`` database
connections. Reads are SQL on that pool; user template writes commit
through the process's outbox relay; scaling and VM actions are Nameko RPCs
to flow and lifecycle through a small pool of standalone proxies (one per
call in flight, reused).
"""
import cirrus  # noqa: F401  (silences eventlet's deprecation warning before the import)
import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from psycogreen.eventlet import patch_psycopg  # noqa: E402

patch_psycopg()

log = logging.getLogger("cirrus.gate")


class RpcPool:
    """flow.scale and lifecycle.vm_action through standalone Nameko proxies,
    at most ``size`` at once; a remote CirrusError comes back as itself."""

    def __init__(self, amqp_uri, size=4, timeout=30):
        from eventlet import pools
        self.config = {"AMQP_URI": amqp_uri, "serializer": "json"}
        self.timeout = timeout
        self.pool = pools.Pool(max_size=size, create=self._make)
        self.made = []

    def _make(self):
        from nameko.standalone.rpc import ClusterRpcProxy
        runner = ClusterRpcProxy(self.config, timeout=self.timeout)
        self.made.append(runner)
        return runner.start()

    def call(self, service, method, *args):
        from nameko.exceptions import RemoteError
        from cirrus import errors
        with self.pool.item() as proxy:
            try:
                return getattr(getattr(proxy, service), method)(*args)
            except RemoteError as exc:
                raise errors.from_remote(exc) from None

    def scale(self, service_id, role, cardinality):
        return self.call("flow", "scale", service_id, role, cardinality, False)

    def vm_action(self, vm_id, action, options):
        return self.call("lifecycle", "vm_action", vm_id, action, options)

    def close(self):
        for runner in self.made:
            try:
                runner.stop()
            except Exception:
                log.debug("stopping a proxy failed", exc_info=True)


def make_app(cfg):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from cirrus.db import raise_unavailable
    from cirrus.outbox import Relay
    from services.gate.app import Gate
    from services.gate import store
    from services.gate.security import Settings
    from sqlalchemy import event

    gate = cfg.get("gate") or {}
    database = cfg["database"]
    connect = {"connect_timeout": database.get("connect_timeout", 5)}
    pool = int(gate.get("db_pool", 8))
    # reads are single statements on connections kept in autocommit: no
    # BEGIN, and nothing to roll back when a connection goes back to the pool;
    # no overflow: a connection made for a burst and closed after it costs
    # more than waiting for a pooled one
    reads = create_engine(database["url"], pool_size=pool, max_overflow=0, pool_timeout=30,
                          isolation_level="AUTOCOMMIT", pool_reset_on_return=None,
                          connect_args=connect)
    event.listen(reads, "connect", store.prepare)
    # writes: transactions of the outbox relay (gathered by store.Writes)
    writes = create_engine(database["url"], pool_size=max(2, pool // 4), max_overflow=2,
                           pool_timeout=30, connect_args=connect)
    for engine in (reads, writes):
        event.listen(engine, "handle_error", raise_unavailable)
    sessions = sessionmaker(bind=writes, expire_on_commit=False)
    relay = Relay(cfg["amqp"]["uri"], sessions)
    rpc = RpcPool(cfg["amqp"]["uri"])
    return Gate(Settings.from_config(gate), reads, relay, sessions, rpc), rpc


def serve(sock, cfg, name, tls=None, children=()):
    """Answer on ``sock`` until SIGTERM/SIGINT, which stops ``children`` first;
    over TLS with ``tls``, the (certificate, key) paths."""
    from eventlet import wsgi
    from cirrus import heartbeat
    app, rpc = make_app(cfg)
    log.info("%s listening on %s:%s (%s)", name, *sock.getsockname()[:2],
             "TLS" if tls else "plaintext")
    if tls:
        sock = eventlet.wrap_ssl(sock, certfile=tls[0], keyfile=tls[1], server_side=True)

    def stop(signum, frame):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # in a green thread: the handler may run in the hub, which cannot wait
        eventlet.spawn_n(leave)

    def leave():
        heartbeat.stop()
        rpc.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wsgi.server(sock, app, log=None, log_output=False, max_size=2000, keepalive=True,
                socket_timeout=60)


def listen(address, port, reuse_port):
    return eventlet.listen((address, port), backlog=1024, reuse_port=reuse_port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cirrus-gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="listen here (default gate.address)")
    parser.add_argument("--port", type=int, help="listen on this port (default gate.port)")
    parser.add_argument("--processes", type=int, help="server processes (default gate.processes)")
    args = parser.parse_args(argv)

    from cirrus import config
    from cirrus import heartbeat, instance, metrics
    instance.start("gate")
    cfg = config.get()
    gate = cfg.get("gate") or {}
    address = args.address or gate.get("address", "127.0.0.1")
    port = args.port if args.port is not None else int(gate.get("port", 5030))
    processes = max(1, args.processes or int(gate.get("processes", 1)))
    try:
        tls = config.tls_files("gate", gate)
    except config.ConfigError as exc:
        print(f"cirrus-gate: configuration: {exc}", file=sys.stderr)
        return 2
    # several processes: each its own socket on the port (SO_REUSEPORT), so the
    # kernel spreads connections instead of every process waking on each one
    reuse_port = processes > 1 and hasattr(socket, "SO_REUSEPORT")
    try:
        sock = listen(address, port, reuse_port)
    except OSError as exc:
        print(f"cirrus-gate: cannot listen on {address}:{port}: {exc.strerror}", file=sys.stderr)
        return 2
    children = []
    heartbeat.stop(final=False)         # started again in each process after the forks
    for index in range(1, processes):
        pid = os.fork()
        if pid == 0:
            identity = instance.identify("gate", f"{instance.current().name}/{index}")
            metrics.serve(identity, index)      # on its own port (the gate's + index), which
            heartbeat.start(identity)           # the first beat then reports
            if reuse_port:
                sock.close()            # the parent's; this process answers on its own
                sock = listen(address, port, True)
            serve(sock, cfg, f"gate process {index + 1}/{processes}", tls)
            os._exit(0)
        children.append(pid)

    heartbeat.start(instance.current())
    log.info("gate started on %s:%s (%d process(es))", address, port, processes)
    serve(sock, cfg, f"gate process 1/{processes}", tls, children)
    return 0


if __name__ == "__main__":
    sys.exit(main())
