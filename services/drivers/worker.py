"""cirrus-node: the driver worker of one hypervisor node.

It consumes the node's durable queue, runs each command on a backend in a
thread pool, and answers with a ``command.result`` event; every
``monitor_interval`` seconds it also sends a ``host.monitor`` event.

kombu is not thread safe, so only the main thread touches the broker: pool
threads hand their results back through a queue and wake it through a pipe.
A command is acked only after its result is confirmed by the broker
(publisher confirms), so a worker that dies mid-command gets it redelivered,
and the backend, being idempotent, does it again harmlessly. After a broker
restart it reconnects; results finished meanwhile are published then, and
their commands, whose deliveries died with the old channel, come back and
are answered again (lifecycle takes only the first result of a command id).
"""
import argparse
import collections
import concurrent.futures
import datetime
import json
import logging
import os
import queue
import select
import signal
import socket
import threading
import time

from kombu import Connection, Consumer, Producer
from kombu.exceptions import OperationalError

from cirrus import config, messages
from cirrus.logs import setup_logging
from services.drivers.backend import domain_name

log = logging.getLogger("cirrus.node")

HEARTBEAT = 10          # seconds; lets a dead broker connection be noticed
STOP_GRACE = 30         # seconds running commands may take to finish on SIGTERM


# ---------------------------------------------------------------- commands

def deploy_id_of(vm):
    return vm.get("deploy_id") or domain_name(vm["id"])


def _deploy(backend, vm, timeout):
    return {"deploy_id": backend.deploy(vm)}


def _shutdown(backend, vm, timeout):
    backend.shutdown(deploy_id_of(vm), timeout)
    return {}


def _cancel(backend, vm, timeout):
    backend.cancel(deploy_id_of(vm))
    return {}


def _poll(backend, vm, timeout):
    return backend.poll(deploy_id_of(vm))


def _clone(backend, vm, timeout):
    return backend.clone(vm)


def _delete(backend, vm, timeout):
    backend.delete(vm)
    return {}


ACTIONS = {"deploy": _deploy, "shutdown": _shutdown, "cancel": _cancel, "poll": _poll,
           "clone": _clone, "delete": _delete}
assert set(ACTIONS) <= set(messages.DRIVER_ACTIONS)  # TODO(driver helper): ==


def command_problem(cmd):
    """What is wrong with a command, or None if it can be run."""
    if not isinstance(cmd, dict):
        return f"a command must be a JSON object, got {type(cmd).__name__}"
    if not cmd.get("id"):
        return "command has no id"
    if cmd.get("action") not in ACTIONS:
        return (f"unknown action {cmd.get('action')!r}; "
                f"expected one of {', '.join(messages.DRIVER_ACTIONS)}")
    args = cmd.get("args")
    vm = args.get("vm") if isinstance(args, dict) else None
    if not isinstance(vm, dict):
        return "args.vm: missing; it must be an object describing the VM"
    if isinstance(vm.get("id"), bool) or not isinstance(vm.get("id"), int):
        return f"args.vm.id: must be an integer VM id, got {vm.get('id')!r}"
    if cmd.get("vm_id") != vm["id"]:
        return f"vm_id {cmd.get('vm_id')!r} does not match args.vm.id {vm['id']!r}"
    return None


def command_fields(cmd):
    """The fields a result echoes, from whatever arrived."""
    cmd = cmd if isinstance(cmd, dict) else {}
    return {key: cmd.get(key) for key in ("id", "action", "vm_id", "host")}


def run_command(backend, cmd, shutdown_timeout):
    """Run one command; always returns a result, SUCCESS or FAILURE."""
    problem = command_problem(cmd)
    if problem:
        log.warning("rejected command %r: %s", cmd, problem)
        return messages.result(command_fields(cmd), False, error=problem)
    vm = cmd["args"]["vm"]
    try:
        info = ACTIONS[cmd["action"]](backend, vm, shutdown_timeout)
        json.dumps(info)        # fail here, not later when publishing the result
    except Exception as exc:     # any driver failure is the command's FAILURE
        error = str(exc) or type(exc).__name__
        log.warning("%s of VM %s failed: %s", cmd["action"], vm["id"], error)
        return messages.result(cmd, False, error=error)
    log.info("%s of VM %s done", cmd["action"], vm["id"])
    return messages.result(cmd, True, info)


# ---------------------------------------------------------------- the worker

def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class NodeWorker:

    def __init__(self, host, backend, amqp_uri, threads=4, monitor_interval=3,
                 shutdown_timeout=30):
        self.host = host
        self.backend = backend
        self.amqp_uri = amqp_uri
        self.threads = threads
        self.monitor_interval = monitor_interval
        self.shutdown_timeout = shutdown_timeout
        self.queue = messages.node_queue(host)
        self.events = messages.event_exchange(messages.NODE)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="command")
        self.vm_locks = {}                      # VM id -> lock: its commands run one at a time
        self.vm_locks_guard = threading.Lock()
        self.running = set()                    # futures of commands not yet answered
        self.finished = queue.Queue()           # (message, result) from pool threads
        self.outbox = collections.deque()       # (message or None, event type, body) to publish
        self.latest_monitor = None              # the newest report not yet published
        self.monitor_lock = threading.Lock()
        self.stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # ------------------------------------------------------------ main loop

    def run(self):
        monitor = threading.Thread(target=self.monitor_loop, name="monitor", daemon=True)
        monitor.start()
        delay = 1
        while not self.stopping.is_set():
            conn = Connection(self.amqp_uri, heartbeat=HEARTBEAT, transport_options={
                "confirm_publish": True,
                "client_properties": {"connection_name": f"cirrus-node:{self.host}"}})
            errors = conn.connection_errors + conn.channel_errors + (OperationalError,)
            try:
                conn.ensure_connection(max_retries=1)
                log.info("connected to the broker, consuming %s", self.queue.name)
                delay = 1
                self.serve(conn)
            except errors as exc:
                log.warning("broker connection lost (%s); reconnecting in %s s", exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10)
            finally:
                try:
                    conn.release()
                except Exception:
                    pass
        self.backend.close()
        log.info("stopped")

    def serve(self, conn):
        channel = conn.channel()
        producer = Producer(channel, exchange=self.events, serializer="json")
        self.events(channel).declare()
        consumer = Consumer(channel, queues=[self.queue], callbacks=[self.on_message],
                            on_decode_error=self.on_decode_error, accept=["json"],
                            prefetch_count=self.threads * 2)
        with consumer:
            self.flush(producer, channel)
            while not self.stopping.is_set():
                self.wait(conn)
                self.flush(producer, channel)
        self.finish_running(conn, producer, channel)

    def wait(self, conn, timeout=1.0):
        """Sleep until the broker sends something, a result is ready, or ``timeout``,
        then read what the broker sent. py-amqp reads one frame per call and
        never more than that frame from the socket, so once the socket is quiet
        nothing is waiting in its buffer."""
        sock = conn.connection.sock
        readable, _, _ = select.select([sock, self._wake_read], [], [], timeout)
        if self._wake_read in readable:
            try:
                os.read(self._wake_read, 4096)
            except BlockingIOError:
                pass
        while sock in readable:
            try:
                conn.drain_events(timeout=0.1)
            except socket.timeout:
                break
            readable, _, _ = select.select([sock], [], [], 0)
        conn.heartbeat_check()

    def wake(self):
        try:
            os.write(self._wake_write, b".")
        except BlockingIOError:
            pass        # the pipe is full: the main loop is waking anyway

    def flush(self, producer, channel):
        """Publish what is ready, acking each command once its result is confirmed."""
        while True:
            try:
                message, result = self.finished.get_nowait()
            except queue.Empty:
                break
            self.outbox.append((message, messages.COMMAND_RESULT, result))
        with self.monitor_lock:
            report, self.latest_monitor = self.latest_monitor, None
        if report is not None:
            self.outbox.append((None, messages.HOST_MONITOR, report))
        while self.outbox:
            message, event_type, body = self.outbox[0]
            producer.publish(body, exchange=self.events, routing_key=event_type,
                             serializer="json", delivery_mode=2, retry=False)
            self.outbox.popleft()
            # a delivery from a channel lost since will be redelivered anyway
            if message is not None and message.channel is channel:
                message.ack()

    def finish_running(self, conn, producer, channel):
        """On stop: drop commands not started (their messages go back to the queue
        unacked), and answer those running, for up to STOP_GRACE seconds."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_GRACE
        while self.running and time.monotonic() < deadline:
            self.wait(conn, timeout=0.5)
            self.flush(producer, channel)
        self.flush(producer, channel)

    # ------------------------------------------------------------ messages

    def on_message(self, body, message):
        if message.delivery_info.get("redelivered"):
            log.info("redelivered command %s", command_fields(body)["id"])
        try:
            future = self.pool.submit(self.execute, body)
        except RuntimeError:
            return      # stopping: leave it unacked, it goes back to the queue
        self.running.add(future)
        future.add_done_callback(lambda done: self.on_done(message, done))

    def on_decode_error(self, message, exc):
        log.warning("undecodable command: %s", exc)
        error = f"the command is not a JSON object ({message.content_type}): {exc}"
        self.outbox.append((message, messages.COMMAND_RESULT,
                            messages.result(command_fields(None), False, error=error)))
        self.wake()

    def execute(self, cmd):
        """In a pool thread. Commands for one VM (e.g. a redelivered deploy and
        its first copy) run one after the other, never side by side."""
        if command_problem(cmd):
            return run_command(self.backend, cmd, self.shutdown_timeout)
        vm_id = cmd["vm_id"]
        with self.vm_locks_guard:
            lock = self.vm_locks.setdefault(vm_id, threading.Lock())
        with lock:
            result = run_command(self.backend, cmd, self.shutdown_timeout)
        if cmd["action"] == "delete" and result["success"]:
            with self.vm_locks_guard:
                self.vm_locks.pop(vm_id, None)      # the VM is gone from this node
        return result

    def on_done(self, message, future):
        """In a pool thread: hand the result to the main thread."""
        self.running.discard(future)
        if future.cancelled():
            return
        self.finished.put((message, future.result()))
        self.wake()

    # ------------------------------------------------------------ monitoring

    def monitor_loop(self):
        """Report at once, then every monitor_interval seconds."""
        while not self.stopping.is_set():
            try:
                monitoring = self.backend.monitor()
            except Exception as exc:
                log.error("host monitoring failed: %s", exc)
            else:
                with self.monitor_lock:
                    self.latest_monitor = {"host": self.host, "monitoring": monitoring,
                                           "at": now_iso()}
                self.wake()
            self.stopping.wait(self.monitor_interval)

    def stop(self, *_signal):
        self.stopping.set()
        self.wake()


# ---------------------------------------------------------------- entry point

def make_backend(args, settings):
    if args.backend == "simulated":
        from services.drivers.simulated import SimulatedBackend
        return SimulatedBackend(cores=args.sim_cores, memory_mb=args.sim_memory,
                                delay=args.sim_delay)
    from services.drivers.libvirt_backend import LibvirtBackend
    return LibvirtBackend(args.uri, args.datastore, settings.get("shutdown_timeout", 30),
                          domain_type=args.domain_type)


def parse_args(argv, settings):
    parser = argparse.ArgumentParser(prog="cirrus-node", description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="the host name this node serves")
    parser.add_argument("--uri", default=settings.get("uri", "test:///default"),
                        help="libvirt URI (default: drivers.uri)")
    parser.add_argument("--backend", choices=("libvirt", "simulated"),
                        default=settings.get("backend", "libvirt"))
    parser.add_argument("--datastore", default=settings.get("datastore"),
                        help="system datastore directory (default: drivers.datastore)")
    parser.add_argument("--domain-type", choices=("kvm", "qemu", "test"),
                        help="libvirt domain type (default: from the URI and /dev/kvm)")
    parser.add_argument("--sim-cores", type=int, default=16, help="simulated host cores")
    parser.add_argument("--sim-memory", type=int, default=32768, help="simulated host MB")
    parser.add_argument("--sim-delay", type=float, default=0.0,
                        help="seconds each simulated action takes")
    args = parser.parse_args(argv)
    if not args.host.strip():
        parser.error("--host: must not be empty")
    if args.backend == "libvirt" and not args.datastore:
        parser.error("--datastore: not given and no drivers.datastore in the configuration")
    return args


def main(argv=None):
    settings = config.get().get("drivers", {})
    args = parse_args(argv, settings)
    setup_logging("node:" + args.host)
    worker = NodeWorker(args.host, make_backend(args, settings), config.get()["amqp"]["uri"],
                        threads=int(settings.get("threads", 4)),
                        monitor_interval=float(settings.get("monitor_interval", 3)),
                        shutdown_timeout=float(settings.get("shutdown_timeout", 30)))
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    log.info("node %s on %s (%s backend)", args.host, args.uri, args.backend)
    worker.run()


if __name__ == "__main__":
    main()
