"""cirrus-node: the driver worker of one hypervisor node.

It consumes the node's durable queue, runs each command on a backend in a
thread pool, and answers with a ``command.result`` event; every
``monitor_interval`` seconds it also sends a ``host.monitor`` event, marked
``"sync": true`` when lifecycle should reconcile VM states from it: on the
first report after the worker starts or (re)connects to the broker or to the
hypervisor, and every ``sync_interval`` seconds. Whenever a Cirrus domain
changes state, whoever changed it, the backend's watch callback makes a
``vm.event`` that is published at once, not at the next report.

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
from services.drivers.backend import MV_DIRECTIONS, domain_name, vm_id_of

log = logging.getLogger("cirrus.node")

HEARTBEAT = 10          # seconds; lets a dead broker connection be noticed
STOP_GRACE = 30         # seconds running commands may take to finish on SIGTERM


# ---------------------------------------------------------------- commands

def deploy_id_of(vm):
    return vm.get("deploy_id") or domain_name(vm["id"])


def _deploy(backend, vm, args, timeout):
    return {"deploy_id": backend.deploy(vm)}


def _shutdown(backend, vm, args, timeout):
    backend.shutdown(deploy_id_of(vm), timeout)
    return {}


def _cancel(backend, vm, args, timeout):
    backend.cancel(deploy_id_of(vm))
    return {}


def _poll(backend, vm, args, timeout):
    return backend.poll(deploy_id_of(vm))


def _save(backend, vm, args, timeout):
    return backend.save(vm)


def _restore(backend, vm, args, timeout):
    return {"deploy_id": backend.restore(vm)}


def _reboot(backend, vm, args, timeout):
    backend.reboot(deploy_id_of(vm))
    return {}


def _reset(backend, vm, args, timeout):
    backend.reset(deploy_id_of(vm))
    return {}


def _migrate(backend, vm, args, timeout):
    return backend.migrate(vm, args["dest_host"], args["dest_uri"])


def _clone(backend, vm, args, timeout):
    return backend.clone(vm)


def _mv(backend, vm, args, timeout):
    return backend.mv(vm, args["direction"], args.get("from_dir"))


def _delete(backend, vm, args, timeout):
    return backend.delete(vm) or {}


ACTIONS = {"deploy": _deploy, "shutdown": _shutdown, "cancel": _cancel, "poll": _poll,
           "save": _save, "restore": _restore, "reboot": _reboot, "reset": _reset,
           "migrate": _migrate, "clone": _clone, "mv": _mv, "delete": _delete}
assert set(ACTIONS) == set(messages.DRIVER_ACTIONS)


def text_problem(args, key, action, required=True):
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        return f"args.{key}: {action} needs a non-empty string, got {value!r}"
    return None


def args_problem(action, args):
    """What is wrong with an action's own arguments, or None."""
    runtime = args["vm"].get("runtime")
    if runtime is not None and not isinstance(runtime, dict):
        return f"args.vm.runtime: must be an object, got {type(runtime).__name__}"
    if action == "migrate":
        return text_problem(args, "dest_host", action) or text_problem(args, "dest_uri", action)
    if action == "mv":
        if args.get("direction") not in MV_DIRECTIONS:
            return (f"args.direction: mv needs one of {', '.join(MV_DIRECTIONS)}, "
                    f"got {args.get('direction')!r}")
        return text_problem(args, "from_dir", action, required=False)
    return None


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
    return args_problem(cmd["action"], args)


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
        info = ACTIONS[cmd["action"]](backend, vm, cmd["args"], shutdown_timeout)
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
                 shutdown_timeout=30, sync_interval=60):
        self.host = host
        self.backend = backend
        self.amqp_uri = amqp_uri
        self.threads = threads
        self.monitor_interval = monitor_interval
        self.sync_interval = sync_interval
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
        self.sync_pending = True                # the next report is a sync report
        self.monitor_lock = threading.Lock()
        self.monitor_now = threading.Event()    # wakes the monitor loop early
        self.vm_events = collections.deque()    # vm.event bodies from the backend's watch
        self.stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # ------------------------------------------------------------ main loop

    def run(self):
        self.backend.watch(self.on_domain_event)
        monitor = threading.Thread(target=self.monitor_loop, name="monitor", daemon=True)
        monitor.start()
        delay = 1
        connected_before = False
        while not self.stopping.is_set():
            conn = Connection(self.amqp_uri, heartbeat=HEARTBEAT, transport_options={
                "confirm_publish": True,
                "client_properties": {"connection_name": f"cirrus-node:{self.host}"}})
            errors = conn.connection_errors + conn.channel_errors + (OperationalError,)
            try:
                conn.ensure_connection(max_retries=1)
                log.info("connected to the broker, consuming %s", self.queue.name)
                delay = 1
                if connected_before:
                    self.request_sync()     # lifecycle missed whatever we lost meanwhile
                connected_before = True
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
        """Publish what is ready, acking each command once its result is confirmed.
        Domain events go first: they happened before any result now waiting (a
        save's domain stops before the save returns)."""
        while self.vm_events:
            self.outbox.append((None, messages.VM_EVENT, self.vm_events.popleft()))
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
        """Report at once, then every monitor_interval seconds (or sooner when a
        sync is asked for)."""
        last_sync = None
        reconnects = self.backend.reconnects
        while not self.stopping.is_set():
            self.monitor_now.clear()
            try:
                monitoring = self.backend.monitor()
            except Exception as exc:
                log.error("host monitoring failed: %s", exc)
            else:
                now = time.monotonic()
                if self.backend.reconnects != reconnects:
                    reconnects = self.backend.reconnects    # its events may have been lost
                    self.sync_pending = True
                report = {"host": self.host, "monitoring": monitoring, "at": now_iso()}
                with self.monitor_lock:
                    previous = self.latest_monitor
                    report["sync"] = (self.sync_pending or last_sync is None
                                      or now - last_sync >= self.sync_interval
                                      # never drop the sync of a report not yet sent
                                      or bool(previous and previous["sync"]))
                    self.sync_pending = False
                    self.latest_monitor = report
                if report["sync"]:
                    last_sync = now
                self.wake()
            self.monitor_now.wait(self.monitor_interval)

    def request_sync(self):
        """Make the next report, sent at once, a sync report."""
        with self.monitor_lock:
            self.sync_pending = True
        self.monitor_now.set()

    def on_domain_event(self, deploy_id, state, reason):
        """In the backend's event thread: hand a vm.event to the main thread, which
        alone touches the broker, and wake it to publish it now."""
        vm_id = vm_id_of(deploy_id)
        if vm_id is None:
            return      # not a domain Cirrus made
        self.vm_events.append({"host": self.host, "vm_id": vm_id, "deploy_id": deploy_id,
                               "state": state, "reason": reason, "at": now_iso()})
        self.wake()

    def stop(self, *_signal):
        self.stopping.set()
        self.monitor_now.set()
        self.wake()


# ---------------------------------------------------------------- entry point

def make_backend(args, settings):
    if args.backend == "simulated":
        from services.drivers.simulated import SimulatedBackend
        return SimulatedBackend(cores=args.sim_cores, memory_mb=args.sim_memory,
                                delay=args.sim_delay, state_file=args.sim_state)
    from services.drivers.libvirt_backend import LibvirtBackend
    return LibvirtBackend(args.uri, args.datastore, settings.get("shutdown_timeout", 30),
                          domain_type=args.domain_type, parking=args.parking)


def parse_args(argv, settings):
    parser = argparse.ArgumentParser(prog="cirrus-node", description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="the host name this node serves")
    parser.add_argument("--uri", default=settings.get("uri", "test:///default"),
                        help="libvirt URI (default: drivers.uri)")
    parser.add_argument("--backend", choices=("libvirt", "simulated"),
                        default=settings.get("backend", "libvirt"))
    parser.add_argument("--datastore", default=settings.get("datastore"),
                        help="system datastore directory (default: drivers.datastore)")
    parser.add_argument("--parking", default=settings.get("parking"),
                        help="where mv out moves VM directories (default: drivers.parking, "
                             "or \"parked\" beside the datastore)")
    parser.add_argument("--domain-type", choices=("kvm", "qemu", "test"),
                        help="libvirt domain type (default: from the URI and /dev/kvm)")
    parser.add_argument("--sim-cores", type=int, default=16, help="simulated host cores")
    parser.add_argument("--sim-memory", type=int, default=32768, help="simulated host MB")
    parser.add_argument("--sim-delay", type=float, default=0.0,
                        help="seconds each simulated action takes")
    parser.add_argument("--sim-state", metavar="PATH",
                        help="file keeping the simulated domains across restarts")
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
                        shutdown_timeout=float(settings.get("shutdown_timeout", 30)),
                        sync_interval=float(settings.get("sync_interval", 60)))
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    log.info("node %s on %s (%s backend)", args.host, args.uri, args.backend)
    worker.run()
    if worker.running:
        # a command stuck in the hypervisor must not keep the process alive past
        # its grace: its message was never acked, so it goes back to the queue
        log.warning("leaving %d commands still running to be redelivered", len(worker.running))
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
