"""The OneGate HTTP application (WSGI, Werkzeug): routes, and the order in
which a request is checked. Each step is a function of protocol, security
or store; this module only strings them together and turns errors into
HTTP answers.

Order: route (400 if unknown) -> body size (413) -> token (401) -> rate
(429) -> route group switched on (403) -> body (400) -> reach and
restrictions (403) -> the change, audited.
"""
import contextlib
import json
import logging
import time

import psycopg2
import sqlalchemy.exc

from nameko.exceptions import RemoteError
from werkzeug.exceptions import MethodNotAllowed, NotFound as NoRoute, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from cirrus import errors, metrics
from services.gate import protocol, security, store
from services.gate.protocol import (BadRequest, Conflict, Forbidden, GateError, NotFound,
                                    TooLarge, Unauthorized, Unavailable)

log = logging.getLogger(__name__)

ROUTES = Map([
    Rule("/", endpoint="root", methods=["GET"]),
    Rule("/vm", endpoint="own_vm", methods=["GET", "PUT"]),
    Rule("/service", endpoint="service", methods=["GET"]),
    Rule("/vms/<vm>", endpoint="other_vm", methods=["GET", "PUT"]),
    Rule("/vms/<vm>/action", endpoint="vm_action", methods=["POST"]),
    Rule("/service/role/<role>", endpoint="scale", methods=["PUT"]),
], strict_slashes=False)
ROUTE_KEY = "cirrus.route"     # the environ key of the route a request matched

# a CirrusError from lifecycle or flow, as the guest sees it
STATUS_OF = {"InvalidArgument": BadRequest, "TemplateError": BadRequest, "NotFound": NotFound,
             "FailedPrecondition": Conflict, "FlowTransitionError": Conflict,
             "TransitionError": Conflict, "PermissionDenied": Forbidden,
             "Unauthenticated": Unauthorized, "Unavailable": Unavailable,
             "ResourceExhausted": protocol.TooManyRequests, "AlreadyExists": Conflict}


def as_gate_error(exc):
    """The GateError for an error of Cirrus (raised here or by a remote service)."""
    name = getattr(exc, "exc_type", None) or type(exc).__name__
    message = getattr(exc, "value", None) or str(exc)
    cls = STATUS_OF.get(name)
    if cls is None:
        for base in type(exc).__mro__:
            cls = STATUS_OF.get(base.__name__)
            if cls:
                break
    return (cls or Unavailable)(message)


def json_response(document, status=200, headers=None):
    return Response(json.dumps(document), status=status, headers=headers,
                    content_type="application/json")


class Gate:
    """The WSGI application. ``engine``: reads (its connections autocommit,
    with ``store.prepare`` run on each); ``relay``: writes with their
    events; ``session_factory``: audit rows of remote writes; ``rpc``: flow's
    scale and lifecycle's VM actions (``scale(...)``, ``vm_action(...)``)."""

    def __init__(self, settings, engine, relay, session_factory, rpc):
        self.settings, self.engine, self.relay = settings, engine, relay
        self.session_factory, self.rpc = session_factory, rpc
        self.writes = store.Writes(relay)
        self.limiter = security.RateLimiter(settings.rate, settings.burst)

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        response = self.respond(environ)
        metrics.gate_request(environ.get(ROUTE_KEY), response.status_code,
                             time.perf_counter() - started)
        return response(environ, start_response)

    def respond(self, environ):
        override = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE")
        if override:
            # busybox wget can only GET and POST: POST + override PUT is a PUT
            if environ.get("REQUEST_METHOD") != "POST" or override.upper() != "PUT":
                return self.error(BadRequest("X-HTTP-Method-Override: only a POST may be "
                                             "sent as a PUT"))
            environ["REQUEST_METHOD"] = "PUT"
        request = Request(environ)
        request.max_content_length = self.settings.max_body
        try:
            rule, args = ROUTES.bind_to_environ(environ).match(return_rule=True)
            environ[ROUTE_KEY] = f"{request.method} {rule.rule}"     # for the metrics
            return getattr(self, rule.endpoint)(request, **args)
        except NoRoute:
            return self.error(BadRequest(f"unknown route {request.path[:100]}; see GET /"))
        except MethodNotAllowed as exc:
            return self.error(GateError(f"{request.method} is not allowed on "
                                        f"{request.path[:100]}"), 405,
                              {"Allow": ", ".join(exc.valid_methods or ())})
        except RequestEntityTooLarge:
            return self.error(TooLarge(f"body: larger than {self.settings.max_body} bytes"))
        except GateError as exc:
            return self.error(exc)
        except (errors.CirrusError, RemoteError) as exc:
            return self.error(as_gate_error(exc))
        except Exception:
            log.exception("%s %s failed", request.method, request.path[:100])
            return self.error(Unavailable("the gate could not answer; try again"))

    def error(self, exc, status=None, headers=None):
        return json_response({"error": {"message": exc.message}}, status or exc.status,
                             {**exc.headers, **(headers or {})})

    # ---------------------------------------------------------------- steps

    def body(self, request):
        if request.content_length is not None and request.content_length > self.settings.max_body:
            raise TooLarge(f"body: {request.content_length} bytes, more than "
                           f"{self.settings.max_body}")
        if request.content_length is None and \
                "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            # Werkzeug reads no body of unknown length: read it here, up to the limit
            data = request.environ["wsgi.input"].read(self.settings.max_body + 1)
            if len(data) > self.settings.max_body:
                raise TooLarge(f"body: larger than {self.settings.max_body} bytes")
            return data
        return request.get_data(cache=True)

    @contextlib.contextmanager
    def reads(self):
        """A cursor on a pooled read connection (autocommit, the reads
        prepared); a connection that failed is dropped from the pool."""
        try:
            connection = self.engine.raw_connection()
        except sqlalchemy.exc.OperationalError as exc:
            raise Unavailable("the database is unavailable; try again") from exc
        try:
            with connection.cursor() as cursor:
                yield cursor
        except psycopg2.OperationalError as exc:
            connection.invalidate(exc)
            raise Unavailable("the database is unavailable; try again") from exc
        finally:
            connection.close()

    def authenticate(self, conn, request, with_service=False):
        """The calling VM, checked against its token; rate-limited. With
        ``with_service``, its service's rows come in the same query."""
        vm_id = security.claimed_vm_id(request.headers)
        token = security.claimed_token(request.headers)
        me = store.caller(conn, vm_id, with_service)
        if me is None or not me["has_token"]:
            raise Unauthorized("X-ONEGATE-TOKEN: not a valid token for this VM")
        secret = self.settings.configured_secret or me["secret"]
        security.check_token(secret, vm_id, me["started_at"], token)
        self.limiter.take(vm_id)
        return me

    def target(self, conn, me, raw_id):
        """Another VM the caller names: its own or one of its service's."""
        target_id = protocol.parse_vm_id(raw_id, "VM id")
        if target_id == me["id"]:
            return me
        found = store.vm(conn, target_id)
        security.check_reach(me, target_id, found["service_id"] if found else None)
        return found

    # ---------------------------------------------------------------- routes

    def root(self, request):
        with self.reads() as conn:
            self.authenticate(conn, request)
        return json_response(protocol.links(request.host_url.rstrip("/")))

    def own_vm(self, request):
        return self.vm_route(request, None, "/vm")

    def other_vm(self, request, vm):
        return self.vm_route(request, vm, "/vms/<id>")

    def vm_route(self, request, raw_id, route):
        data = self.body(request) if request.method == "PUT" else b""
        with self.reads() as conn:
            me = self.authenticate(conn, request)
            if request.method == "GET":
                security.check_route(self.settings, "vm_read")
                shown = me if raw_id is None else self.target(conn, me, raw_id)
                return json_response(protocol.vm_document(shown))
            security.check_route(self.settings, "vm_write")
            kind = protocol.update_type(request.args.get("type"))
            names = (protocol.parse_names(data) if kind == "erase"
                     else protocol.parse_attributes(data))
            target = me if raw_id is None else self.target(conn, me, raw_id)
        security.check_attributes(self.settings, names)
        where = f"PUT {route}"
        after = self.writes.run(store.Write(
            me["id"], target["id"], where, **({"names": names} if kind == "erase"
                                             else {"attrs": names})))
        return json_response(protocol.vm_document({**target, "template": {
            **(target["template"] or {}), "USER_TEMPLATE": after}}))

    def service(self, request):
        with self.reads() as conn:
            me = self.authenticate(conn, request, with_service=True)
            security.check_route(self.settings, "service_read")
            if me["service_id"] is None:
                raise NotFound(f"VM {me['id']} is not part of a service")
            found = store.service(conn, me["service_id"], extended="extended" in request.args,
                                  service_rows=me["service_rows"] or ())
        if found is None:
            raise NotFound(f"service {me['service_id']} no longer exists")
        return json_response(protocol.service_document(*found))

    def vm_action(self, request, vm):
        data = self.body(request)
        with self.reads() as conn:
            me = self.authenticate(conn, request)
            security.check_route(self.settings, "vm_action")
            perform, action, options = protocol.parse_action(data)
            target = self.target(conn, me, vm)
        security.check_action(self.settings, perform)
        self.rpc.vm_action(target["id"], action, options)
        store.record(self.session_factory, me["id"], "gate.vm.action", "vm", target["id"],
                     route="POST /vms/<id>/action", action=perform)
        with self.reads() as conn:
            return json_response(protocol.vm_document(store.vm(conn, target["id"])))

    def scale(self, request, role):
        data = self.body(request)
        with self.reads() as conn:
            me = self.authenticate(conn, request)
            security.check_route(self.settings, "service_scale")
            cardinality = protocol.parse_cardinality(data)
            if me["service_id"] is None:
                raise NotFound(f"VM {me['id']} is not part of a service")
            if role not in store.role_names(conn, me["service_id"]):
                raise NotFound(f"your service has no role {role[:60]!r}")
        self.rpc.scale(me["service_id"], role, cardinality)
        store.record(self.session_factory, me["id"], "gate.service.scale", "service",
                     me["service_id"], route="PUT /service/role/<role>", role=role,
                     cardinality=cardinality)
        with self.reads() as conn:
            return json_response(protocol.service_document(*store.service(conn,
                                                                          me["service_id"])))
