"""Prometheus metrics of this process, on ``http://ADDRESS:PORT/metrics``.

Every process serves its own registry on its own port (``serve``, called
from ``cirrus.instance.start``): ``metrics.port`` of the configuration if set
(``CIRRUS_METRICS_PORT``, which cirrus-launch sets for each child; 0: any
free port), else ``metrics.ports[service]``. A gate process ``index`` (from
0) adds its index to that port. ``endpoint()`` is the URL, which heartbeats
report so ``cirrus status`` shows where to scrape.

The series are defined here, so their names and labels are in one place
(docs/operations.md lists them); the code that moves them is where the work
is, and only observes: no series costs a query or a lock of its own on a hot
path. The two that need the database (VMs per status, outbox rows waiting)
are read when scraped, by the lifecycle service (``Metrics(cluster=True)``).
"""
import logging
import os
import socket
import time
from contextlib import contextmanager

from nameko.events import EventHandler
from nameko.extensions import DependencyProvider
from nameko.rpc import Rpc
from nameko.timer import Timer
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("cirrus.metrics")

DEFAULT_PORTS = {"requests": 9401, "scheduler": 9402, "lifecycle": 9403, "flow": 9404,
                 "gateway": 9405, "gate": 9450, "node": 9407}

# seconds; calls and handlers from a millisecond to a batch of thousands of VMs
BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
# driver actions: a simulated one takes milliseconds, a real deploy or migration minutes
SLOW_BUCKETS = (.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

INSTANCE = Gauge("cirrus_instance_info", "This process: always 1, its identity in the labels",
                 ["service", "name", "host", "version"])

RPC_CALLS = Counter("cirrus_rpc_calls_total", "Nameko RPC calls served, by outcome "
                    "(ok, or the exception's class)", ["service", "method", "outcome"])
RPC_SECONDS = Histogram("cirrus_rpc_seconds", "Time serving a Nameko RPC call",
                        ["service", "method"], buckets=BUCKETS)
EVENTS = Counter("cirrus_events_handled_total", "Events handled, by outcome",
                 ["service", "handler", "event", "outcome"])
EVENT_SECONDS = Histogram("cirrus_event_seconds", "Time handling an event",
                          ["service", "handler"], buckets=BUCKETS)
TIMER_RUNS = Counter("cirrus_timer_runs_total", "Runs of a periodic task, by outcome",
                     ["service", "method", "outcome"])
TIMER_SECONDS = Histogram("cirrus_timer_seconds", "Time of one run of a periodic task",
                          ["service", "method"], buckets=BUCKETS)

GRPC_CALLS = Counter("cirrus_grpc_calls_total", "gRPC calls answered by the gateway, by "
                     "status code (a watch stream counts when it ends)", ["method", "code"])
GRPC_SECONDS = Histogram("cirrus_grpc_seconds", "Time answering a unary gRPC call",
                         ["method"], buckets=BUCKETS)

GATE_REQUESTS = Counter("cirrus_gate_requests_total", "OneGate HTTP requests, by route "
                        "(unmatched: no route) and status code", ["route", "code"])
GATE_SECONDS = Histogram("cirrus_gate_request_seconds", "Time answering a OneGate request",
                         ["route"], buckets=BUCKETS)

SCHEDULING_SECONDS = Histogram("cirrus_scheduling_seconds", "From a VM becoming PENDING to "
                               "its host reserved by the scheduler", buckets=BUCKETS)

DRIVER_SECONDS = Histogram("cirrus_driver_action_seconds", "Time of a driver action on a "
                           "node, by outcome (success or failure)", ["action", "outcome"],
                           buckets=SLOW_BUCKETS)

OUTBOX_LAG = Histogram("cirrus_outbox_lag_seconds", "From an outbox row written (its "
                       "transaction) to the broker confirming it published", buckets=BUCKETS)

_server = None      # (httpd, thread) of the running HTTP server
_endpoint = None    # (url, pid of the process serving it)
_cluster_collector = None


# ---------------------------------------------------------------- serving

def endpoint():
    """``http://HOST:PORT/metrics`` of this process, or None before ``serve``
    (also in a forked child before it serves: the parent's is not its own)."""
    if _endpoint is not None and _endpoint[1] == os.getpid():
        return _endpoint[0]
    return None


def settings(cfg=None):
    from cirrus import config
    cfg = config.get() if cfg is None else cfg
    return cfg.get("metrics") or {}


def _port_number(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{where}: {value!r} is not a port number (0-65535, 0: any free port)")
    return value


def choose_port(service, index=0, cfg=None):
    """The port a process of ``service`` serves on: ``metrics.port`` if set,
    else ``metrics.ports[service]``, plus ``index`` (a gate process); 0 (any
    free port) stays 0."""
    chosen = settings(cfg)
    if chosen.get("port") is not None:
        port = _port_number(chosen["port"], "metrics.port (CIRRUS_METRICS_PORT)")
    else:
        ports = chosen.get("ports") or {}
        port = _port_number(ports.get(service, DEFAULT_PORTS.get(service, 0)),
                            f"metrics.ports.{service}")
    return port and _port_number(port + index, f"metrics port {port} + gate process {index}")


def url(address, port, host=None):
    """Where a scraper reaches ``address:port``: a wildcard address by host name."""
    if address in ("", "0.0.0.0", "::"):
        address = host or socket.gethostname()
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}/metrics"


def serve(identity, index=0):
    """Serve this process's metrics and return the endpoint; again in a
    forked gate process ``index``, which stops the server it inherited. A
    busy port is logged and a free one taken, so a second process started
    by hand on one machine still reports (its heartbeat says where)."""
    global _server, _endpoint
    from prometheus_client import start_http_server
    stop()
    address = settings().get("address") or "127.0.0.1"
    port = choose_port(identity.service, index)
    try:
        httpd, thread = start_http_server(port, address)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%s (%s); serving on a free port instead",
                    address, port, exc.strerror)
        httpd, thread = start_http_server(0, address)
    _server = (httpd, thread)
    _endpoint = (url(address, httpd.server_address[1], identity.host), os.getpid())
    INSTANCE.clear()
    INSTANCE.labels(identity.service, identity.name, identity.host, identity.version).set(1)
    log.info("metrics on %s", _endpoint[0])
    return _endpoint[0]


def stop():
    """Stop serving (also a server inherited through a fork: the parent's
    socket stays open in the parent)."""
    global _server, _endpoint
    if _server is not None:
        httpd, thread = _server
        if thread.is_alive():   # in a forked child only green threads live on
            httpd.shutdown()
        httpd.server_close()
        _server = _endpoint = None


# ---------------------------------------------------------------- Nameko services

def outcome_of(exc_info):
    return "ok" if exc_info is None else exc_info[0].__name__


class Metrics(DependencyProvider):
    """Counts and times every worker of a Nameko service: RPC calls, events
    handled and timer runs, per method. ``cluster=True`` (lifecycle) also
    reports the VMs per status and the outbox rows waiting, read from the
    database when scraped."""

    def __init__(self, cluster=False):
        self.cluster = cluster

    def setup(self):
        self.started = {}
        if self.cluster:
            watch_cluster()

    def worker_setup(self, worker_ctx):
        self.started[worker_ctx] = time.perf_counter()

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        started = self.started.get(worker_ctx)
        if started is not None:
            observe_worker(worker_ctx, time.perf_counter() - started, outcome_of(exc_info))

    def worker_teardown(self, worker_ctx):
        self.started.pop(worker_ctx, None)


def observe_worker(worker_ctx, seconds, outcome):
    service, entrypoint = worker_ctx.service_name, worker_ctx.entrypoint
    method = entrypoint.method_name
    if isinstance(entrypoint, EventHandler):
        EVENTS.labels(service, method, f"{entrypoint.source_service}.{entrypoint.event_type}",
                      outcome).inc()
        EVENT_SECONDS.labels(service, method).observe(seconds)
    elif isinstance(entrypoint, Timer):
        TIMER_RUNS.labels(service, method, outcome).inc()
        TIMER_SECONDS.labels(service, method).observe(seconds)
    elif isinstance(entrypoint, Rpc):
        RPC_CALLS.labels(service, method, outcome).inc()
        RPC_SECONDS.labels(service, method).observe(seconds)


# ---------------------------------------------------------------- the gateway

class GrpcMetrics:
    """A grpc.ServerInterceptor (by its one method, so this module needs no
    grpc): counts every call per method and status code, and times the
    unary ones (a watch stream lasts as long as its watcher)."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.lstrip("/")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_timed_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_counted_stream(handler.unary_stream, method))
        return handler


def grpc_code(context, failed):
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return getattr(code, "name", str(code))


def _timed_unary(behaviour, method):
    def answer(request, context):
        started, failed = time.perf_counter(), True
        try:
            response = behaviour(request, context)
            failed = False
            return response
        finally:
            GRPC_SECONDS.labels(method).observe(time.perf_counter() - started)
            GRPC_CALLS.labels(method, grpc_code(context, failed)).inc()
    return answer


def _counted_stream(behaviour, method):
    def answer(request, context):
        failed, code = True, None
        try:
            yield from behaviour(request, context)
            failed = False
        except GeneratorExit:       # the watcher went away
            code = "CANCELLED"
            raise
        finally:
            GRPC_CALLS.labels(method, code or grpc_code(context, failed)).inc()
    return answer


# ---------------------------------------------------------------- the gate, scheduler, nodes, outbox

def gate_request(route, status, seconds):
    """One OneGate request: ``route`` a rule such as ``GET /vms/<vm>``, or None."""
    route = route or "unmatched"
    GATE_REQUESTS.labels(route, str(status)).inc()
    GATE_SECONDS.labels(route).observe(seconds)


def scheduled(pending_since):
    """A VM's host reserved; ``pending_since``: its last change (an aware
    datetime, when it became PENDING), None if unknown."""
    if pending_since is not None:
        SCHEDULING_SECONDS.observe(max(0.0, time.time() - pending_since.timestamp()))


@contextmanager
def driver_action(action):
    """Times a driver action; one that raises is a failure."""
    started, outcome = time.perf_counter(), "failure"
    try:
        yield
        outcome = "success"
    finally:
        DRIVER_SECONDS.labels(action, outcome).observe(time.perf_counter() - started)


def outbox_published(waited, publishing):
    """Rows confirmed by the broker: ``waited`` each row's seconds from
    written to claimed (the database's clock), ``publishing`` the seconds
    the batch then took to publish and confirm (ours)."""
    for seconds in waited:
        OUTBOX_LAG.observe(max(0.0, float(seconds)) + publishing)   # numeric: a Decimal


# ---------------------------------------------------------------- read when scraped

class ClusterCollector:
    """VMs per status and the outbox rows waiting, read from the database at
    scrape: two small aggregate queries every scrape, none on any hot path.
    Every lifecycle instance reports the same figures (take max, not sum)."""

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def families():
        return (GaugeMetricFamily("cirrus_vms", "VMs per status (DONE included), as in the "
                                  "database", labels=["status"]),
                GaugeMetricFamily("cirrus_outbox_rows_waiting",
                                  "Outbox rows written and not yet published"),
                GaugeMetricFamily("cirrus_outbox_oldest_seconds",
                                  "Age of the oldest outbox row waiting (0: none)"))

    def describe(self):
        """The names, for the registry: without it, registering would query."""
        return self.families()

    def collect(self):
        from sqlalchemy import text
        from cirrus import states
        vms, waiting, oldest = self.families()
        try:
            with self.engine.connect() as conn:
                counts = conn.execute(text(
                    "SELECT state, lcm_state, count(*) FROM vms GROUP BY state, lcm_state")).all()
                rows, age = conn.execute(text(
                    "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() "
                    "- min(created_at)), 0) FROM outbox")).one()
        except Exception as exc:    # the database away: the scrape still answers
            log.warning("metrics: cannot read VM and outbox counts: %s", exc)
            return
        per_status = dict.fromkeys(states.ALL_STATUSES, 0)
        for state, lcm_state, count in counts:
            try:
                name = states.status(state, lcm_state)
            except ValueError:      # a state this version does not know: as it is
                name = state
            per_status[name] = per_status.get(name, 0) + count
        for name, count in per_status.items():
            vms.add_metric([name], count)
        waiting.add_metric([], rows)
        oldest.add_metric([], float(age))
        yield from (vms, waiting, oldest)


def watch_cluster():
    """Register the ClusterCollector (once per process)."""
    global _cluster_collector
    if _cluster_collector is None:
        from cirrus import db
        _cluster_collector = ClusterCollector(db.engine())
        REGISTRY.register(_cluster_collector)
