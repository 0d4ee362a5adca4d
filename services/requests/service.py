"""The request manager: authenticates every call, validates requests, and
hands them to the service that owns the resource.

Approvals and quotas will sit here too; today a valid request goes straight
to ``lifecycle``.
"""
import json

from nameko.rpc import rpc
from sqlalchemy import select

from cirrus import auth, config, messages, states
from cirrus.db.models import User
from cirrus.dependencies import Database, Rpc
from cirrus.errors import (CirrusError, InvalidArgument, NotFound, PermissionDenied,
                           Unauthenticated)
from cirrus.expressions import ExpressionError, compile_rank, compile_requirements
from cirrus.template import parse, vm_resources

api = rpc(expected_exceptions=CirrusError)

# VM actions that choose a host: administrators only, as in OpenNebula
ADMIN_ACTIONS = frozenset({"deploy", "migrate"})
# the OneFlow service (services/flow)
FLOW = "flow"
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
    lifecycle = Rpc(messages.LIFECYCLE)
    flow = Rpc(FLOW)

    def user(self, credentials):
        with self.db() as session:
            try:
                user = auth.authenticate(session, credentials)
            except auth.AuthError as exc:
                raise Unauthenticated(str(exc)) from None
            return {"id": user.id, "name": user.name, "role": user.role,
                    "admin": user.role == "admin"}

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
    def whoami(self, credentials):
        """The caller: {"id", "name", "role", "admin"}."""
        return self.user(credentials)

    # -------------------------------------------------------------- VMs

    @api
    def create_vm(self, credentials, spec):
        user = self.user(credentials)
        template = parse_template(spec["template"]) if spec.get("template") else {}
        return self.lifecycle.allocate(owner_id=user["id"], **allocate_arguments(template, spec))

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
        user = self.user(credentials)
        template = self.owned(user, self.lifecycle.get_template(template_id), "template",
                              template_id)
        spec = {"name": name or template["name"], "hold": hold}
        return self.lifecycle.allocate(owner_id=user["id"],
                                       **allocate_arguments(template["body"], spec))

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
        user = self.user(credentials)
        return self.lifecycle.create_image(user["id"], name, path, datastore, persistent)

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
        return self.lifecycle.delete_image(image_id)

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
        user = self.user(credentials)
        self.owned(user, self.flow.get_template(template_id), "service template", template_id)
        service = self.flow.instantiate(template_id, user["id"], name=name or None,
                                        custom_attrs=custom_attrs or None,
                                        networks=networks or None)
        return self.with_owner_name(service)

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
