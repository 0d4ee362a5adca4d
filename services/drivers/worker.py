"""cirrus-node: the driver worker of one hypervisor node, or of many simulated ones.

``cirrus-node --host NAME`` serves one host; ``cirrus-node --simulate N
--prefix P`` serves the simulated hosts P-0001 .. P-N in one process, through
the same code: a list of hosts, one broker connection, one consumer per host
queue, one command pool, one monitor thread (docs/nodes.md).

For each host it consumes the host's durable queue, runs each command on the
host's backend in the pool, and answers with a ``command.result`` event; every
``monitor_interval`` seconds (spread out over many hosts, see reports.py, and
early when its domains change) it also sends a ``host.monitor`` event, marked
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

A message in a host's queue carrying ``"control"`` is not a command but a
request to the worker (``cirrus-node simulate-fail``, ``simulate-change``),
answered on its reply_to.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid

from kombu import Connection, Consumer, Producer, Queue
from kombu.exceptions import OperationalError

from cirrus import config, heartbeat, instance, messages, metrics, tracing
from services.drivers.backend import MV_DIRECTIONS, domain_name, vm_id_of
from services.drivers.reports import ReportSchedule, significant_change

log = logging.getLogger("cirrus.node")

HEARTBEAT = 10          # seconds; lets a dead broker connection be noticed
STOP_GRACE = 30         # seconds running commands may take to finish on SIGTERM
CHECK_INTERVAL = 1      # seconds between looks at a real host's usage between reports
RESULTS_PER_MESSAGE = 500   # driver results sent together in one command.results message


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
    return {key: cmd.get(key) for key in ("id", "action", "vm_id", "host", "request_id")}


def tracing_ids(cmd):
    """(request id, VM id) of whatever arrived as a command, for its log lines."""
    fields = command_fields(cmd)
    return fields["request_id"], fields["vm_id"]


def run_command(backend, cmd, shutdown_timeout):
    """Run one command; always returns a result, SUCCESS or FAILURE."""
    problem = command_problem(cmd)
    if problem:
        log.warning("rejected command %r: %s", cmd, problem)
        return messages.result(command_fields(cmd), False, error=problem)
    vm = cmd["args"]["vm"]
    try:
        with metrics.driver_action(cmd["action"]):
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


class HostAgent:
    """One host a worker serves: its name, queue and backend, and what its
    monitoring remembers between reports."""

    def __init__(self, name, backend):
        self.name = name
        self.backend = backend
        self.queue = messages.node_queue(name)
        self.sync_pending = True                # the next report is a sync report
        self.last_sync = None
        self.reconnects = backend.reconnects
        self.last_sent = None                   # the monitoring of the last report made

    def report(self, now, sync_interval, lock):
        """This host's host.monitor body, or raises what the backend raised.
        ``lock`` guards sync_pending, which the main thread sets."""
        monitoring = self.backend.monitor()
        with lock:
            if self.backend.reconnects != self.reconnects:
                self.reconnects = self.backend.reconnects   # its events may have been lost
                self.sync_pending = True
            sync = (self.sync_pending or self.last_sync is None
                    or now - self.last_sync >= sync_interval)
            self.sync_pending = False
        if sync:
            self.last_sync = now
        self.last_sent = monitoring
        return {"host": self.name, "monitoring": monitoring, "at": now_iso(), "sync": sync}


class NodeWorker:
    """Serves one host (``cirrus-node --host``) or many simulated ones
    (``--simulate``) over one broker connection: one consumer per host queue
    on one channel, one pool of command threads, one monitor thread."""

    def __init__(self, hosts, amqp_uri, threads=4, monitor_interval=3, shutdown_timeout=30,
                 sync_interval=60, jitter=0.0, check_interval=None, prefetch=None,
                 name=None):
        self.agents = [HostAgent(host, backend) for host, backend in dict(hosts).items()]
        self.by_name = {agent.name: agent for agent in self.agents}
        self.name = name or self.agents[0].name
        self.amqp_uri = amqp_uri
        self.threads = threads
        self.monitor_interval = monitor_interval
        # how often a host's usage is looked at between reports, to report a big
        # change at once; None or not below the interval: never
        self.check_interval = check_interval
        self.jitter = jitter
        self.sync_interval = sync_interval
        self.shutdown_timeout = shutdown_timeout
        self.prefetch = prefetch or threads * 2     # unacked commands per host queue
        self.events = messages.event_exchange(messages.NODE)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="command")
        self.vm_locks = {}                      # (host, VM id) -> lock: one command at a time
        self.vm_locks_guard = threading.Lock()
        self.running = set()                    # futures of commands not yet answered
        self.finished = queue.Queue()           # (message, result) from pool threads
        self.outbox = collections.deque()       # (message or None, event type, body) to publish
        self.replies = collections.deque()      # (reply_to, correlation id, body) to control calls
        self.reports = {}                       # host -> its newest report not yet published
        self.monitor_lock = threading.Lock()
        self.monitor_now = threading.Event()    # wakes the monitor loop early
        self.hurried = set()                    # hosts to report early (under monitor_lock)
        self.vm_events = collections.deque()    # vm.event bodies from the backends' watch
        self.stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # ------------------------------------------------------------ main loop

    def run(self):
        for agent in self.agents:
            agent.backend.watch(functools.partial(self.on_domain_event, agent.name))
        monitor = threading.Thread(target=self.monitor_loop, name="monitor", daemon=True)
        monitor.start()
        delay = 1
        connected_before = False
        while not self.stopping.is_set():
            conn = Connection(self.amqp_uri, heartbeat=HEARTBEAT, transport_options={
                "confirm_publish": True,
                "client_properties": {"connection_name": f"cirrus-node:{self.name}"}})
            errors = conn.connection_errors + conn.channel_errors + (OperationalError,)
            try:
                conn.ensure_connection(max_retries=1)
                log.info("connected to the broker, consuming %s", self.describe_queues())
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
        for agent in self.agents:
            agent.backend.close()
        log.info("stopped")

    def describe_queues(self):
        if len(self.agents) == 1:
            return self.agents[0].queue.name
        return (f"{len(self.agents)} queues ({self.agents[0].queue.name} .. "
                f"{self.agents[-1].queue.name})")

    def serve(self, conn):
        channel = conn.channel()
        producer = Producer(channel, exchange=self.events, serializer="json")
        self.events(channel).declare()
        # one basic.qos for every consumer of the channel (RabbitMQ counts it per consumer)
        channel.basic_qos(0, self.prefetch, False)
        consumers = [Consumer(channel, queues=[agent.queue],
                              callbacks=[functools.partial(self.on_message, agent)],
                              on_decode_error=self.on_decode_error, accept=["json"])
                     for agent in self.agents]
        with contextlib.ExitStack() as consuming:
            for consumer in consumers:
                consuming.enter_context(consumer)
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
            reports, self.reports = self.reports, {}
        self.outbox.extend((None, messages.HOST_MONITOR, report) for report in reports.values())
        while self.outbox:
            sent = [self.outbox[0]]
            event_type, body = sent[0][1], sent[0][2]
            if event_type == messages.COMMAND_RESULT:
                # results ready together go as one message: lifecycle applies
                # them in one transaction anyway, and each message costs the
                # broker, this node's wait for its confirm and lifecycle a worker
                while (len(sent) < RESULTS_PER_MESSAGE and len(self.outbox) > len(sent)
                       and self.outbox[len(sent)][1] == messages.COMMAND_RESULT):
                    sent.append(self.outbox[len(sent)])
                event_type, body = messages.COMMAND_RESULTS, {
                    "results": [result for _, _, result in sent]}
            request_id = sent[0][2].get("request_id") if len(sent) == 1 else None
            # Nameko gives lifecycle's handler the request id of these headers
            producer.publish(body, exchange=self.events, routing_key=event_type,
                             serializer="json", delivery_mode=2, retry=False,
                             headers=tracing.headers(request_id))
            for message, _, _ in sent:
                self.outbox.popleft()
                # a delivery from a channel lost since will be redelivered anyway
                if message is not None and message.channel is channel:
                    message.ack()
        while self.replies:
            reply_to, correlation_id, body = self.replies[0]
            # through the default exchange ("" would mean the producer's own to kombu)
            Producer(channel).publish(body, routing_key=reply_to, serializer="json",
                                      correlation_id=correlation_id, retry=False)
            self.replies.popleft()

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

    def on_message(self, agent, body, message):
        if isinstance(body, dict) and CONTROL_KEY in body:
            self.on_control(agent, body[CONTROL_KEY], message)
            return
        cmds = messages.commands_in(body)
        if not cmds:
            log.warning("a message with no commands in %s's queue", agent.name)
            message.ack()
            return
        delivery = message if len(cmds) == 1 else messages.SharedDelivery(message, len(cmds))
        redelivered = message.delivery_info.get("redelivered")
        for cmd in cmds:
            if redelivered:
                log.info("redelivered command %s", command_fields(cmd)["id"],
                         extra=tracing.fields(*tracing_ids(cmd)))
            try:
                future = self.pool.submit(self.execute, agent, cmd)
            except RuntimeError:
                return      # stopping: leave it unacked, it goes back to the queue
            self.running.add(future)
            future.add_done_callback(lambda done: self.on_done(delivery, done))

    def on_control(self, agent, request, message):
        """A control request in a host's queue (``cirrus-node simulate-fail``,
        ``simulate-change``), done here in the main thread, so it takes effect
        before any command queued after it. Answered on its reply_to queue, if it
        gave one, after the vm.event a change made is published (flush)."""
        try:
            answer = {"ok": True, "host": agent.name, **control(agent.backend, request)}
            log.info("%s: %s", agent.name, answer["done"])
        except (TypeError, ValueError) as exc:
            answer = {"ok": False, "host": agent.name, "error": str(exc)}
            log.warning("%s: control request %r refused: %s", agent.name, request, exc)
        reply_to = message.properties.get("reply_to")
        if reply_to:
            self.replies.append((reply_to, message.properties.get("correlation_id"), answer))
        message.ack()

    def on_decode_error(self, message, exc):
        log.warning("undecodable command: %s", exc)
        error = f"the command is not a JSON object ({message.content_type}): {exc}"
        self.outbox.append((message, messages.COMMAND_RESULT,
                            messages.result(command_fields(None), False, error=error)))
        self.wake()

    def execute(self, agent, cmd):
        """In a pool thread. Commands for one VM (e.g. a redelivered deploy and
        its first copy) run one after the other, never side by side."""
        with tracing.bound(*tracing_ids(cmd)):
            if command_problem(cmd):
                return run_command(agent.backend, cmd, self.shutdown_timeout)
            key = (agent.name, cmd["vm_id"])
            with self.vm_locks_guard:
                lock = self.vm_locks.setdefault(key, threading.Lock())
            with lock:
                result = run_command(agent.backend, cmd, self.shutdown_timeout)
        if cmd["action"] == "delete" and result["success"]:
            with self.vm_locks_guard:
                self.vm_locks.pop(key, None)      # the VM is gone from this node
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
        """Each host reports when its schedule says (reports.ReportSchedule: at once
        for one host, spread out for many), early when asked (a sync, a domain
        event), and early when a check between reports sees a big change."""
        schedule = ReportSchedule(len(self.agents), self.monitor_interval, time.monotonic(),
                                  self.jitter)
        checking = bool(self.check_interval) and self.check_interval < self.monitor_interval
        next_check = time.monotonic() + (self.check_interval or 0)
        index_of = {agent.name: index for index, agent in enumerate(self.agents)}
        while not self.stopping.is_set():
            self.monitor_now.clear()
            now = time.monotonic()
            with self.monitor_lock:
                hurried, self.hurried = self.hurried, set()
            for name in hurried:
                schedule.hurry(index_of[name], now)
            if checking and now >= next_check:
                next_check = now + self.check_interval
                self.check_changes(schedule, now)
            due = schedule.due(now)
            for index in due:
                self.make_report(self.agents[index], now)
                schedule.done(index, now)
            if due:
                self.wake()
            wake_at = schedule.wake_at()
            if checking:
                wake_at = next_check if wake_at is None else min(wake_at, next_check)
            self.monitor_now.wait(None if wake_at is None else max(0.0, wake_at - time.monotonic()))

    def make_report(self, agent, now):
        try:
            report = agent.report(now, self.sync_interval, self.monitor_lock)
        except Exception as exc:
            log.error("host monitoring of %s failed: %s", agent.name, exc)
            return
        with self.monitor_lock:
            previous = self.reports.get(agent.name)
            # never drop the sync of a report not yet sent
            report["sync"] = report["sync"] or bool(previous and previous["sync"])
            self.reports[agent.name] = report

    def check_changes(self, schedule, now):
        """Between reports: a host whose usage or domains changed much reports now."""
        for index, agent in enumerate(self.agents):
            try:
                current = agent.backend.monitor()
            except Exception:
                continue        # the next report says what is wrong
            if significant_change(agent.last_sent, current):
                schedule.hurry(index, now)

    def request_report(self, host):
        """Report ``host`` soon (at most one early report per reports.URGENT_GAP)."""
        with self.monitor_lock:
            self.hurried.add(host)
        self.monitor_now.set()

    def request_sync(self):
        """Make every host's next report, sent at once, a sync report."""
        with self.monitor_lock:
            for agent in self.agents:
                agent.sync_pending = True
                self.hurried.add(agent.name)
        self.monitor_now.set()

    def on_domain_event(self, host, deploy_id, state, reason):
        """In the backend's event thread: hand a vm.event to the main thread, which
        alone touches the broker, and wake it to publish it now; the host's
        report follows, since its domains changed."""
        vm_id = vm_id_of(deploy_id)
        if vm_id is None:
            return      # not a domain Cirrus made
        # a change the hypervisor reports is a request of its own, which lifecycle's
        # transition and whatever follows carry
        self.vm_events.append({"host": host, "vm_id": vm_id, "deploy_id": deploy_id,
                               "state": state, "reason": reason, "at": now_iso(),
                               "request_id": tracing.new_id()})
        self.wake()
        self.request_report(host)

    def stop(self, *_signal):
        self.stopping.set()
        self.monitor_now.set()
        self.wake()


# ---------------------------------------------------------------- control requests

CONTROL_KEY = "control"     # a message with this key in a host queue is not a command
CONTROL_TIMEOUT = 10        # seconds simulate-fail/-change wait for the worker's answer


def control_fail(backend, request):
    failures = getattr(backend, "failures", None)
    if failures is None:
        raise ValueError(f"the {type(backend).__name__} cannot script failures; "
                         f"only simulated hosts can")
    return failures.add(request.get("action"), request.get("count"), request.get("message"))


def control_change(backend, request):
    """Change a simulated domain behind the platform's back; the backend tells its
    watcher, so the node publishes a vm.event as for libvirt's callback."""
    change = getattr(backend, "change", None)
    if change is None:
        raise ValueError(f"the {type(backend).__name__} cannot change domains behind the "
                         f"platform's back; only simulated hosts can")
    vm_id = request.get("vm_id")
    if isinstance(vm_id, bool) or not isinstance(vm_id, int) or vm_id < 0:
        raise ValueError(f"vm_id: must be a VM id (a whole number), got {vm_id!r}")
    return change(domain_name(vm_id), request.get("state"), request.get("reason"))


CONTROLS = {"fail": control_fail, "change": control_change}


def control(backend, request):
    """Do a control request on a host's backend; returns {"done": what was done}.
    Bad requests raise ValueError naming the field."""
    if not isinstance(request, dict):
        raise ValueError(f"a control request must be an object, got {type(request).__name__}")
    if request.get("what") not in CONTROLS:
        raise ValueError(f"what: unknown control request {request.get('what')!r}; "
                         f"expected one of {', '.join(map(repr, CONTROLS))}")
    return {"done": CONTROLS[request["what"]](backend, request)}


def send_control(amqp_uri, host, request, timeout=CONTROL_TIMEOUT):
    """Put a control request in ``host``'s queue and wait for the worker's answer,
    so that commands sent after this returns find it in force."""
    correlation_id = uuid.uuid4().hex
    answers = []
    with Connection(amqp_uri, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        replies = Queue(f"cirrus.control.{correlation_id}", exclusive=True, auto_delete=True)
        with Consumer(channel, queues=[replies], accept=["json"],
                      callbacks=[lambda body, message: (answers.append(body), message.ack())]):
            Producer(channel).publish(
                {CONTROL_KEY: request}, exchange=messages.COMMANDS, routing_key=host,
                declare=[messages.node_queue(host)], serializer="json", delivery_mode=2,
                reply_to=replies.name, correlation_id=correlation_id)
            deadline = time.monotonic() + timeout
            while not answers and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
                except socket.timeout:
                    pass
    if not answers:
        raise TimeoutError(f"no worker answered for host {host} within {timeout:g} s (the "
                           f"request waits in its queue: is `cirrus-node --simulate` serving it?)")
    return answers[0]


def run_control(prog, host, request, timeout):
    """Send a control request for a command line and print its answer; the exit status."""
    try:
        answer = send_control(config.get()["amqp"]["uri"], host, request, timeout)
    except TimeoutError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if not answer["ok"]:
        print(f"{prog}: {host}: {answer['error']}", file=sys.stderr)
        return 1
    print(f"{answer['host']}: {answer['done']}")
    return 0


def simulate_fail_main(argv):
    """``cirrus-node simulate-fail``: script failures on a running simulated host."""
    prog = "cirrus-node simulate-fail"
    parser = argparse.ArgumentParser(
        prog=prog, description="Make the next COUNT ACTION commands on a simulated host fail.")
    parser.add_argument("--host", required=True, help="the simulated host, e.g. sim-0003")
    parser.add_argument("--action", required=True, choices=messages.DRIVER_ACTIONS)
    parser.add_argument("--count", type=int, default=1,
                        help="how many of its next ACTION commands fail (0 clears; default 1)")
    parser.add_argument("--message", help="the error the failures report")
    parser.add_argument("--timeout", type=float, default=CONTROL_TIMEOUT)
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error(f"--count: must be 0 or more, got {args.count}")
    request = {"what": "fail", "action": args.action, "count": args.count,
               "message": args.message}
    return run_control(prog, args.host, request, args.timeout)


def simulate_change_main(argv):
    """``cirrus-node simulate-change``: change a simulated domain behind the platform's back."""
    from services.drivers.simulated import CHANGES
    prog = "cirrus-node simulate-change"
    parser = argparse.ArgumentParser(
        prog=prog, description="Change a VM's domain on a simulated host behind the platform's "
                               "back; the node reports it as a vm.event, as libvirt would.")
    parser.add_argument("--host", required=True, help="the simulated host, e.g. sim-0003")
    parser.add_argument("--vm", type=int, required=True, help="the VM id, e.g. 42")
    parser.add_argument("--state", required=True, choices=CHANGES)
    parser.add_argument("--reason", help="the event's reason (default: libvirt's, such as "
                                         "STOPPED/DESTROYED)")
    parser.add_argument("--timeout", type=float, default=CONTROL_TIMEOUT)
    args = parser.parse_args(argv)
    if args.vm < 0:
        parser.error(f"--vm: must be a VM id (0 or more), got {args.vm}")
    if args.reason is not None and not args.reason.strip():
        parser.error("--reason: must not be empty")
    request = {"what": "change", "vm_id": args.vm, "state": args.state, "reason": args.reason}
    return run_control(prog, args.host, request, args.timeout)


CONTROL_COMMANDS = {"simulate-fail": simulate_fail_main, "simulate-change": simulate_change_main}


# ---------------------------------------------------------------- registering hosts

def register_hosts(amqp_uri, names, worker, retry=2.0):
    """Create in lifecycle the hosts this worker serves that do not exist yet
    (lifecycle.create_host over Nameko RPC, as `cirrus host create` does through
    the gateway), and have each new one report at once. Waits for lifecycle."""
    from nameko.exceptions import RemoteError, RpcTimeout, UnknownService
    from nameko.standalone.rpc import ClusterRpcProxy
    rpc_config = {"AMQP_URI": amqp_uri, "serializer": "json"}
    pending = list(names)
    while pending and not worker.stopping.is_set():
        try:
            with ClusterRpcProxy(rpc_config, timeout=30) as proxy:
                existing = {host["name"] for host in proxy.lifecycle.list_hosts()}
                for name in pending:
                    if worker.stopping.is_set():
                        return
                    if name not in existing:
                        try:
                            proxy.lifecycle.create_host(name)
                        except RemoteError as exc:
                            if exc.exc_type != "AlreadyExists":
                                raise
                        worker.request_report(name)
                        log.info("registered host %s", name)
                pending = []
        except (UnknownService, RpcTimeout, OSError, OperationalError) as exc:
            log.warning("cannot register hosts yet (%s); retrying in %s s", exc, retry)
            worker.stopping.wait(retry)
    if not pending:
        log.info("hosts registered: %d", len(names))


# ---------------------------------------------------------------- entry point

SIM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def simulated_hosts(count, prefix):
    """The names of ``--simulate COUNT --prefix PREFIX``: PREFIX-0001 .. (4 digits,
    more only past 9999)."""
    return [f"{prefix}-{index:04d}" for index in range(1, count + 1)]


def make_backend(args, settings, host=None):
    if args.backend == "simulated":
        from services.drivers.simulated import SimulatedBackend
        state = args.sim_state.replace("{host}", host) if args.sim_state and host \
            else args.sim_state
        return SimulatedBackend(cores=args.sim_cores, memory_mb=args.sim_memory,
                                delay=args.sim_delay, state_file=state,
                                datastore_mb=args.sim_datastore)
    from services.drivers.libvirt_backend import LibvirtBackend
    return LibvirtBackend(args.uri, args.datastore, settings.get("shutdown_timeout", 30),
                          domain_type=args.domain_type, parking=args.parking)


def parse_args(argv, settings, host_timeout=None):
    parser = argparse.ArgumentParser(prog="cirrus-node", description=__doc__.split("\n")[0],
                                     epilog="cirrus-node simulate-fail --help: script failures "
                                            "on a running simulated host; cirrus-node "
                                            "simulate-change --help: change one of its "
                                            "domains behind the platform's back")
    parser.add_argument("--host", help="the host name this node serves")
    parser.add_argument("--simulate", type=int, metavar="N",
                        help="serve N simulated hosts PREFIX-0001 .. PREFIX-N in this process")
    parser.add_argument("--prefix", default="sim", help="simulated host names' prefix (sim)")
    parser.add_argument("--register", action="store_true",
                        help="create the hosts this process serves in lifecycle if missing")
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
    parser.add_argument("--threads", type=int,
                        help="commands run at once (default: drivers.threads, "
                             f"with --simulate at least {SIM_THREADS})")
    parser.add_argument("--sim-cores", type=int, default=16, help="simulated host cores")
    parser.add_argument("--sim-memory", type=int, default=32768, help="simulated host MB")
    parser.add_argument("--sim-datastore", type=int, default=1048576,
                        help="simulated system datastore MB")
    parser.add_argument("--sim-delay", type=float, default=0.0,
                        help="seconds each simulated action takes")
    parser.add_argument("--sim-state", metavar="PATH",
                        help="file keeping the simulated domains across restarts ({host} "
                             "stands for the host name; needed with --simulate)")
    parser.add_argument("--monitor-interval", type=float,
                        help="seconds between a host's reports (default: drivers.monitor_interval;"
                             " with --simulate, drivers.sim_monitor_interval)")
    args = parser.parse_args(argv)
    if args.simulate is not None:
        if args.host is not None:
            parser.error("--host: not with --simulate, whose hosts are PREFIX-0001 ..")
        if args.simulate < 1:
            parser.error(f"--simulate: must be 1 or more hosts, got {args.simulate}")
        if not SIM_NAME.fullmatch(args.prefix):
            parser.error(f"--prefix: {args.prefix!r} is not a host name prefix (letters, "
                         f"digits, '.', '_', '-')")
        if args.sim_state and "{host}" not in args.sim_state and args.simulate > 1:
            parser.error("--sim-state: with --simulate the path must contain {host}, "
                         "one file per host")
        args.backend = "simulated"
    elif args.host is None or not args.host.strip():
        parser.error("--host: must not be empty (or give --simulate N)")
    if args.backend == "libvirt" and not args.datastore:
        parser.error("--datastore: not given and no drivers.datastore in the configuration")
    for name in ("sim_cores", "sim_memory", "sim_datastore"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be 1 or more, got "
                         f"{getattr(args, name)}")
    if args.sim_delay < 0:
        parser.error(f"--sim-delay: must be 0 s or more, got {args.sim_delay}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: must be 1 or more, got {args.threads}")
    if args.monitor_interval is None:
        key, default = (("sim_monitor_interval", SIM_MONITOR_INTERVAL) if args.simulate
                        else ("monitor_interval", 3))
        args.monitor_interval = float(settings.get(key, default))
    if args.monitor_interval <= 0:
        parser.error(f"--monitor-interval: must be more than 0 s, got {args.monitor_interval}")
    jitter = float(settings.get("sim_jitter", SIM_JITTER)) if args.simulate else 0.0
    if host_timeout is not None and args.monitor_interval * (1 + jitter) >= host_timeout:
        parser.error(f"--monitor-interval: {args.monitor_interval:g} s (+{jitter:.0%} jitter) "
                     f"is not below lifecycle.host_timeout ({host_timeout:g} s): every host "
                     f"would be failed between two reports")
    args.jitter = jitter
    return args


SIM_THREADS = 64            # simulated actions mostly sleep their delay
SIM_MONITOR_INTERVAL = 10   # 2,500 hosts at 10 s: 250 reports a second
SIM_JITTER = 0.1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in CONTROL_COMMANDS:
        return CONTROL_COMMANDS[argv[0]](argv[1:])
    cfg = config.get()
    settings = cfg.get("drivers", {})
    args = parse_args(argv, settings, cfg.get("lifecycle", {}).get("host_timeout"))
    threads = args.threads or int(settings.get("threads", 4))
    if args.simulate:
        names = simulated_hosts(args.simulate, args.prefix)
        instance.start("node", os.environ.get("CIRRUS_INSTANCE") or f"node:{args.prefix}x{args.simulate}")
        threads = args.threads or max(threads, SIM_THREADS)
        hosts = {name: make_backend(args, settings, name) for name in names}
        # many queues: a few commands in hand per host is plenty
        prefetch = min(threads * 2, 8)
    else:
        names = [args.host]
        instance.start("node", os.environ.get("CIRRUS_INSTANCE") or "node:" + args.host)
        hosts = {args.host: make_backend(args, settings, args.host)}
        prefetch = None
    heartbeat.serving([messages.node_queue(name).name for name in names], names)
    worker = NodeWorker(hosts, cfg["amqp"]["uri"], threads=threads,
                        monitor_interval=args.monitor_interval,
                        shutdown_timeout=float(settings.get("shutdown_timeout", 30)),
                        sync_interval=float(settings.get("sync_interval", 60)),
                        jitter=args.jitter, prefetch=prefetch,
                        check_interval=None if args.simulate else CHECK_INTERVAL,
                        name=f"{args.prefix}x{args.simulate}" if args.simulate else None)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    if args.simulate:
        log.info("simulating %d hosts %s .. %s (%d cores, %d MB each; reports every %g s)",
                 len(names), names[0], names[-1], args.sim_cores, args.sim_memory,
                 args.monitor_interval)
    else:
        log.info("node %s on %s (%s backend)", args.host, args.uri, args.backend)
    if args.register:
        threading.Thread(target=register_hosts, args=(cfg["amqp"]["uri"], names, worker),
                         name="register", daemon=True).start()
    worker.run()
    heartbeat.stop()
    if worker.running:
        # a command stuck in the hypervisor must not keep the process alive past
        # its grace: its message was never acked, so it goes back to the queue
        log.warning("leaving %d commands still running to be redelivered", len(worker.running))
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
