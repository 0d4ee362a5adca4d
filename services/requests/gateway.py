"""The gRPC gateway: Cirrus's external API, translated into RPC calls to ``requests``.

A plain grpcio server with a thread pool -- grpcio does not run under
eventlet, so nothing here imports eventlet's monkey patching. Each gateway
thread keeps one Nameko standalone RPC proxy, made on first use and reused.

- Authentication: every call except Login, health and reflection needs
  ``authorization: Bearer <token>`` or ``authorization: Basic <base64 user:pass>``
  in its metadata; the ``requests`` service checks it.
- Errors: a RemoteError's class name becomes the gRPC status
  (cirrus.errors.grpc_status_name) and its message the details.
- ``x-request-id`` from the metadata (or a new one) names the call in the logs,
  makes a create idempotent, and comes back in the trailing metadata.
- Watch: one kombu consumer thread per kind of event (``vm.state`` from
  lifecycle, ``flow.service`` from flow) fans them out to a queue per open stream.
"""
import base64
import binascii
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kombu import Connection, Consumer, Queue

import cirrus  # noqa: F401  (before nameko: silences eventlet's deprecation warning)
from nameko.exceptions import RemoteError, RpcTimeout, UnknownService  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402

from cirrus import config, messages, states, tracing  # noqa: E402
from cirrus.metrics import GrpcMetrics  # noqa: E402
from cirrus.errors import grpc_status_name  # noqa: E402
# grpc_status_name finds error kinds among the CirrusError subclasses defined
# in this process: cirrus.template defines more (TemplateError)
from cirrus.template import is_digits  # noqa: E402
from cirrus.v1 import (  # noqa: E402
    host_pb2, host_pb2_grpc, session_pb2, session_pb2_grpc, template_pb2,
    template_pb2_grpc, vm_pb2, vm_pb2_grpc,
)
from cirrus.v1 import (  # noqa: E402
    datastore_pb2, datastore_pb2_grpc, image_pb2, image_pb2_grpc, vnet_pb2, vnet_pb2_grpc,
)
from cirrus.v1 import (  # noqa: E402
    cluster_pb2, cluster_pb2_grpc, vmgroup_pb2, vmgroup_pb2_grpc,
)
from cirrus.v1 import flow_pb2, flow_pb2_grpc  # noqa: E402
from cirrus.v1 import gate_pb2, gate_pb2_grpc  # noqa: E402
from cirrus.v1 import status_pb2, status_pb2_grpc  # noqa: E402
from cirrus.v1 import (  # noqa: E402
    audit_pb2, audit_pb2_grpc, request_pb2, request_pb2_grpc, user_pb2, user_pb2_grpc,
)
from google.protobuf.json_format import MessageToDict  # noqa: E402

log = logging.getLogger("cirrus.gateway")

API_SERVICES = [
    vm_pb2.DESCRIPTOR.services_by_name["VirtualMachineService"],
    host_pb2.DESCRIPTOR.services_by_name["HostService"],
    template_pb2.DESCRIPTOR.services_by_name["TemplateService"],
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
    datastore_pb2.DESCRIPTOR.services_by_name["DatastoreService"],
    image_pb2.DESCRIPTOR.services_by_name["ImageService"],
    vnet_pb2.DESCRIPTOR.services_by_name["VirtualNetworkService"],
    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"],
    vmgroup_pb2.DESCRIPTOR.services_by_name["VmGroupService"],
    flow_pb2.DESCRIPTOR.services_by_name["FlowTemplateService"],
    flow_pb2.DESCRIPTOR.services_by_name["FlowService"],
    user_pb2.DESCRIPTOR.services_by_name["UserService"],
    user_pb2.DESCRIPTOR.services_by_name["GroupService"],
    user_pb2.DESCRIPTOR.services_by_name["QuotaService"],
    request_pb2.DESCRIPTOR.services_by_name["RequestService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    gate_pb2.DESCRIPTOR.services_by_name["GateService"],
    status_pb2.DESCRIPTOR.services_by_name["StatusService"],
]
LOGIN_METHOD = "/cirrus.v1.SessionService/Login"
# callable without credentials, so grpcurl and load balancers can probe
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
AUTH_HELP = "send 'authorization: Bearer <token>' or 'authorization: Basic <base64 user:password>'"


# ----------------------------------------------------------------- metadata

class BadCredentials(ValueError):
    pass


def credentials_from_metadata(metadata):
    """The ``credentials`` argument of the requests service, from call metadata."""
    value = dict(metadata or ()).get("authorization")
    if not value:
        raise BadCredentials(f"missing authorization metadata: {AUTH_HELP}")
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer" and rest:
        return {"token": rest}
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise BadCredentials("malformed Basic credentials: not base64 of 'user:password'") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise BadCredentials("malformed Basic credentials: expected 'user:password'")
        return {"username": username, "password": password}
    raise BadCredentials(f"unsupported authorization {scheme!r}: {AUTH_HELP}")


REQUEST_ID_MAX = 64     # the length of vms.request_id


def request_id_from_metadata(metadata):
    """The caller's ``x-request-id``, or a new one; ValueError if unusable."""
    request_id = dict(metadata or ()).get("x-request-id")
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > REQUEST_ID_MAX or not request_id.isprintable():
        raise ValueError(f"x-request-id: must be at most {REQUEST_ID_MAX} printable characters")
    return request_id


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses a call without well-formed credentials before its handler runs;
    whether they are right is for the requests service to say."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method == LOGIN_METHOD or \
                details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            credentials_from_metadata(details.invocation_metadata)
        except BadCredentials as exc:
            log.info("refused %s: %s", details.method, exc)
            return _refusal(handler, str(exc))
        return handler


def _refusal(handler, message):
    """A handler of the same shape as ``handler`` that fails UNAUTHENTICATED."""
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler)
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# ----------------------------------------------------------------- dict -> message

# proto field name -> key in the requests service's dicts, where they differ
DICT_KEYS = {"short_status": "short", "from_status": "from", "to_status": "to"}
_INTS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
         FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def parse_time(value):
    """An ISO-8601 string (naive means UTC), or seconds since the epoch, as
    an aware datetime."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def fill(message, data):
    """Copy the keys of ``data`` that ``message`` has fields for; None leaves a
    field unset. Returns ``message``."""
    for field in message.DESCRIPTOR.fields:
        key = field.name if field.name in data else DICT_KEYS.get(field.name, field.name)
        value = data.get(key)
        if value is None:
            continue
        if field.message_type is None:
            if field.is_repeated:
                getattr(message, field.name).extend(value)
            else:
                setattr(message, field.name, _scalar(field, value))
            continue
        kind = field.message_type.full_name
        target = getattr(message, field.name)
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target.update({str(k): _scalar(value_field, v) for k, v in value.items()})
        elif field.is_repeated:
            for item in value:
                fill(target.add(), item)
        elif kind == "google.protobuf.Struct":
            target.update(value)
        elif kind == "google.protobuf.Timestamp":
            target.FromDatetime(parse_time(value))
        else:
            fill(target, value)
    return message


def _scalar(field, value):
    if field.type in _INTS:
        return int(value)
    if field.type in _FLOATS:
        return float(value)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool(value)
    return str(value)


def vm_message(data):
    """A VirtualMachine from a VM dict; metric samples come with the node's
    upper-case keys (CPU, NETRX...)."""
    metrics = [{key.lower(): value for key, value in point.items()}
               for point in data.get("metrics") or ()]
    return fill(vm_pb2.VirtualMachine(), {**data, "metrics": metrics})


def optional(request, name):
    """A request field's value, or None when an optional field is unset."""
    return getattr(request, name) if request.HasField(name) else None


def iso_time(request, name):
    """A Timestamp field as an ISO-8601 string in UTC, or None when unset."""
    if not request.HasField(name):
        return None
    return getattr(request, name).ToDatetime(tzinfo=timezone.utc).isoformat()


def vm_change(data, current=False):
    """A VmStateChange from a vm.state event payload or a VM dict."""
    status = data.get("status") or states.status(data["state"], data["lcm_state"])
    return fill(vm_pb2.VmStateChange(current=current), {
        **data, "status": status, "short": states.SHORT_NAMES.get(status, ""),
        "key": data.get("key") or messages.vm_event_key(data["state"], data["lcm_state"],
                                                        data["id"]),
        "at": data.get("at") or data.get("updated_at")})


# ----------------------------------------------------------------- calling requests

class CallFailed(Exception):
    """A call to the requests service that did not return; ``code`` is a grpc.StatusCode."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


class Requests:
    """The ``requests`` Nameko service, through one standalone proxy per thread."""

    def __init__(self, amqp_uri, timeout):
        self.config = {"AMQP_URI": amqp_uri, "serializer": "json"}
        self.timeout = timeout
        self._local = threading.local()
        self._runners = set()
        self._lock = threading.Lock()

    def _thread_proxy(self):
        local = self._local
        if getattr(local, "runner", None) is None:
            # context travels with every call; the caller sets request_id in it
            context = {}
            runner = ClusterRpcProxy(self.config, context_data=context, timeout=self.timeout)
            local.service = runner.start().requests
            local.context, local.runner = context, runner
            with self._lock:
                self._runners.add(runner)
        return local

    def _discard(self, local):
        """Drop this thread's proxy; the next call makes a fresh one."""
        runner, local.runner = local.runner, None
        with self._lock:
            self._runners.discard(runner)
        try:
            runner.stop()
        except Exception:  # its connection is likely broken already
            log.debug("stopping a broken proxy failed", exc_info=True)

    def call(self, method, *args, request_id=None, **kwargs):
        """Call ``requests.<method>``; raises CallFailed with the gRPC status."""
        try:
            local = self._thread_proxy()
        except Exception as exc:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach the message broker: {exc}") from exc
        local.context["request_id"] = request_id
        try:
            return getattr(local.service, method)(*args, **kwargs)
        except RemoteError as exc:
            raise CallFailed(grpc.StatusCode[grpc_status_name(exc.exc_type)],
                             exc.value) from exc
        except RpcTimeout as exc:
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"the requests service did not answer within {self.timeout}s") from exc
        except UnknownService as exc:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE,
                             "the requests service is not running") from exc
        except Exception as exc:
            self._discard(local)
            # nameko's standalone proxy says RuntimeError when the broker took
            # its reply consumer down: that too is the broker, and a fresh proxy fixes it
            if isinstance(exc, messages.BROKER_ERRORS) or "has been disconnected" in str(exc):
                raise CallFailed(grpc.StatusCode.UNAVAILABLE,
                                 f"cannot reach the requests service: {exc}") from exc
            log.exception("requests.%s failed", method)
            raise CallFailed(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc

    def close(self):
        with self._lock:
            runners, self._runners = list(self._runners), set()
        for runner in runners:
            try:
                runner.stop()
            except Exception:
                log.debug("stopping a proxy failed", exc_info=True)


class Call:
    """What a handler needs from one gRPC call: credentials, request id, and a
    way to call ``requests`` that turns failures into the call's status."""

    def __init__(self, requests, context, name):
        self.requests = requests
        self.context = context
        self.name = name
        metadata = context.invocation_metadata()
        self.metadata = metadata
        try:
            self.request_id = request_id_from_metadata(metadata)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context.set_trailing_metadata((("x-request-id", self.request_id),))

    @property
    def credentials(self):
        try:
            return credentials_from_metadata(self.metadata)
        except BadCredentials as exc:  # the interceptor lets Login through without any
            self.context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    def __call__(self, method, *args, **kwargs):
        return self.invoke(method, self.credentials, *args, **kwargs)

    def invoke(self, method, *args, **kwargs):
        started = time.monotonic()
        with tracing.bound(self.request_id):    # this thread's log lines name the request
            try:
                result = self.requests.call(method, *args, request_id=self.request_id, **kwargs)
            except CallFailed as exc:
                log.info("%s -> %s: %s (%.0f ms)", self.name, exc.code.name, exc.details,
                         (time.monotonic() - started) * 1000)
                self.context.abort(exc.code, exc.details)
            log.info("%s -> OK (%.0f ms)", self.name, (time.monotonic() - started) * 1000)
        return result


# ----------------------------------------------------------------- watch

RESYNC = object()   # events may have been lost: send the current state again
CLOSED = object()   # the stream is over


class EventHub:
    """One consumer of a Nameko event (``event_type`` from the service
    ``source``) for the whole gateway, fanning the events out to a queue per
    Watch stream. Its queue is exclusive and auto-delete, so it goes away
    with the gateway."""

    def __init__(self, amqp_uri, source, event_type, backlog=10000):
        self.amqp_uri = amqp_uri
        self.source = source
        self.event_type = event_type
        self.backlog = backlog
        self._subscribers = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{event_type}-events",
                                        daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopping.set()
        self._broadcast(CLOSED)
        self._thread.join(timeout=5)

    def subscribe(self):
        events = queue.Queue(maxsize=self.backlog)
        with self._lock:
            self._subscribers.add(events)
        return events

    def unsubscribe(self, events):
        with self._lock:
            self._subscribers.discard(events)

    def _broadcast(self, item):
        with self._lock:
            subscribers = list(self._subscribers)
        for events in subscribers:
            offer(events, item)

    def _on_message(self, body, message):
        for event in messages.events_in(body):
            if isinstance(event, dict) and "id" in event:
                self._broadcast(event)

    def _run(self):
        delay = 0.5
        while not self._stopping.is_set():
            try:
                with Connection(self.amqp_uri, heartbeat=30) as conn:
                    conn.ensure_connection(max_retries=1)
                    queue_ = Queue(f"cirrus.gateway.{self.event_type}."
                                   f"{socket.gethostname()}.{uuid.uuid4().hex[:8]}",
                                   exchange=messages.event_exchange(self.source),
                                   # the type, and any key under it (vm.state.<STATUS>...)
                                   routing_key=f"{self.event_type}.#",
                                   exclusive=True, auto_delete=True, durable=False)
                    with Consumer(conn, queues=[queue_], callbacks=[self._on_message],
                                  accept=["json"], no_ack=True):
                        # events before this point were not seen: streams catch up
                        self._broadcast(RESYNC)
                        self.connected.set()
                        log.info("watching %s events", self.event_type)
                        delay = 0.5
                        while not self._stopping.is_set():
                            try:
                                conn.drain_events(timeout=1)
                            except socket.timeout:
                                conn.heartbeat_check()
            except Exception as exc:
                self.connected.clear()
                if self._stopping.is_set():
                    break
                log.warning("%s consumer lost its connection (%s); retrying in %.1fs",
                            self.event_type, exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10)


def offer(events, item):
    """Queue ``item`` for a stream; a stream too far behind gets a resync instead."""
    try:
        events.put_nowait(item)
    except queue.Full:
        with events.mutex:
            events.queue.clear()
        events.put_nowait(CLOSED if item is CLOSED else RESYNC)


class Watches:
    """The Watch streams of the whole gateway, of every service. A stream
    holds a pool thread for its whole life: at most ``limit`` at once, so
    some threads are left for unary calls."""

    def __init__(self, limit):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def serve(self, call, hub, make_stream):
        """Yield a stream's messages: ``make_stream()`` gives an object whose
        snapshot() yields the current state and change(event) the message
        for an event of ``hub`` (None: not for this stream)."""
        if not self._slots.acquire(blocking=False):
            call.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway already serves {self.limit} watch streams; "
                               "poll with Get instead")
        try:
            yield from self._serve(call, hub, make_stream)
        finally:
            self._slots.release()

    def _serve(self, call, hub, make_stream):
        context = call.context
        # subscribe before reading the current state, so no change falls between
        events = hub.subscribe()
        context.add_callback(lambda: offer(events, CLOSED))
        try:
            stream = make_stream()
            yield from stream.snapshot()
            while context.is_active():
                try:
                    item = events.get(timeout=5)
                except queue.Empty:
                    continue
                if item is CLOSED:
                    return
                if item is RESYNC:
                    yield from stream.snapshot()
                    continue
                message = stream.change(item)
                if message is not None:
                    yield message
        finally:
            hub.unsubscribe(events)
            log.info("%s stream closed", call.name, extra=tracing.fields(call.request_id))


class WatchStream:
    """The state of one Watch call: which VMs it may see and what it sent."""

    def __init__(self, call, vm_id, status=None, user=None):
        self.call = call
        self.vm_id = vm_id
        self.last_seq = {}      # vm id -> seq last sent
        # who may see what is decided once, from the event's owner, with no call per VM
        self.scope = call("watch_scope", status=status, user=user)

    def wanted(self, vm):
        """Whether a VM dict or vm.state event is within the stream's filters."""
        scope = self.scope
        return ((self.vm_id is None or vm["id"] == self.vm_id)
                and (scope["owner_id"] is None or vm.get("owner_id") == scope["owner_id"])
                and (scope["status"] is None
                     or scope["status"] in (vm.get("status"), vm.get("state"))))

    def snapshot(self):
        """Current-state messages for what the caller may see."""
        if self.vm_id is not None:
            vms = [self.call("get_vm", self.vm_id)]
        else:
            vms = self.call("list_vms")
        for vm in vms:
            if self.wanted(vm) and vm.get("seq", 0) > self.last_seq.get(vm["id"], -1):
                self.last_seq[vm["id"]] = vm.get("seq", 0)
                yield vm_change(vm, current=True)

    def change(self, event):
        """The message for ``event``, or None if this stream does not send it."""
        if not self.wanted(event) or event.get("seq", 0) <= self.last_seq.get(event["id"], -1):
            return None     # filtered out, a repeat, or older than what was sent
        self.last_seq[event["id"]] = event.get("seq", 0)
        return vm_change(event)


# ----------------------------------------------------------------- services

class Servicer:
    def __init__(self, requests):
        self.requests = requests

    def call(self, context, name):
        return Call(self.requests, context, f"{type(self).__name__}.{name}")


class VirtualMachineServicer(Servicer, vm_pb2_grpc.VirtualMachineServiceServicer):
    def __init__(self, requests, hub, watches):
        super().__init__(requests)
        self.hub = hub
        self.watches = watches

    def Create(self, request, context):
        call = self.call(context, "Create")
        spec = {**{name: optional(request, name) for name in ("name", "cpu", "vcpu", "memory",
                                                             "requirements", "rank", "vmgroup")},
                "template": request.template or None, "hold": request.hold,
                "request_id": call.request_id}
        return vm_message(call("create_vm", spec))

    def Get(self, request, context):
        return vm_message(self.call(context, "Get")("get_vm", request.id))

    def List(self, request, context):
        vms = self.call(context, "List")("list_vms", include_done=request.include_done)
        return fill(vm_pb2.ListVmsResponse(), {"vms": vms})

    def Terminate(self, request, context):
        vm = self.call(context, "Terminate")("terminate_vm", request.id, hard=request.hard)
        return vm_message(vm)

    def Action(self, request, context):
        options = {"hard": request.hard, "live": request.live,
                   "host_id": optional(request, "host_id"),
                   "operation": optional(request, "operation")}
        vm = self.call(context, "Action")("vm_action", request.id, request.action, options)
        return vm_message(vm)

    def Accounting(self, request, context):
        report = self.call(context, "Accounting")(
            "accounting", user=optional(request, "user"), start=iso_time(request, "start"),
            end=iso_time(request, "end"))
        return fill(vm_pb2.AccountingResponse(), report)

    def Watch(self, request, context):
        call = self.call(context, "Watch")
        yield from self.watches.serve(call, self.hub, lambda: WatchStream(
            call, optional(request, "id"), optional(request, "status"),
            optional(request, "user")))


class HostServicer(Servicer, host_pb2_grpc.HostServiceServicer):
    def Create(self, request, context):
        host = self.call(context, "Create")("create_host", request.name, ha=request.ha or None)
        return fill(host_pb2.Host(), host)

    def Get(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Get")("get_host", request.id))

    def List(self, request, context):
        hosts = self.call(context, "List")("list_hosts")
        return fill(host_pb2.ListHostsResponse(), {"hosts": hosts})

    def Enable(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Enable")("enable_host", request.id))

    def Disable(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Disable")("disable_host", request.id))

    def Delete(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Delete")("delete_host", request.id))

    def Offline(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Offline")("offline_host", request.id))

    def Flush(self, request, context):
        return fill(host_pb2.Host(), self.call(context, "Flush")("flush_host", request.id))

    def Update(self, request, context):
        host = self.call(context, "Update")("update_host", request.id,
                                            ha=optional(request, "ha"),
                                            template=struct_dict(request, "template"))
        return fill(host_pb2.Host(), host)


def struct_dict(request, name):
    """A Struct field as a dict of text values, or None when unset."""
    if not request.HasField(name):
        return None
    return {key: str(value) for key, value in MessageToDict(getattr(request, name)).items()}


class ClusterServicer(Servicer, cluster_pb2_grpc.ClusterServiceServicer):
    def Create(self, request, context):
        cluster = self.call(context, "Create")("create_cluster", request.name,
                                               struct_dict(request, "template"))
        return fill(cluster_pb2.Cluster(), cluster)

    def Get(self, request, context):
        return fill(cluster_pb2.Cluster(), self.call(context, "Get")("get_cluster", request.id))

    def List(self, request, context):
        clusters = self.call(context, "List")("list_clusters")
        return fill(cluster_pb2.ListClustersResponse(), {"clusters": clusters})

    def Delete(self, request, context):
        return fill(cluster_pb2.Cluster(),
                    self.call(context, "Delete")("delete_cluster", request.id))

    def AddHost(self, request, context):
        cluster = self.call(context, "AddHost")("cluster_add_host", request.id, request.host_id)
        return fill(cluster_pb2.Cluster(), cluster)

    def DelHost(self, request, context):
        cluster = self.call(context, "DelHost")("cluster_del_host", request.id, request.host_id)
        return fill(cluster_pb2.Cluster(), cluster)

    def Update(self, request, context):
        cluster = self.call(context, "Update")("update_cluster", request.id,
                                               struct_dict(request, "template") or {},
                                               request.replace)
        return fill(cluster_pb2.Cluster(), cluster)


class VmGroupServicer(Servicer, vmgroup_pb2_grpc.VmGroupServiceServicer):
    def Create(self, request, context):
        roles = [{"name": r.name, "policy": r.policy or None,
                  "host_affined": list(r.host_affined),
                  "host_anti_affined": list(r.host_anti_affined)} for r in request.roles]
        rules = [{"policy": r.policy, "roles": list(r.roles)} for r in request.rules]
        group = self.call(context, "Create")("create_vmgroup", request.name, roles, rules)
        return fill(vmgroup_pb2.VmGroup(), group)

    def Get(self, request, context):
        return fill(vmgroup_pb2.VmGroup(), self.call(context, "Get")("get_vmgroup", request.id))

    def List(self, request, context):
        groups = self.call(context, "List")("list_vmgroups")
        return fill(vmgroup_pb2.ListVmGroupsResponse(), {"vmgroups": groups})

    def Delete(self, request, context):
        return fill(vmgroup_pb2.VmGroup(),
                    self.call(context, "Delete")("delete_vmgroup", request.id))


class TemplateServicer(Servicer, template_pb2_grpc.TemplateServiceServicer):
    def Create(self, request, context):
        template = self.call(context, "Create")("create_template", request.name, request.text)
        return fill(template_pb2.Template(), template)

    def Get(self, request, context):
        template = self.call(context, "Get")("get_template", request.id)
        return fill(template_pb2.Template(), template)

    def List(self, request, context):
        templates = self.call(context, "List")("list_templates")
        return fill(template_pb2.ListTemplatesResponse(), {"templates": templates})

    def Delete(self, request, context):
        template = self.call(context, "Delete")("delete_template", request.id)
        return fill(template_pb2.Template(), template)

    def Instantiate(self, request, context):
        vm = self.call(context, "Instantiate")(
            "instantiate_template", request.id, name=optional(request, "name"), hold=request.hold)
        return vm_message(vm)


class SessionServicer(Servicer, session_pb2_grpc.SessionServiceServicer):
    def Login(self, request, context):
        call = self.call(context, "Login")
        if request.username:
            credentials = {"username": request.username, "password": request.password}
        else:
            credentials = call.credentials
        return fill(session_pb2.LoginResponse(), call.invoke("login", credentials))

    def Logout(self, request, context):
        self.call(context, "Logout")("logout")
        return session_pb2.LogoutResponse()


# (issue 5) datastores, images and virtual networks

class DatastoreServicer(Servicer, datastore_pb2_grpc.DatastoreServiceServicer):
    def Create(self, request, context):
        datastore = self.call(context, "Create")(
            "create_datastore", request.name, request.type, request.path,
            host_id=optional(request, "host_id"))
        return fill(datastore_pb2.Datastore(), datastore)

    def Get(self, request, context):
        return fill(datastore_pb2.Datastore(),
                    self.call(context, "Get")("get_datastore", request.id))

    def List(self, request, context):
        datastores = self.call(context, "List")("list_datastores")
        return fill(datastore_pb2.ListDatastoresResponse(), {"datastores": datastores})

    def Delete(self, request, context):
        return fill(datastore_pb2.Datastore(),
                    self.call(context, "Delete")("delete_datastore", request.id))


class ImageServicer(Servicer, image_pb2_grpc.ImageServiceServicer):
    def Create(self, request, context):
        image = self.call(context, "Create")(
            "create_image", request.name, request.path,
            datastore=optional(request, "datastore"), persistent=request.persistent)
        return fill(image_pb2.Image(), image)

    def Get(self, request, context):
        return fill(image_pb2.Image(), self.call(context, "Get")("get_image", request.id))

    def List(self, request, context):
        images = self.call(context, "List")("list_images")
        return fill(image_pb2.ListImagesResponse(), {"images": images})

    def Delete(self, request, context):
        return fill(image_pb2.Image(), self.call(context, "Delete")("delete_image", request.id))

    def SetPersistent(self, request, context):
        image = self.call(context, "SetPersistent")("set_image_persistent", request.id,
                                                    request.persistent)
        return fill(image_pb2.Image(), image)


class VirtualNetworkServicer(Servicer, vnet_pb2_grpc.VirtualNetworkServiceServicer):
    def vnet(self, context, name, method, *args):
        return fill(vnet_pb2.VirtualNetwork(), self.call(context, name)(method, *args))

    def Create(self, request, context):
        return self.vnet(context, "Create", "create_vnet", request.name, request.template)

    def Get(self, request, context):
        return self.vnet(context, "Get", "get_vnet", request.id)

    def List(self, request, context):
        vnets = self.call(context, "List")("list_vnets")
        return fill(vnet_pb2.ListVnetsResponse(), {"vnets": vnets})

    def Delete(self, request, context):
        return self.vnet(context, "Delete", "delete_vnet", request.id)

    def Hold(self, request, context):
        return self.vnet(context, "Hold", "vnet_hold", request.id, request.address)

    def Release(self, request, context):
        return self.vnet(context, "Release", "vnet_release", request.id, request.address)

    def AddAddressRange(self, request, context):
        return self.vnet(context, "AddAddressRange", "vnet_addar", request.id, request.template)

    def RemoveAddressRange(self, request, context):
        return self.vnet(context, "RemoveAddressRange", "vnet_rmar", request.id, request.ar_id)


# (issue 6) OneFlow: service templates and services

def flow_template_message(data):
    """A FlowTemplate from a template dict; its body travels as JSON text."""
    body = data.get("body")
    return fill(flow_pb2.FlowTemplate(), {
        **data, "body": body if isinstance(body, str) else json.dumps(body)})


def flow_message(data):
    return fill(flow_pb2.Flow(), data)


def flow_version(service):
    """What orders two states of one service: its ``seq`` if the flow service
    sends one, else when it last changed."""
    return (service.get("seq") or 0, str(service.get("updated_at") or ""))


class FlowWatchStream:
    """The state of one flow Watch call: which services it may see, and the
    version of each that it sent last."""

    def __init__(self, call, service_id):
        self.call = call
        self.service_id = service_id
        self.sent = {}          # service id -> flow_version last sent
        self.scope = call("flow_watch_scope")

    def wanted(self, service):
        owner_id = self.scope["owner_id"]
        return ((self.service_id is None or service["id"] == self.service_id)
                and (owner_id is None or service.get("owner_id") == owner_id))

    def snapshot(self):
        if self.service_id is not None:
            services = [self.call("get_flow", self.service_id)]
        else:
            services = self.call("list_flows")
        for service in services:
            message = self.change(service, current=True)
            if message is not None:
                yield message

    def change(self, service, current=False):
        """The message for a service dict or ``flow.service`` event, or None
        if this stream does not send it (filtered out, or older than what it sent)."""
        if not isinstance(service, dict) or "id" not in service or not self.wanted(service):
            return None
        version = flow_version(service)
        if service["id"] in self.sent and version < self.sent[service["id"]]:
            return None
        self.sent[service["id"]] = version
        return flow_pb2.FlowChange(flow=flow_message(service), current=current)


class FlowTemplateServicer(Servicer, flow_pb2_grpc.FlowTemplateServiceServicer):
    def template(self, context, name, method, *args, **kwargs):
        return flow_template_message(self.call(context, name)(method, *args, **kwargs))

    def Create(self, request, context):
        return self.template(context, "Create", "create_flow_template", request.body)

    def List(self, request, context):
        templates = self.call(context, "List")("list_flow_templates")
        return flow_pb2.ListFlowTemplatesResponse(
            templates=[flow_template_message(t) for t in templates])

    def Get(self, request, context):
        return self.template(context, "Get", "get_flow_template", request.id)

    def Update(self, request, context):
        return self.template(context, "Update", "update_flow_template", request.id,
                             request.body)

    def Delete(self, request, context):
        return self.template(context, "Delete", "delete_flow_template", request.id)

    def Clone(self, request, context):
        return self.template(context, "Clone", "clone_flow_template", request.id, request.name)

    def Instantiate(self, request, context):
        service = self.call(context, "Instantiate")(
            "instantiate_flow_template", request.id, name=optional(request, "name"),
            custom_attrs=dict(request.custom_attrs), networks=dict(request.networks))
        return flow_message(service)


class FlowServicer(Servicer, flow_pb2_grpc.FlowServiceServicer):
    def __init__(self, requests, hub, watches):
        super().__init__(requests)
        self.hub = hub
        self.watches = watches

    def flow(self, context, name, method, *args, **kwargs):
        return flow_message(self.call(context, name)(method, *args, **kwargs))

    def List(self, request, context):
        flows = self.call(context, "List")("list_flows")
        return flow_pb2.ListFlowsResponse(flows=[flow_message(f) for f in flows])

    def Get(self, request, context):
        return self.flow(context, "Get", "get_flow", request.id)

    def Delete(self, request, context):
        return self.flow(context, "Delete", "undeploy_flow", request.id)

    def Recover(self, request, context):
        return self.flow(context, "Recover", "recover_flow", request.id, delete=request.delete)

    def Release(self, request, context):
        return self.flow(context, "Release", "release_flow", request.id)

    def Scale(self, request, context):
        return self.flow(context, "Scale", "scale_flow", request.id, request.role,
                         request.cardinality, force=request.force)

    def RoleAction(self, request, context):
        return self.flow(context, "RoleAction", "flow_role_action", request.id, request.role,
                         request.action, period=request.period, number=request.number)

    def AddRole(self, request, context):
        return self.flow(context, "AddRole", "add_flow_role", request.id, request.body)

    def RemoveRole(self, request, context):
        return self.flow(context, "RemoveRole", "remove_flow_role", request.id, request.role)

    def Watch(self, request, context):
        call = self.call(context, "Watch")
        yield from self.watches.serve(call, self.hub, lambda: FlowWatchStream(
            call, optional(request, "id")))


# (issue 8) users, groups, quotas, provisioning requests and the audit log

def ref_value(text):
    """A user or group reference from the API: digits are an id, else a name."""
    return int(text) if is_digits(text) else text


def quota_limits(values):
    """The limits a SetQuotaRequest sets: {resource: value} for the fields
    present (-1 means no limit)."""
    return {name: getattr(values, name) for name in ("vms", "cpu", "memory", "images")
            if values.HasField(name)}


def audit_record(entry):
    return fill(request_pb2.AuditRecord(), {**entry, "details": json.dumps(entry.get("details")
                                                                           or {})})


def request_message(data):
    """A ProvisionRequest, with its VM and service as the VM and flow APIs give them."""
    message = fill(request_pb2.ProvisionRequest(),
                   {k: v for k, v in data.items() if k not in ("vm", "service", "history")})
    if data.get("vm"):
        message.vm.CopyFrom(vm_message(data["vm"]))
    if data.get("service"):
        message.service.CopyFrom(flow_message(data["service"]))
    message.history.extend(audit_record(e) for e in data.get("history") or ())
    return message


class UserServicer(Servicer, user_pb2_grpc.UserServiceServicer):
    def user(self, context, name, method, *args):
        return fill(user_pb2.UserInfo(), self.call(context, name)(method, *args))

    def Create(self, request, context):
        return self.user(context, "Create", "create_user", request.name, request.password,
                         request.role or "user", list(request.groups))

    def List(self, request, context):
        return fill(user_pb2.ListUsersResponse(),
                    {"users": self.call(context, "List")("list_users")})

    def Get(self, request, context):
        return self.user(context, "Get", "get_user", ref_value(request.ref))

    def Delete(self, request, context):
        return self.user(context, "Delete", "delete_user", ref_value(request.ref))

    def SetPassword(self, request, context):
        return self.user(context, "SetPassword", "set_password", ref_value(request.ref),
                         request.password)

    def SetRole(self, request, context):
        return self.user(context, "SetRole", "set_user_role", ref_value(request.ref),
                         request.role)


class GroupServicer(Servicer, user_pb2_grpc.GroupServiceServicer):
    def group(self, context, name, method, *args):
        return fill(user_pb2.GroupInfo(), self.call(context, name)(method, *args))

    def Create(self, request, context):
        return self.group(context, "Create", "create_group", request.name)

    def List(self, request, context):
        return fill(user_pb2.ListGroupsResponse(),
                    {"groups": self.call(context, "List")("list_groups")})

    def Get(self, request, context):
        return self.group(context, "Get", "get_group", ref_value(request.ref))

    def Delete(self, request, context):
        return self.group(context, "Delete", "delete_group", ref_value(request.ref))

    def AddUser(self, request, context):
        return self.group(context, "AddUser", "group_add_user", ref_value(request.group),
                          ref_value(request.user))

    def DelUser(self, request, context):
        return self.group(context, "DelUser", "group_del_user", ref_value(request.group),
                          ref_value(request.user))


class QuotaServicer(Servicer, user_pb2_grpc.QuotaServiceServicer):
    def Set(self, request, context):
        quota = self.call(context, "Set")("set_quota", request.scope, ref_value(request.ref),
                                          quota_limits(request.limits))
        return fill(user_pb2.QuotaInfo(), quota)

    def Get(self, request, context):
        quota = self.call(context, "Get")("get_quota", request.scope, ref_value(request.ref))
        return fill(user_pb2.QuotaInfo(), quota)


class RequestServicer(Servicer, request_pb2_grpc.RequestServiceServicer):
    def SubmitVm(self, request, context):
        call = self.call(context, "SubmitVm")
        vm = request.vm
        spec = {**{name: optional(vm, name) for name in ("name", "cpu", "vcpu", "memory",
                                                        "requirements", "rank", "vmgroup")},
                "template": vm.template or None, "hold": vm.hold,
                "template_id": optional(request, "template_id"),
                "request_id": call.request_id}
        return request_message(call("submit_vm", spec))

    def SubmitFlow(self, request, context):
        call = self.call(context, "SubmitFlow")
        # the x-request-id names the request: a retried call finds it (and its
        # service); positional, as call() takes a request_id keyword of its own
        return request_message(call(
            "submit_flow", request.template_id, optional(request, "name"),
            dict(request.custom_attrs), dict(request.networks), call.request_id))

    def List(self, request, context):
        found = self.call(context, "List")(
            "list_requests", waiting_for=optional(request, "waiting_for"),
            state=optional(request, "state"), mine=request.mine)
        return request_pb2.ListRequestsResponse(requests=[request_message(r) for r in found])

    def Get(self, request, context):
        return request_message(self.call(context, "Get")("get_request", request.id))

    def Approve(self, request, context):
        return request_message(self.call(context, "Approve")(
            "decide_request", request.id, True, request.reason))

    def Reject(self, request, context):
        return request_message(self.call(context, "Reject")(
            "decide_request", request.id, False, request.reason))

    def Stats(self, request, context):
        return fill(request_pb2.RequestStats(), self.call(context, "Stats")("request_stats"))

    def LoadProcess(self, request, context):
        return fill(request_pb2.ProcessInfo(),
                    self.call(context, "LoadProcess")("load_process", request.bpmn))

    def GetProcess(self, request, context):
        return fill(request_pb2.ProcessInfo(), self.call(context, "GetProcess")("get_process"))


class AuditServicer(Servicer, audit_pb2_grpc.AuditServiceServicer):
    def List(self, request, context):
        entries = self.call(context, "List")(
            "list_audit", object_kind=optional(request, "object_kind"),
            object_id=optional(request, "object_id"), actor=optional(request, "actor"),
            after_id=optional(request, "after_id"), limit=optional(request, "limit") or 1000)
        return audit_pb2.ListAuditResponse(entries=[audit_record(e) for e in entries])


class GateServicer(Servicer, gate_pb2_grpc.GateServiceServicer):
    """OneGate's platform side (issue 7): the secret's rotation."""

    def RotateSecret(self, request, context):
        return fill(gate_pb2.RotateSecretResponse(),
                    self.call(context, "RotateSecret")("rotate_gate_secret"))


class StatusServicer(Servicer, status_pb2_grpc.StatusServiceServicer):
    """The platform's processes as their heartbeats tell (issue 9)."""

    def List(self, request, context):
        return fill(status_pb2.ListStatusResponse(),
                    self.call(context, "List")("status", optional(request, "service")))


# ----------------------------------------------------------------- server

def server_credentials(gw):
    """TLS credentials from gateway.tls_cert and tls_key, or None: plaintext."""
    files = config.tls_files("gateway", gw)
    if files is None:
        return None
    cert, key = (Path(path).read_bytes() for path in files)
    return grpc.ssl_server_credentials([(key, cert)])


class Gateway:
    def __init__(self, cfg):
        gw = cfg["gateway"]
        credentials = server_credentials(gw)     # first: a wrong setting leaves nothing started
        self.address = f"{gw['address']}:{gw['port']}"
        workers = int(gw.get("workers", 16))
        self.requests = Requests(cfg["amqp"]["uri"], float(gw.get("rpc_timeout", 30)))
        self.hub = EventHub(cfg["amqp"]["uri"], messages.LIFECYCLE, messages.VM_STATE)
        self.flow_hub = EventHub(cfg["amqp"]["uri"], messages.FLOW, messages.FLOW_SERVICE)
        self.watches = Watches(max(1, workers // 2))
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="grpc"),
                                  # counted first: a refused call too
                                  interceptors=[GrpcMetrics(), AuthInterceptor()])
        vm_pb2_grpc.add_VirtualMachineServiceServicer_to_server(
            VirtualMachineServicer(self.requests, self.hub, self.watches), self.server)
        host_pb2_grpc.add_HostServiceServicer_to_server(HostServicer(self.requests), self.server)
        template_pb2_grpc.add_TemplateServiceServicer_to_server(
            TemplateServicer(self.requests), self.server)
        session_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(self.requests), self.server)
        datastore_pb2_grpc.add_DatastoreServiceServicer_to_server(
            DatastoreServicer(self.requests), self.server)
        image_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.requests),
                                                          self.server)
        vnet_pb2_grpc.add_VirtualNetworkServiceServicer_to_server(
            VirtualNetworkServicer(self.requests), self.server)
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(
            ClusterServicer(self.requests), self.server)
        vmgroup_pb2_grpc.add_VmGroupServiceServicer_to_server(
            VmGroupServicer(self.requests), self.server)
        flow_pb2_grpc.add_FlowTemplateServiceServicer_to_server(
            FlowTemplateServicer(self.requests), self.server)
        flow_pb2_grpc.add_FlowServiceServicer_to_server(
            FlowServicer(self.requests, self.flow_hub, self.watches), self.server)
        self.add_request_management(self.server)
        gate_pb2_grpc.add_GateServiceServicer_to_server(GateServicer(self.requests), self.server)
        status_pb2_grpc.add_StatusServiceServicer_to_server(StatusServicer(self.requests),
                                                            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in API_SERVICES]
        reflection.enable_server_reflection(
            names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.service_names = names
        self.tls = credentials is not None
        if self.tls:
            self.port = self.server.add_secure_port(self.address, credentials)
        else:
            self.port = self.server.add_insecure_port(self.address)
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.address}")

    def add_request_management(self, server):
        """Issue 8's services: users, groups, quotas, requests, audit."""
        user_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(self.requests), server)
        user_pb2_grpc.add_GroupServiceServicer_to_server(GroupServicer(self.requests), server)
        user_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(self.requests), server)
        request_pb2_grpc.add_RequestServiceServicer_to_server(RequestServicer(self.requests),
                                                              server)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(self.requests), server)

    def start(self):
        self.hub.start()
        self.flow_hub.start()
        self.server.start()
        for name in ["", *self.service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway listening on %s (%s)", self.address, "TLS" if self.tls else "plaintext")

    def stop(self, grace=5):
        log.info("gateway stopping")
        self.health.enter_graceful_shutdown()
        self.hub.stop()                    # ends the watch streams
        self.flow_hub.stop()
        self.server.stop(grace).wait()
        self.requests.close()
        log.info("gateway stopped")


def main(argv=None):
    from cirrus import heartbeat, instance
    instance.start("gateway")
    try:
        gateway = Gateway(config.get())
    except config.ConfigError as exc:
        log.error("configuration: %s", exc)
        sys.exit(2)
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gateway.start()
    while not stopping.wait(1):
        pass
    gateway.stop()
    heartbeat.stop()


if __name__ == "__main__":
    main()
