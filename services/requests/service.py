"""The request manager: authenticates every call, validates requests, and
hands them to the service that owns the resource.

A VM or a service is made through a provisioning request (issue 8): its
quotas are charged, the approval process runs (services/requests/approvals.py),
and once approved the request provisions through ``lifecycle`` or ``flow``.
Users, groups, quotas, the audit log and the CMDB sink live here too.
"""
import json
import logging
from datetime import timedelta

from nameko.events import event_handler
from nameko.rpc import rpc
from nameko.timer import timer
from sqlalchemy import select

from cirrus import auth, config, heartbeat, messages, states
from cirrus.db.models import User, utcnow
from cirrus.dependencies import Database, OutboxRelay, Rpc, vm_state_handler
from cirrus.metrics import Metrics
from cirrus.tracing import Tracing
from cirrus.errors import (CirrusError, FailedPrecondition, InvalidArgument, NotFound,
                           PermissionDenied, Unauthenticated, Unavailable)
from cirrus.template import vm_resources as template_resources
from services.lifecycle import devices
from services.requests import approvals, audit, cmdb, provisioning, quotas, status, users
from cirrus.expressions import ExpressionError, compile_rank, compile_requirements
from cirrus.template import parse, vm_resources

api = rpc(expected_exceptions=CirrusError)
log = logging.getLogger(__name__)

# issue 8: the requests section of the configuration, with its defaults
SETTINGS = {"housekeeping_interval": 2, "stuck_after": 30, "cmdb_sink": "jsonl",
            "cmdb_path": "/var/tmp/cirrus/cmdb.jsonl", "cmdb_url": None, "cmdb_retries": 3,
            "cmdb_timeout": 5, **(config.get().get("requests") or {})}
HOUSEKEEPING_INTERVAL = float(SETTINGS["housekeeping_interval"])
# an APPROVED request not changed for this long is provisioned again
STUCK_AFTER = timedelta(seconds=float(SETTINGS["stuck_after"]))

# VM actions that choose a host: administrators only, as in OpenNebula
ADMIN_ACTIONS = frozenset({"deploy", "migrate"})
# what a Watch may filter on: a status word, or a state word (ACTIVE) for all its statuses
WATCH_STATUSES = sorted(set(states.ALL_STATUSES) | {s.value for s in states.VmState})


def parse_template(text):
    return parse(text or "", config.get()["limits"]["template_bytes"])


def one_range(template):
    """The address range of an addar template: its one ``AR`` vector, or the
    template itself when it holds the AR's keys (TYPE, IP, SIZE...) alone."""
    if "AR" not in template:
        return template
    ranges = template["AR"]
    if isinstance(ranges, list):
        if len(ranges) != 1:
            raise InvalidArgument(f"AR: addar takes one address range, the template has "
                                  f"{len(ranges)}")
        ranges = ranges[0]
    return ranges


def allocate_arguments(template, spec):
    """Merge a request's explicit fields over a parsed template's
    NAME/CPU/VCPU/MEMORY, SCHED_REQUIREMENTS, SCHED_RANK and VMGROUP; returns
    the arguments of lifecycle.allocate."""
    template = dict(template)
    for key in ("name", "cpu", "vcpu", "memory"):
        if spec.get(key) is not None:
            template[key.upper()] = str(spec[key])
    template.update(placement_fields(spec))
    check_expressions(template)
    resources = vm_resources(template)
    return dict(name=resources["name"], cpu=resources["cpu"], vcpu=resources["vcpu"],
                memory=resources["memory"], template=template, hold=bool(spec.get("hold")),
                request_id=spec.get("request_id"))


def placement_fields(spec):
    """The template keys that a request's requirements, rank and vmgroup set."""
    out = {}
    if spec.get("requirements") is not None:
        out["SCHED_REQUIREMENTS"] = spec["requirements"]
    if spec.get("rank") is not None:
        out["SCHED_RANK"] = spec["rank"]
    if spec.get("vmgroup") is not None:
        name, _, role = str(spec["vmgroup"]).partition(":")
        if not name.strip() or not role.strip():
            raise InvalidArgument(f"vmgroup: give NAME:ROLE, got {spec['vmgroup']!r}")
        out["VMGROUP"] = {"VMGROUP_NAME": name.strip(), "ROLE": role.strip()}
    return out


def check_expressions(template):
    """Refuse a SCHED_REQUIREMENTS or SCHED_RANK that does not compile, here,
    before anything is written (lifecycle checks again)."""
    try:
        compile_requirements(template.get("SCHED_REQUIREMENTS"), template)
        compile_rank(template.get("SCHED_RANK"), template)
    except ExpressionError as exc:
        raise InvalidArgument(str(exc)) from None


class RequestsService:
    name = "requests"

    db = Database()
    metrics = Metrics()
    trace = Tracing(log_calls=True)
    lifecycle = Rpc(messages.LIFECYCLE)
    flow = Rpc(messages.FLOW)

    def user(self, credentials):
        with self.db() as session:
            try:
                user = auth.authenticate(session, credentials)
            except auth.AuthError as exc:
                raise Unauthenticated(str(exc)) from None
            caller = {"id": user.id, "name": user.name, "role": user.role,
                      "admin": user.role == "admin"}
            if session.dirty:       # an old password hash, replaced by argon2
                session.commit()
            return caller

    def owned(self, user, resource, kind, rid):
        """Users see their own resources; admins see all. Others' look absent."""
        if not user["admin"] and resource["owner_id"] != user["id"]:
            raise NotFound(f"{kind} {rid} does not exist")
        return resource

    def admin(self, credentials, what="host management"):
        user = self.user(credentials)
        if not user["admin"]:
            raise PermissionDenied(f"{what} is for administrators")
        return user

    def owner_id(self, caller, name, what):
        """The id of the user called ``name`` whose VMs ``caller`` asks about
        (``what``); users may only ask about themselves."""
        if name == caller["name"]:
            return caller["id"]
        if not caller["admin"]:
            raise PermissionDenied(f"{what} of other users is for administrators")
        with self.db() as session:
            user_id = session.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            raise NotFound(f"user {name!r} does not exist")
        return user_id

    @api
    def login(self, credentials):
        with self.db() as session, session.begin():
            try:
                user, token, expires = auth.login(session, credentials.get("username"),
                                                  credentials.get("password"))
            except auth.AuthError as exc:
                raise Unauthenticated(str(exc)) from None
            return {"token": token, "expires_at": expires.isoformat(),
                    "user": {"id": user.id, "name": user.name, "role": user.role}}

    @api
    def logout(self, credentials):
        """Forget the caller's token: it stops working at once (expired or
        not); UNAUTHENTICATED if the server does not know it."""
        token = (credentials or {}).get("token")
        if not token:
            raise InvalidArgument("logout ends a token's session: call it with the token "
                                  "(authorization: Bearer), not a password")
        with self.db() as session, session.begin():
            if not auth.logout(session, token):
                raise Unauthenticated("unknown token: it was logged out or never issued")
        return {}

    @api
    def whoami(self, credentials):
        """The caller: {"id", "name", "role", "admin"}."""
        return self.user(credentials)

    # -------------------------------------------------------------- VMs

    @api
    def create_vm(self, credentials, spec):
        """A VM through a provisioning request: the VM if the request is
        provisioned at once, else FAILED_PRECONDITION naming the request
        (SubmitVm answers with the request instead)."""
        return self.vm_or_waiting(self.submit_vm(credentials, spec))

    @api
    def get_vm(self, credentials, vm_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_vm(vm_id), "VM", vm_id)

    @api
    def list_vms(self, credentials, include_done=False):
        user = self.user(credentials)
        return self.lifecycle.list_vms(None if user["admin"] else user["id"], include_done)

    @api
    def terminate_vm(self, credentials, vm_id, hard=False):
        return self.vm_action(credentials, vm_id, "terminate", {"hard": hard})

    @api
    def vm_action(self, credentials, vm_id, action, options=None):
        """A user action on a VM (lifecycle checks the action and its options)."""
        user = self.user(credentials)
        if action in ADMIN_ACTIONS and not user["admin"]:
            raise PermissionDenied(f"{action} chooses a host: it is for administrators")
        self.owned(user, self.lifecycle.get_vm(vm_id), "VM", vm_id)
        return self.lifecycle.vm_action(vm_id, action, options)

    @api
    def watch_scope(self, credentials, status=None, user=None):
        """What a Watch stream may send: {"caller", "status", "owner_id"}; the
        stream sends a change of a VM owned by ``owner_id`` (None: any the
        caller may see) whose status or state is ``status`` (None: any)."""
        caller = self.user(credentials)
        if status is not None:
            status = status.upper()
            if status not in WATCH_STATUSES:
                raise InvalidArgument(f"status: unknown VM status {status!r}; choose from "
                                      f"{', '.join(WATCH_STATUSES)}")
        owner_id = None if user is None else self.owner_id(caller, user, "watching the VMs")
        if owner_id is None and not caller["admin"]:
            owner_id = caller["id"]
        return {"caller": caller, "status": status, "owner_id": owner_id}

    @api
    def accounting(self, credentials, user=None, start=None, end=None):
        """Usage over [start, end) (ISO-8601 strings): a user's own VMs; an
        administrator's: every user's, or those of ``user``."""
        caller = self.user(credentials)
        if user is not None:
            owner_id = self.owner_id(caller, user, "accounting")
        else:
            owner_id = None if caller["admin"] else caller["id"]
        return self.lifecycle.accounting(owner_id, start, end)

    # -------------------------------------------------------------- hosts

    @api
    def create_host(self, credentials, name, ha=None):
        self.admin(credentials)
        return self.lifecycle.create_host(name, ha or "none")

    @api
    def get_host(self, credentials, host_id):
        self.user(credentials)
        return self.lifecycle.get_host(host_id)

    @api
    def list_hosts(self, credentials):
        self.user(credentials)
        return self.lifecycle.list_hosts()

    @api
    def enable_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.enable_host(host_id)

    @api
    def disable_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.disable_host(host_id)

    @api
    def delete_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.delete_host(host_id)

    @api
    def offline_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.offline_host(host_id)

    @api
    def flush_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.flush_host(host_id)

    @api
    def update_host(self, credentials, host_id, ha=None, template=None):
        """Change a host's settings: its HA policy, and KEY=VALUE in its
        template (an empty value removes a key)."""
        self.admin(credentials)
        if ha is None and not template:
            raise InvalidArgument("nothing to update: give ha or KEY=VALUE template pairs")
        host = None
        if template:
            host = self.lifecycle.update_host(host_id, template)
        if ha is not None:
            host = self.lifecycle.set_host_ha(host_id, ha)
        return host

    # -------------------------------------------------------------- clusters (issue 4)

    @api
    def create_cluster(self, credentials, name, template=None):
        self.admin(credentials)
        return self.lifecycle.create_cluster(name, template)

    @api
    def get_cluster(self, credentials, cluster_id):
        self.user(credentials)
        return self.lifecycle.get_cluster(cluster_id)

    @api
    def list_clusters(self, credentials):
        self.user(credentials)
        return self.lifecycle.list_clusters()

    @api
    def delete_cluster(self, credentials, cluster_id):
        self.admin(credentials)
        return self.lifecycle.delete_cluster(cluster_id)

    @api
    def cluster_add_host(self, credentials, cluster_id, host_id):
        self.admin(credentials)
        return self.lifecycle.cluster_add_host(cluster_id, host_id)

    @api
    def cluster_del_host(self, credentials, cluster_id, host_id):
        self.admin(credentials)
        return self.lifecycle.cluster_del_host(cluster_id, host_id)

    @api
    def update_cluster(self, credentials, cluster_id, template, replace=False):
        self.admin(credentials)
        return self.lifecycle.update_cluster(cluster_id, template, replace)

    # -------------------------------------------------------------- VM groups (issue 4)

    @api
    def create_vmgroup(self, credentials, name, roles, rules=None):
        user = self.user(credentials)
        return self.lifecycle.create_vmgroup(user["id"], name, roles, rules)

    @api
    def get_vmgroup(self, credentials, group_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_vmgroup(group_id), "VM group", group_id)

    @api
    def list_vmgroups(self, credentials):
        user = self.user(credentials)
        return self.lifecycle.list_vmgroups(None if user["admin"] else user["id"])

    @api
    def delete_vmgroup(self, credentials, group_id):
        self.get_vmgroup(credentials, group_id)
        return self.lifecycle.delete_vmgroup(group_id)

    # -------------------------------------------------------------- templates

    @api
    def create_template(self, credentials, name, text):
        user = self.user(credentials)
        return self.lifecycle.create_template(user["id"], name, parse_template(text))

    @api
    def get_template(self, credentials, template_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_template(template_id), "template", template_id)

    @api
    def list_templates(self, credentials):
        user = self.user(credentials)
        return self.lifecycle.list_templates(None if user["admin"] else user["id"])

    @api
    def delete_template(self, credentials, template_id):
        self.get_template(credentials, template_id)
        return self.lifecycle.delete_template(template_id)

    @api
    def instantiate_template(self, credentials, template_id, name=None, hold=False):
        """A VM from a template, through a provisioning request like create_vm."""
        return self.vm_or_waiting(self.submit_vm(
            credentials, {"template_id": template_id, "name": name, "hold": hold}))

    # -------------------------------------------------------------- storage and networks
    # (issue 5) as OpenNebula authorizes them: datastores and virtual networks are made
    # and changed by administrators; every user reads them (a NIC names a network, an
    # image a datastore). Images belong to their owner, like templates.

    @api
    def create_datastore(self, credentials, name, type, path, host_id=None):
        self.admin(credentials, "datastore management")
        return self.lifecycle.create_datastore(name, type, path, host_id)

    @api
    def get_datastore(self, credentials, datastore_id):
        self.user(credentials)
        return self.lifecycle.get_datastore(datastore_id)

    @api
    def list_datastores(self, credentials):
        self.user(credentials)
        return self.lifecycle.list_datastores()

    @api
    def delete_datastore(self, credentials, datastore_id):
        self.admin(credentials, "datastore management")
        return self.lifecycle.delete_datastore(datastore_id)

    @api
    def create_image(self, credentials, name, path, datastore=None, persistent=False):
        """An image, counted against its owner's images quota while it exists."""
        user = self.user(credentials)
        with self.relay.transaction() as session:
            charge_id = quotas.charge(session, "image", quotas.scopes_of(session, user["id"]),
                                      quotas.need_of(images=1)).id
        try:
            image = self.lifecycle.create_image(user["id"], name, path, datastore, persistent)
        except Exception:
            with self.relay.transaction() as session:
                quotas.release(session, charge_id)
            raise
        with self.relay.transaction() as session:
            quotas.attach(session, charge_id, image["id"])
        return image

    @api
    def get_image(self, credentials, image_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_image(image_id), "image", image_id)

    @api
    def list_images(self, credentials):
        user = self.user(credentials)
        return self.lifecycle.list_images(None if user["admin"] else user["id"])

    @api
    def delete_image(self, credentials, image_id):
        self.get_image(credentials, image_id)
        image = self.lifecycle.delete_image(image_id)
        with self.relay.transaction() as session:
            quotas.release_resource(session, "image", image_id)
        return image

    @api
    def set_image_persistent(self, credentials, image_id, persistent):
        self.get_image(credentials, image_id)
        return self.lifecycle.set_image_persistent(image_id, bool(persistent))

    def with_owner_names(self, vnets):
        """Networks as lifecycle gives them, each with its owner's user name."""
        with self.db() as session:
            names = dict(session.execute(select(User.id, User.name).where(
                User.id.in_({vnet["owner_id"] for vnet in vnets}))).all())
        return [{**vnet, "owner": names.get(vnet["owner_id"])} for vnet in vnets]

    def with_owner_name(self, vnet):
        return self.with_owner_names([vnet])[0]

    def vnet_admin(self, credentials):
        return self.admin(credentials, "virtual network management")

    @api
    def create_vnet(self, credentials, name, text):
        """A network from its template text (NAME, NETWORK_MASK, GATEWAY, DNS, AR vectors)."""
        user = self.vnet_admin(credentials)
        vnet = self.lifecycle.create_vnet(user["id"], name, parse_template(text))
        return self.with_owner_name(vnet)

    @api
    def get_vnet(self, credentials, vnet_id):
        self.user(credentials)
        return self.with_owner_name(self.lifecycle.get_vnet(vnet_id))

    @api
    def list_vnets(self, credentials):
        self.user(credentials)
        return self.with_owner_names(self.lifecycle.list_vnets())

    @api
    def delete_vnet(self, credentials, vnet_id):
        self.vnet_admin(credentials)
        return self.with_owner_name(self.lifecycle.delete_vnet(vnet_id))

    @api
    def vnet_hold(self, credentials, vnet_id, address):
        self.vnet_admin(credentials)
        return self.with_owner_name(self.lifecycle.vnet_hold(vnet_id, address))

    @api
    def vnet_release(self, credentials, vnet_id, address):
        self.vnet_admin(credentials)
        return self.with_owner_name(self.lifecycle.vnet_release(vnet_id, address))

    @api
    def vnet_addar(self, credentials, vnet_id, text):
        """addar from a template holding one ``AR = [...]``, or the AR's keys alone."""
        self.vnet_admin(credentials)
        ar = one_range(parse_template(text))
        return self.with_owner_name(self.lifecycle.vnet_addar(vnet_id, ar))

    @api
    def vnet_rmar(self, credentials, vnet_id, ar_id):
        self.vnet_admin(credentials)
        return self.with_owner_name(self.lifecycle.vnet_rmar(vnet_id, ar_id))


    # -------------------------------------------------------------- OneFlow (issue 6)
    # Service templates and services belong to their owner, like VM templates and
    # VMs: users reach their own, administrators all; the flow service does the rest.

    @api
    def create_flow_template(self, credentials, body):
        user = self.user(credentials)
        return self.with_owner_name(self.flow.create_template(user["id"],
                                                              flow_template_body(body)))

    @api
    def list_flow_templates(self, credentials):
        user = self.user(credentials)
        return self.with_owner_names(self.flow.list_templates(None if user["admin"]
                                                              else user["id"]))

    @api
    def get_flow_template(self, credentials, template_id):
        user = self.user(credentials)
        template = self.owned(user, self.flow.get_template(template_id), "service template",
                              template_id)
        return self.with_owner_name(template)

    @api
    def update_flow_template(self, credentials, template_id, body):
        self.get_flow_template(credentials, template_id)
        return self.with_owner_name(self.flow.update_template(template_id,
                                                              flow_template_body(body)))

    @api
    def delete_flow_template(self, credentials, template_id):
        template = self.get_flow_template(credentials, template_id)
        self.flow.delete_template(template_id)
        return template

    @api
    def clone_flow_template(self, credentials, template_id, name):
        user = self.user(credentials)
        self.owned(user, self.flow.get_template(template_id), "service template", template_id)
        if not str(name or "").strip():
            raise InvalidArgument("name: give the copy a name")
        return self.with_owner_name(self.flow.clone_template(template_id, name.strip(),
                                                             user["id"]))

    @api
    def instantiate_flow_template(self, credentials, template_id, name=None, custom_attrs=None,
                                  networks=None):
        """A service from a template: ``custom_attrs`` {NAME: value}, ``networks``
        {network name: virtual network id}."""
        request = self.submit_flow(credentials, template_id, name=name,
                                   custom_attrs=custom_attrs, networks=networks)
        if request.get("service") is None:
            raise FailedPrecondition(waiting_message(request))
        return request["service"]

    @api
    def list_flows(self, credentials):
        user = self.user(credentials)
        return self.with_owner_names(self.flow.list_services(None if user["admin"]
                                                             else user["id"]))

    @api
    def get_flow(self, credentials, service_id):
        user = self.user(credentials)
        return self.with_owner_name(self.owned(user, self.flow.get_service(service_id),
                                               "service", service_id))

    @api
    def undeploy_flow(self, credentials, service_id):
        self.get_flow(credentials, service_id)
        return self.flow_after(service_id, self.flow.undeploy(service_id))

    @api
    def recover_flow(self, credentials, service_id, delete=False):
        self.get_flow(credentials, service_id)
        return self.flow_after(service_id, self.flow.recover(service_id, delete=bool(delete)))

    @api
    def release_flow(self, credentials, service_id):
        self.get_flow(credentials, service_id)
        return self.flow_after(service_id, self.flow.release(service_id))

    @api
    def scale_flow(self, credentials, service_id, role, cardinality, force=False):
        service = self.get_flow(credentials, service_id)
        check_role(service, role)
        if cardinality < 0:
            raise InvalidArgument(f"cardinality: must be 0 or more, got {cardinality}")
        return self.flow_after(service_id, self.flow.scale(service_id, role, cardinality,
                                                           force=bool(force)))

    @api
    def flow_role_action(self, credentials, service_id, role, action, period=0, number=0):
        service = self.get_flow(credentials, service_id)
        check_role(service, role)
        for key, value in (("period", period), ("number", number)):
            if value < 0:
                raise InvalidArgument(f"{key}: must be 0 or more, got {value}")
        return self.flow_after(service_id, self.flow.role_action(service_id, role, action,
                                                                 period=period, number=number))

    @api
    def add_flow_role(self, credentials, service_id, body):
        self.get_flow(credentials, service_id)
        return self.flow_after(service_id, self.flow.add_role(service_id,
                                                              flow_template_body(body)))

    @api
    def remove_flow_role(self, credentials, service_id, role):
        check_role(self.get_flow(credentials, service_id), role)
        return self.flow_after(service_id, self.flow.remove_role(service_id, role))

    def flow_after(self, service_id, result):
        """The service as an action left it: what the flow service answered,
        or, if it answered nothing, the service read again."""
        return self.with_owner_name(result if isinstance(result, dict)
                                    else self.flow.get_service(service_id))

    @api
    def flow_watch_scope(self, credentials):
        """What a flow Watch stream may send: {"caller", "owner_id"}; None
        (administrators) means every service."""
        caller = self.user(credentials)
        return {"caller": caller, "owner_id": None if caller["admin"] else caller["id"]}


    # -------------------------------------------------------------- request management (issue 8)
    # Users and groups, quotas, provisioning requests and their approvals, the
    # audit log. Who may do what: administrators manage users, groups, quotas and
    # the process; approvers (finance, cloud-admin) decide the requests waiting
    # for their role and, like administrators, see every request and the audit log.

    relay = OutboxRelay()

    def see_all(self, credentials, what):
        user = self.user(credentials)
        if user["role"] not in provisioning.SEE_ALL:
            raise PermissionDenied(f"{what} is for administrators and approvers")
        return user

    @api
    def submit_vm(self, credentials, spec):
        """A provisioning request for a VM: ``spec`` as create_vm's, or
        {"template_id", "name", "hold"} to instantiate a template. Returns the
        request, with "vm" once provisioned."""
        user = self.user(credentials)
        if spec.get("template_id") is not None:
            template = self.owned(user, self.lifecycle.get_template(spec["template_id"]),
                                  "template", spec["template_id"])
            body = template["body"]
            spec = {"name": spec.get("name") or template["name"], "hold": spec.get("hold"),
                    "request_id": spec.get("request_id")}
            kind = "template"
        else:
            body = parse_template(spec["template"]) if spec.get("template") else {}
            kind = "vm"
        allocate = allocate_arguments(body, spec)
        need = quotas.need_of(vms=1, cpu=allocate["vcpu"], memory=allocate["memory"])
        return self.submit(user, kind, {"allocate": allocate}, allocate, allocate["template"],
                           need, spec.get("request_id"))

    @api
    def submit_flow(self, credentials, template_id, name=None, custom_attrs=None,
                    networks=None, request_id=None):
        """A provisioning request for a OneFlow service; its process reads the
        service's whole size (every role's cardinality times its VM's), which
        its quotas hold until flow makes the VMs. ``request_id``: a repeat
        with the same one returns the same request (and service)."""
        user = self.user(credentials)
        template = self.owned(user, self.flow.get_template(template_id), "service template",
                              template_id)
        size = self.flow_size(template["body"])
        spec = {"template_id": template_id, "name": name or None,
                "custom_attrs": custom_attrs or None, "networks": networks or None,
                "request_id": request_id or None}
        need = quotas.need_of(vms=size["vms"], cpu=size["vcpu"], memory=size["memory"])
        return self.submit(user, "flow", spec, size, template["body"], need, request_id)

    def flow_size(self, body):
        """{"vms", "vcpu", "cpu", "memory"} of every VM a service template starts with."""
        size = {"vms": 0, "vcpu": 0, "cpu": 0.0, "memory": 0}
        for role in body.get("roles") or ():
            vm_template = {}
            if role.get("vm_template") is not None:
                vm_template = dict(self.lifecycle.get_template(role["vm_template"])["body"])
            if role.get("vm_template_contents"):
                vm_template.update(parse_template(role["vm_template_contents"]))
            one = template_resources(vm_template)
            count = int(role.get("cardinality", 1))
            size["vms"] += count
            size["vcpu"] += count * int(one["vcpu"])
            size["cpu"] += count * float(one["cpu"])
            size["memory"] += count * int(one["memory"])
        return size

    def submit(self, user, kind, spec, resources, template, need, client_request_id):
        with self.db() as session:
            groups = users.group_names(session, user["id"])
        data = approvals.process_data(kind, resources, user["name"], user["role"], groups,
                                      template)
        with self.relay.transaction() as session:
            req = provisioning.find_by_client_id(session, user["id"], client_request_id)
            if req is None:
                req = provisioning.submit(session, user, kind, spec, data, need,
                                          client_request_id)
            request_id, state = req.id, req.state
        made = self.provision(request_id) if state == "APPROVED" else None
        self.deliver_cmdb()
        return self.request_with_result(request_id, made=made)

    def provision(self, request_id):
        """Make what an approved request asks for, and link it; returns the VM
        or service dict. A refusal by lifecycle or flow fails the request (and
        is raised)."""
        with self.db() as session:
            req = provisioning.find(session, request_id)
            kind, spec, owner_id, state = req.kind, req.spec, req.owner_id, req.state
            reservation = quotas.held_for(session, request_id)
        if state != "APPROVED":
            return None
        try:
            if kind == "flow":
                # the request id makes a repeated instantiate find its service;
                # the reservation is what the request holds for its VMs
                made = self.flow.instantiate(spec["template_id"], owner_id,
                                             name=spec.get("name"),
                                             custom_attrs=spec.get("custom_attrs"),
                                             networks=spec.get("networks"),
                                             request_id=spec.get("request_id")
                                             or f"request-{request_id}",
                                             reservation=reservation)
                links = {"service_id": made["id"]}
            else:
                # a request id makes a repeated allocate (after a restart) find its VM
                allocate = {**spec["allocate"],
                            "request_id": spec["allocate"].get("request_id")
                            or f"request-{request_id}"}
                made = self.lifecycle.allocate(owner_id=owner_id, **allocate)
                links = {"vm_ids": [made["id"]]}
        except CirrusError as exc:
            with self.relay.transaction() as session:
                provisioning.failed(session, request_id, str(exc))
            self.deliver_cmdb()
            raise
        with self.relay.transaction() as session:
            provisioning.provisioned(session, request_id, **links)
        return made

    def request_with_result(self, request_id, history=False, made=None):
        """A request's dict, with the VM or service it made (``made`` if the
        caller has it at hand)."""
        with self.db() as session:
            out = provisioning.request_dict(session, provisioning.find(session, request_id),
                                            history)
        if out["state"] == "FAILED" and not history:
            raise FailedPrecondition(f"request {request_id} failed: {out['reason']}")
        if out["vm_ids"]:
            out["vm"] = made or self.lifecycle.get_vm(out["vm_ids"][0])
        if out["service_id"] is not None:
            out["service"] = self.with_owner_name(made or
                                                  self.flow.get_service(out["service_id"]))
        return out

    def vm_or_waiting(self, request):
        if request.get("vm") is None:
            raise FailedPrecondition(waiting_message(request))
        return request["vm"]

    @api
    def list_requests(self, credentials, waiting_for=None, state=None, mine=False):
        user = self.user(credentials)
        with self.db() as session:
            return provisioning.list_requests(session, user, waiting_for, state, bool(mine))

    @api
    def get_request(self, credentials, request_id):
        """A request with its decisions and its full history (the audit entries)."""
        user = self.user(credentials)
        with self.db() as session:
            provisioning.visible(user, provisioning.find(session, request_id))
        return self.request_with_result(request_id, history=True)

    @api
    def decide_request(self, credentials, request_id, approve, reason=None):
        """Approve or reject the step of ``request_id`` waiting for the caller's role."""
        user = self.user(credentials)
        with self.relay.transaction() as session:
            state = provisioning.decide(session, user, request_id, bool(approve), reason).state
        if state == "APPROVED":
            try:
                self.provision(request_id)
            except CirrusError:
                pass        # the request is FAILED, with the reason; show it
        self.deliver_cmdb()
        return self.request_with_result(request_id, history=True)

    @api
    def request_stats(self, credentials):
        user = self.user(credentials)
        with self.db() as session:
            return provisioning.stats(session, user)

    @api
    def load_process(self, credentials, bpmn):
        """Put a BPMN file in force for new requests; one that cannot run is
        refused with the parser's message, and the process in force stays."""
        user = self.admin(credentials, "changing the approval process")
        with self.relay.transaction() as session:
            return provisioning.load_process(session, bpmn, user)

    @api
    def get_process(self, credentials):
        self.user(credentials)
        with self.relay.transaction() as session:
            return provisioning.version_dict(provisioning.current_version(session), True)

    @api
    def list_audit(self, credentials, object_kind=None, object_id=None, actor=None,
                   after_id=None, limit=audit.LIST_LIMIT):
        self.see_all(credentials, "the audit log")
        with self.db() as session:
            return audit.entries(session, object_kind, object_id, actor, after_id, limit)

    # OneGate (issue 7)

    @api
    def rotate_gate_secret(self, credentials):
        """A new OneGate secret (administrators): old tokens fail at once,
        new deploys get new ones. Audited; the secret is never returned."""
        caller = self.admin(credentials, "rotating the OneGate secret")
        with self.relay.transaction() as session:
            at = devices.rotate_platform_secret(session)
            audit.record(session, caller, "gate.secret.rotated", "setting", "gate.secret")
        return {"rotated_at": at.isoformat()}

    # status (issue 9)

    @api
    def status(self, credentials, service=None):
        """Every process heard from (of ``service``): UP, DOWN or STOPPED,
        uptime, last heard, version, its queues' depths. Administrators and
        cloud administrators."""
        if self.user(credentials)["role"] not in status.ROLES:
            raise PermissionDenied("the platform's status is for administrators and cloud "
                                   "administrators")
        with self.db() as session, session.begin():
            return status.report(session, config.get()["amqp"]["uri"], heartbeat.settings(),
                                 service)

    @event_handler(heartbeat.SOURCE, heartbeat.HEARTBEAT)
    def on_heartbeat(self, beat):
        """A process's heartbeat becomes its row in ``instances``."""
        try:
            with self.db() as session, session.begin():
                status.record(session, beat)
        except Unavailable as exc:      # a lost beat is harmless: the next says the same
            log.warning("heartbeat of %s not kept: %s", beat.get("name"), exc)

    # users and groups

    def user_admin(self, credentials):
        return self.admin(credentials, "user and group management")

    def managed(self, credentials, action, kind, change, **details):
        """An administrator's change of users or groups: ``change(session)``
        returns the user or group dict, audited as ``action`` with its name."""
        caller = self.user_admin(credentials)
        with self.relay.transaction() as session:
            out = change(session)
            audit.record(session, caller, action, kind, out["id"], name=out["name"], **details)
        return out

    @api
    def create_user(self, credentials, name, password, role="user", groups=None):
        return self.managed(credentials, "user.created", "user",
                            lambda session: users.create_user(session, name, password,
                                                              role or "user", groups or ()),
                            role=role or "user")

    @api
    def list_users(self, credentials):
        caller = self.user(credentials)
        with self.db() as session:
            if caller["admin"]:
                return users.list_users(session)
            return [users.user_dict(session, users.find_user(session, caller["id"]))]

    @api
    def get_user(self, credentials, ref):
        """A user by id or name: any for administrators, oneself for others."""
        caller = self.user(credentials)
        with self.db() as session:
            user = users.find_user(session, ref)
            if not caller["admin"] and user.id != caller["id"]:
                raise NotFound(f"user {ref!r} does not exist")
            out = users.user_dict(session, user)
            out["quota"] = quotas.get(session, "user", user.id)
            return out

    @api
    def delete_user(self, credentials, ref):
        caller_id = self.user(credentials)["id"]
        return self.managed(credentials, "user.deleted", "user",
                            lambda session: users.delete_user(session, ref, caller_id))

    @api
    def set_password(self, credentials, ref, password):
        """A new password for oneself, or (administrators) for anyone."""
        caller = self.user(credentials)
        with self.relay.transaction() as session:
            user = users.find_user(session, ref)
            if not caller["admin"] and user.id != caller["id"]:
                raise PermissionDenied("changing another user's password is for administrators")
            out = users.set_password(session, user.id, password)
            audit.record(session, caller, "user.password", "user", user.id, name=user.name)
        return out

    @api
    def set_user_role(self, credentials, ref, role):
        return self.managed(credentials, "user.role", "user",
                            lambda session: users.set_role(session, ref, role), role=role)

    @api
    def create_group(self, credentials, name):
        return self.managed(credentials, "group.created", "group",
                            lambda session: users.create_group(session, name))

    @api
    def list_groups(self, credentials):
        self.user(credentials)
        with self.db() as session:
            return users.list_groups(session)

    @api
    def get_group(self, credentials, ref):
        self.user(credentials)
        with self.db() as session:
            group = users.find_group(session, ref)
            return {**users.group_dict(session, group),
                    "quota": quotas.get(session, "group", group.id)}

    @api
    def delete_group(self, credentials, ref):
        return self.managed(credentials, "group.deleted", "group",
                            lambda session: users.delete_group(session, ref))

    @api
    def group_add_user(self, credentials, group, user):
        return self.managed(credentials, "group.user_added", "group",
                            lambda session: users.add_member(session, group, user), user=user)

    @api
    def group_del_user(self, credentials, group, user):
        return self.managed(credentials, "group.user_removed", "group",
                            lambda session: users.remove_member(session, group, user), user=user)

    # quotas

    def quota_subject(self, session, scope, ref):
        if scope == "user":
            return users.find_user(session, ref).id
        if scope == "group":
            return users.find_group(session, ref).id
        raise InvalidArgument(f"scope: {scope!r}; choose user or group")

    @api
    def set_quota(self, credentials, scope, ref, limits):
        """Set some limits (None or -1: no limit) of a user's or group's quota."""
        caller = self.admin(credentials, "quota management")
        with self.relay.transaction() as session:
            out = quotas.set_limits(session, scope, self.quota_subject(session, scope, ref),
                                    limits)
            audit.record(session, caller, "quota.set", scope, out["subject_id"],
                         name=out["name"], limits=out["limits"])
        return out

    @api
    def get_quota(self, credentials, scope, ref):
        """A quota: administrators any, users their own and their groups'."""
        caller = self.user(credentials)
        with self.db() as session:
            subject_id = self.quota_subject(session, scope, ref)
            mine = [scope, subject_id] in quotas.scopes_of(session, caller["id"])
            if not caller["admin"] and not mine:
                raise PermissionDenied(f"the quota of another {scope} is for administrators")
            return quotas.get(session, scope, subject_id)

    # events and timers

    @vm_state_handler(*messages.VM_STATE_DONE)
    def on_vm_state(self, event):
        """A VM at DONE gives its quota back (once, however often the event comes)."""
        if event.get("status") != "DONE":
            return
        with self.relay.transaction() as session:
            if quotas.release_resource(session, "vm", event["id"]) is not None:
                audit.record(session, None, "vm.done", "vm", event["id"])
                cmdb.enqueue(session, {"type": "vm", "vm_id": event["id"], "state": "DONE",
                                       "owner_id": event.get("owner_id"),
                                       "at": utcnow().isoformat()})
        self.deliver_cmdb()

    @timer(interval=HOUSEKEEPING_INTERVAL)
    def housekeeping(self):
        """What a crash may leave: outbox rows, CMDB records that failed, and
        approved requests whose provisioning never ended."""
        self.relay.flush()
        self.deliver_cmdb()
        with self.db() as session:
            stuck = provisioning.stuck_approved(session, utcnow() - STUCK_AFTER)
        for request_id in stuck:
            try:
                self.provision(request_id)
            except Exception:
                log.warning("provisioning request %s again failed", request_id, exc_info=True)

    def deliver_cmdb(self):
        try:
            cmdb.deliver_due(self.db, cmdb_sink())
        except Exception:       # the records wait in the outbox for the next try
            log.warning("CMDB delivery failed", exc_info=True)


def waiting_message(request):
    return (f"request {request['id']} waits for approval by {request['waiting_for']} "
            f"({request['step']}); it is provisioned once approved: see "
            f"`cirrus request show {request['id']}`")


_sink = None


def cmdb_sink():
    global _sink
    if _sink is None:
        _sink = cmdb.make_sink(SETTINGS)
    return _sink


JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def flow_template_body(body):
    """A service template as the flow service takes it: a dict, from the API's
    JSON text; INVALID_ARGUMENT says where the JSON breaks."""
    if isinstance(body, dict):
        return body
    limit = config.get()["limits"]["template_bytes"]
    size = len(str(body).encode())
    if size > limit:
        raise InvalidArgument(f"body: the template is {size} bytes, over the limit of "
                              f"{limit} bytes")
    try:
        value = json.loads(body)
    except (TypeError, json.JSONDecodeError) as exc:
        where = (f" at line {exc.lineno} column {exc.colno}"
                 if isinstance(exc, json.JSONDecodeError) else "")
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InvalidArgument(f"body: not JSON: {reason}{where}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"body: a service template is a JSON object, not "
                              f"{JSON_KINDS.get(type(value), 'that')}")
    return value


def check_role(service, role):
    """Refuse a role the service does not have, naming the ones it has."""
    names = [r["name"] for r in service.get("roles") or ()]
    if role not in names:
        raise InvalidArgument(f"role: service {service['id']} has no role {role!r}; its roles "
                              f"are {', '.join(names) or 'none'}")
