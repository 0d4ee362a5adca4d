"""OneFlow services as plain functions over a database session.

The database is the truth. ``reconcile`` is the one function that moves a
service on: it locks the service row, reads its roles, nodes and their VMs'
current rows, and takes every step they call for (deploy the roles whose
parents run, count READY VMs, go WARNING, finish a scale, undeploy children
before parents, evaluate elasticity, fail a step past its time limit). It is
run when a VM of the service changes (``vm.state``, ``vm.updated``), after an
action, and by the backstop timer, and it is safe to run any number of times:
what it does depends only on what the database says, so a flow service that
restarts, or a second instance, simply carries on.

VMs are lifecycle's: a role makes them with ``lifecycle.allocate`` (with a
request id derived from the role's VM counter, so an allocate repeated after a
crash returns the VM already made) and ends them with ``vm_action``.
"""
import logging
from datetime import timedelta

from nameko.exceptions import RemoteError
from sqlalchemy import select, text

from cirrus import config, errors, messages, outbox
from cirrus.db import get_row, iso
from cirrus.db.models import (FlowLog, FlowNode, FlowRole, FlowService, FlowTemplate, User,
                              VirtualMachine, utcnow)
from cirrus.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cirrus.states import TRANSIENT as VM_TRANSIENT
from cirrus.states import status as vm_status
from cirrus.template import vm_resources
from services.flow import elasticity, states, templates
from services.flow.states import FlowTransitionError, allows, next_state, service_action
from services.requests import quotas

log = logging.getLogger(__name__)

def setting(key, default):
    value = (config.get().get("flow") or {}).get(key, default)
    return default if value is None else value


CHECK_INTERVAL = float(setting("check_interval", 5))
STEP_TIMEOUT = float(setting("step_timeout", 900))
DEFAULT_COOLDOWN = int(setting("default_cooldown", 300))
ALLOCATE_WINDOW = int(setting("allocate_window", 50))
LOG_KEPT = 20

# a VM here puts its role in WARNING (REFERENCE.md section 3)
TROUBLE = frozenset({"POWEROFF", "UNKNOWN"})
VM_ACTIONS = ("terminate", "terminate-hard", "undeploy", "undeploy-hard", "hold", "release",
              "stop", "suspend", "resume", "reboot", "reboot-hard", "poweroff", "poweroff-hard")


def is_failure(status):
    return status.endswith("_FAILURE")


# ---------------------------------------------------------------- lifecycle calls

class Lifecycle:
    """lifecycle's RPCs as flow uses them; a remote CirrusError is raised as itself."""

    def __init__(self, proxy):
        self.proxy = proxy

    def call(self, method, *args, **kwargs):
        try:
            return getattr(self.proxy, method)(*args, **kwargs)
        except RemoteError as exc:
            raise errors.from_remote(exc) from None

    def allocate_many(self, requests):
        """allocate for each kwargs of ``requests``; see call_many."""
        return self.call_many("allocate", [((), kwargs) for kwargs in requests])

    def call_many(self, method, calls):
        """``method`` for each (args, kwargs) of ``calls``, ALLOCATE_WINDOW in
        flight at once; returns the answer or the error of each, in order."""
        out = []
        for start in range(0, len(calls), ALLOCATE_WINDOW):
            replies = [getattr(self.proxy, method).call_async(*args, **kwargs)
                       for args, kwargs in calls[start:start + ALLOCATE_WINDOW]]
            for reply in replies:
                try:
                    out.append(reply.result())
                except RemoteError as exc:
                    out.append(errors.from_remote(exc))
        return out


# ---------------------------------------------------------------- templates

def template_to_dict(template):
    return {"id": template.id, "name": template.name, "owner_id": template.owner_id,
            "body": template.body, "created_at": iso(template.created_at),
            "updated_at": iso(template.updated_at)}


def get_template(session, template_id):
    return get_row(session, FlowTemplate, template_id, "service template")


def checked_body(lifecycle, body):
    """A template body validated, with each role's VM template id known to lifecycle."""
    body = templates.validate(body)
    for index, role in enumerate(body["roles"]):
        check_vm_template(lifecycle, role, f"service template: roles/{index}/vm_template")
    return body


def check_vm_template(lifecycle, role, where):
    if "vm_template" in role:
        try:
            lifecycle.call("get_template", role["vm_template"])
        except NotFound:
            raise InvalidArgument(f"{where}: VM template {role['vm_template']} does not "
                                  f"exist") from None


def create_template(session, lifecycle, owner_id, body):
    body = checked_body(lifecycle, body)
    template = FlowTemplate(name=body["name"], owner_id=owner_id, body=body)
    session.add(template)
    session.flush()
    return template


def update_template(session, lifecycle, template_id, body):
    template = get_template(session, template_id)
    body = checked_body(lifecycle, body)
    template.body, template.name, template.updated_at = body, body["name"], utcnow()
    return template


def clone_template(session, template_id, name, owner_id):
    source = get_template(session, template_id)
    name = (name or f"{source.name} (clone)").strip()
    body = {**source.body, "name": name}
    template = FlowTemplate(name=name, owner_id=owner_id, body=body)
    session.add(template)
    session.flush()
    return template


def list_templates(session, owner_id=None):
    query = select(FlowTemplate).order_by(FlowTemplate.id)
    if owner_id is not None:
        query = query.where(FlowTemplate.owner_id == owner_id)
    return [template_to_dict(t) for t in session.scalars(query)]


# ---------------------------------------------------------------- services

def instantiate(session, lifecycle, template_id, owner_id, name=None, custom_attrs=None,
                networks=None, request_id=None, reservation=None):
    """Write a new service (PENDING) and its roles; ``reconcile`` deploys it.
    A ``request_id`` the owner used before returns the service it made.
    ``reservation``: the quota charge its provisioning request holds for its
    VMs, which they are then charged out of."""
    if request_id:
        # concurrent instantiates of one request id wait here for the first
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                        {"key": f"flow-instantiate:{owner_id}:{request_id}"})
        existing = session.scalar(select(FlowService).where(
            FlowService.owner_id == owner_id, FlowService.request_id == request_id))
        if existing is not None:
            return existing
    template = get_template(session, template_id)
    body = checked_body(lifecycle, template.body)
    values = templates.custom_attr_values(body, custom_attrs)
    nets = templates.network_values(body, networks)
    for net_name, vnet_id in nets.items():
        try:
            lifecycle.call("get_vnet", vnet_id)
        except NotFound:
            raise InvalidArgument(f"networks/{net_name}: network {vnet_id} does not exist") \
                from None
    if session.get(User, owner_id) is None:
        raise NotFound(f"user {owner_id} does not exist")
    service = FlowService(name=(name or body["name"]).strip(), owner_id=owner_id,
                          template_id=template.id, body=body, state="PENDING",
                          custom_attrs=values, networks=nets, message="", seq=0,
                          request_id=request_id or None)
    session.add(service)
    session.flush()
    if reservation is not None:
        quotas.attach(session, reservation, service.id)
    for position, role in enumerate(body["roles"]):
        session.add(FlowRole(service_id=service.id, name=role["name"], position=position,
                             body=role, state="PENDING",
                             cardinality=int(role.get("cardinality", 1)), vm_count=0,
                             released=False, message="", policy_state={}))
    add_log(session, service, "I", f"instantiated from template {template.id}")
    session.flush()
    return service


def get_service(session, service_id, lock=False):
    return get_row(session, FlowService, service_id, "service", lock)


def roles_of(session, service):
    return session.scalars(select(FlowRole).where(FlowRole.service_id == service.id)
                           .order_by(FlowRole.position)).all()


def get_role(session, service, name):
    role = session.scalar(select(FlowRole).where(FlowRole.service_id == service.id,
                                                 FlowRole.name == name))
    if role is None:
        names = [r.name for r in roles_of(session, service)]
        raise NotFound(f"service {service.id} has no role {name!r} (roles: {', '.join(names)})")
    return role


def add_log(session, service, severity, message):
    session.add(FlowLog(service_id=service.id, severity=severity, message=message))
    if severity == "E":
        service.message = message


def describe(session, service):
    roles = roles_of(session, service)
    nodes = session.scalars(select(FlowNode).where(FlowNode.service_id == service.id)
                            .order_by(FlowNode.vm_id)).all()
    logs = session.scalars(select(FlowLog).where(FlowLog.service_id == service.id)
                           .order_by(FlowLog.id.desc()).limit(LOG_KEPT)).all()
    body = service.body
    return {
        "id": service.id, "name": service.name, "owner_id": service.owner_id,
        "template_id": service.template_id, "state": service.state,
        "seq": service.seq,     # bumped at every change: orders a service's events
        "deployment": body.get("deployment", "none"),
        "ready_status_gate": bool(body.get("ready_status_gate", False)),
        "custom_attrs": service.custom_attrs or {}, "networks": service.networks or {},
        "created_at": iso(service.created_at), "updated_at": iso(service.updated_at),
        "message": service.message or "",
        "roles": [{"name": role.name, "state": role.state, "cardinality": role.cardinality,
                   "min_vms": role.body.get("min_vms"), "max_vms": role.body.get("max_vms"),
                   "parents": role.body.get("parents", []),
                   "cooldown_until": iso(role.cooldown_until), "message": role.message or "",
                   "nodes": [{"vm_id": n.vm_id, "status": n.status, "ready": bool(n.ready)}
                             for n in nodes if n.role_id == role.id]}
                  for role in roles],
        "log": [{"at": iso(entry.at), "severity": entry.severity, "message": entry.message}
                for entry in reversed(logs)],
    }


def list_services(session, owner_id=None):
    """Services that are not DONE (get_service still shows a DONE one)."""
    query = select(FlowService).where(FlowService.state != "DONE").order_by(FlowService.id)
    if owner_id is not None:
        query = query.where(FlowService.owner_id == owner_id)
    return [describe(session, s) for s in session.scalars(query)]


def services_to_check(session):
    """Every service the backstop looks at: all but DONE."""
    return session.scalars(select(FlowService.id).where(FlowService.state != "DONE")
                           .order_by(FlowService.id)).all()


def service_of_vm(session, vm_id):
    return session.scalar(select(FlowNode.service_id).where(FlowNode.vm_id == vm_id))


# ---------------------------------------------------------------- moving states

class Pass:
    """What one reconcile of one service sees and does: the service, its
    roles in template order, each role's nodes, and their VMs' rows."""

    def __init__(self, session, lifecycle, service, now):
        self.session, self.lifecycle, self.service, self.now = session, lifecycle, service, now
        self.roles = roles_of(session, service)
        self.by_name = {role.name: role for role in self.roles}
        nodes = session.scalars(select(FlowNode).where(FlowNode.service_id == service.id)
                                .order_by(FlowNode.vm_id)).all()
        self.nodes = {role.id: [n for n in nodes if n.role_id == role.id] for role in self.roles}
        ids = [n.vm_id for n in nodes]
        self.vms = {vm.id: vm for vm in session.scalars(
            select(VirtualMachine).where(VirtualMachine.id.in_(ids)))} if ids else {}
        self.changed = False     # a state or cardinality changed: send flow.service
        self.acted = False       # VMs were made or asked to act: look again after commit
        self.refreshed = False
        self.gate = bool(service.body.get("ready_status_gate", False))

    # -- moves through the table

    def move_role(self, role, action, message=None):
        target = next_state("role", role.state, action)
        log.info("service %s role %s: %s -> %s (%s)", self.service.id, role.name, role.state,
                 target, action)
        role.state = target
        if target in states.TRANSIENT:
            role.step_started_at = self.now
        if target == "COOLDOWN":
            role.cooldown_until = self.now + timedelta(seconds=self.cooldown(role))
        if message is not None:
            role.message = message
        self.changed = True

    def move_service(self, action):
        service = self.service
        target = next_state("service", service.state, action)
        add_log(self.session, service, "I", f"{service.state} -> {target}")
        log.info("service %s: %s -> %s (%s)", service.id, service.state, target, action)
        service.state = target
        if target in ("RUNNING", "DONE"):
            # every VM it started with is made (or never will be): the rest of
            # what its request held for them goes back
            quotas.release_resource(self.session, "service", service.id)
        if target in ("RUNNING", "DEPLOYING", "SCALING", "UNDEPLOYING", "COOLDOWN"):
            service.message = ""
        self.changed = True

    # -- nodes

    def active(self, role):
        return [n for n in self.nodes[role.id] if not n.disposing]

    def running(self, node):
        return node.status == "RUNNING" and (node.ready or not self.gate)

    def refresh_nodes(self):
        """Each node's status and READY from its VM; a VM that is DONE leaves
        its role, and one the service did not end lowers the cardinality.
        Once per pass: nodes made later in the pass are not in ``vms``."""
        if self.refreshed:
            return
        self.refreshed = True
        for role in self.roles:
            kept = []
            for node in self.nodes[role.id]:
                vm = self.vms.get(node.vm_id)
                current = vm_status(vm.state, vm.lcm_state) if vm else "DONE"
                if current == "DONE":
                    self.session.delete(node)
                    # requests releases it on vm.state too; this catches a VM
                    # that ended before its charge was committed (once either way)
                    quotas.release_resource(self.session, "vm", node.vm_id)
                    if not node.disposing:
                        role.cardinality = max(0, role.cardinality - 1)
                        add_log(self.session, self.service, "W",
                                f"VM {node.vm_id} of role {role.name} was terminated outside "
                                f"the service; cardinality is now {role.cardinality}")
                        self.changed = True
                    continue
                ready = str(((vm.template or {}).get("USER_TEMPLATE") or {})
                            .get("READY", "")).upper() == "YES"
                if node.status != current:
                    node.status = current
                if node.ready != ready:
                    node.ready = ready
                kept.append(node)
            self.nodes[role.id] = kept

    def vm_template(self, role):
        base = {}
        if "vm_template" in role.body:
            base = self.lifecycle.call("get_template", role.body["vm_template"])["body"]
        return templates.vm_template_for(role.body, base, self.service.id,
                                         self.service.custom_attrs or {},
                                         self.service.networks or {})

    def make_vms(self, role, count, hold=False):
        """Allocate ``count`` VMs for ``role``; returns an error message or None."""
        if count <= 0:
            return None
        try:
            template = self.vm_template(role)
            resources = vm_resources(template)
        except (InvalidArgument, NotFound) as exc:
            return f"role {role.name}: its VM template cannot be used: {exc}"
        need = quotas.need_of(vms=1, cpu=resources["vcpu"], memory=resources["memory"])
        try:
            with self.session.begin_nested():   # a refusal undoes only the charge
                scopes = quotas.charge_service_vms(self.session, self.service.owner_id,
                                                   self.service.id, need, count)
        except ResourceExhausted as exc:
            return f"role {role.name}: RESOURCE_EXHAUSTED: {exc}"
        requests = []
        for _ in range(count):
            role.vm_count += 1
            requests.append(dict(
                owner_id=self.service.owner_id, name=f"{role.name}_{role.vm_count - 1}_"
                f"(service_{self.service.id})", cpu=resources["cpu"], vcpu=resources["vcpu"],
                memory=resources["memory"], template=template, hold=hold,
                request_id=f"flow-{self.service.id}-{role.id}-{role.vm_count}"))
        self.acted = True
        problem, made = None, []
        for answer in self.lifecycle.allocate_many(requests):
            if isinstance(answer, Exception):
                problem = f"role {role.name}: a VM could not be made: {answer}"
                continue
            node = FlowNode(vm_id=answer["id"], role_id=role.id, service_id=self.service.id,
                            status=answer["status"], ready=False, disposing=False)
            self.session.add(node)
            self.nodes[role.id].append(node)
            made.append(answer["id"])
        quotas.service_vms_made(self.session, scopes, need, made, failed=count - len(made))
        return problem

    def shutdown_action(self, role):
        action = role.body.get("shutdown_action") or self.service.body.get(
            "shutdown_action") or "terminate"
        return action.endswith("-hard")

    def dispose(self, role, nodes):
        """Ask lifecycle to end the nodes' VMs (the role's shutdown_action). A
        VM whose driver is busy is asked later, when its next event comes."""
        for node in nodes:
            node.disposing = True
        self.ask_vms([n for n in nodes if n.dispose_seq is None and n.status not in VM_TRANSIENT],
                     "terminate", {"hard": self.shutdown_action(role)})

    def ask_vms(self, nodes, action, args):
        """vm_action on the nodes' VMs, many in flight at once (a service of
        hundreds of VMs is undeployed in a few round trips, not hundreds); each
        node asked remembers the VM's seq right after. A VM that cannot do it
        now is logged and asked again later; one already gone is left to its
        DONE row."""
        answers = self.lifecycle.call_many(
            "vm_action", [((node.vm_id, action, args), {}) for node in nodes])
        for node, answer in zip(nodes, answers):
            if isinstance(answer, FailedPrecondition):
                add_log(self.session, self.service, "W", f"VM {node.vm_id}: {answer}")
            elif isinstance(answer, NotFound):
                continue
            elif isinstance(answer, Exception):
                raise answer
            else:
                node.dispose_seq, node.status = answer["seq"], answer["status"]
                self.acted = True

    def dispose_failed(self, node):
        """The service asked this VM gone and it came back (a failed shutdown)."""
        vm = self.vms.get(node.vm_id)
        return (node.dispose_seq is not None and vm is not None and vm.seq > node.dispose_seq
                and node.status not in VM_TRANSIENT)

    def retry_vm(self, node):
        """recover --retry: send the failed driver command of a VM again."""
        try:
            vm = self.lifecycle.call("vm_action", node.vm_id, "recover", {"operation": "retry"})
            node.status = vm["status"]
            self.acted = True
        except (FailedPrecondition, NotFound) as exc:
            add_log(self.session, self.service, "W", f"VM {node.vm_id}: {exc}")

    # -- the roles' steps

    def parents_running(self, role):
        if self.service.body.get("deployment", "none") != "straight":
            return True
        return all(self.by_name[p].state in states.SERVING for p in role.body.get("parents", []))

    def children_done(self, role):
        if self.service.body.get("deployment", "none") != "straight":
            return True
        kids = templates.children([r.body for r in self.roles])[role.name]
        return all(self.by_name[k].state == "DONE" for k in kids)

    def waiting_message(self, role, nodes):
        """Why a role waits: VMs not placed (with the scheduler's reason), not READY."""
        pending = [n for n in nodes if n.status in ("PENDING", "HOLD")]
        if pending:
            reason = self.vms[pending[0].vm_id].sched_message if pending[0].vm_id in \
                self.vms else None
            ids = ", ".join(str(n.vm_id) for n in pending[:5])
            return f"{len(pending)} VM(s) not placed ({ids})" + (f": {reason}" if reason else "")
        unready = [n for n in nodes if n.status == "RUNNING" and not n.ready and self.gate]
        if unready:
            return f"{len(unready)} VM(s) running but not READY " \
                   f"({', '.join(str(n.vm_id) for n in unready[:5])})"
        busy = [n for n in nodes if n.status != "RUNNING"]
        if busy:
            return f"{len(busy)} VM(s) on their way ({', '.join(f'{n.vm_id} {n.status}' for n in busy[:5])})"
        return ""

    def failure_message(self, failed):
        parts = []
        for node in failed[:5]:
            vm = self.vms.get(node.vm_id)
            parts.append(f"VM {node.vm_id} {node.status}" + (f": {vm.error}" if vm and vm.error
                                                               else ""))
        return "; ".join(parts)

    def timed_out(self, role):
        return (role.step_started_at is not None
                and (self.now - role.step_started_at).total_seconds() > STEP_TIMEOUT)

    def converge(self, role, failure_action, done_action):
        """The common step of DEPLOYING and SCALING: make or end VMs until the
        role has its cardinality, all running; fail on a failed VM or past the
        step time limit."""
        active = self.active(role)
        if len(active) < role.cardinality:
            problem = self.make_vms(role, role.cardinality - len(active))
            active = self.active(role)
            if problem:
                self.move_role(role, failure_action, problem)
                add_log(self.session, self.service, "E", problem)
                return
        elif len(active) > role.cardinality:
            # scale down: the newest VMs go first
            self.dispose(role, sorted(active, key=lambda n: n.vm_id)[role.cardinality:])
            active = self.active(role)
        disposing = [n for n in self.nodes[role.id] if n.disposing]
        self.dispose(role, disposing)
        failed = [n for n in active if is_failure(n.status)] + \
            [n for n in disposing if self.dispose_failed(n)]
        if failed:
            message = self.failure_message(failed)
            self.move_role(role, failure_action, message)
            add_log(self.session, self.service, "E", f"role {role.name}: {message}")
            return
        if not disposing and all(self.running(n) for n in active):
            self.move_role(role, done_action, "")
            return
        waiting = self.waiting_message(role, active + disposing)
        if self.timed_out(role):
            message = f"timed out after {STEP_TIMEOUT:g} s: {waiting}"
            self.move_role(role, failure_action, message)
            add_log(self.session, self.service, "E", f"role {role.name}: {message}")
        elif waiting != role.message:
            role.message = waiting
            self.changed = True

    def deploy_role(self, role):
        on_hold = role.body.get("on_hold", self.service.body.get("on_hold", False))
        if on_hold and not role.released:
            self.move_role(role, "hold", "on hold: waiting for release")
            problem = self.make_vms(role, role.cardinality, hold=True)
            if problem:
                role.message = problem
                add_log(self.session, self.service, "E", problem)
            return
        self.move_role(role, "deploy")
        self.converge(role, "deploy_failure", "deployed")

    def undeploy_step(self, role):
        if not self.children_done(role):
            return
        if self.service.deleting:
            self.delete_vms(self.nodes[role.id])
        else:
            self.dispose(role, self.nodes[role.id])
        failed = [n for n in self.nodes[role.id] if self.dispose_failed(n)
                  or (is_failure(n.status) and n.dispose_seq is not None)]
        if not self.nodes[role.id]:
            self.move_role(role, "undeployed", "")
        elif failed:
            message = self.failure_message(failed)
            self.move_role(role, "undeploy_failure", message)
            add_log(self.session, self.service, "E", f"role {role.name}: {message}")
        elif self.timed_out(role):
            message = f"timed out after {STEP_TIMEOUT:g} s: " + \
                self.waiting_message(role, self.nodes[role.id])
            self.move_role(role, "undeploy_failure", message)
            add_log(self.session, self.service, "E", f"role {role.name}: {message}")

    def delete_vms(self, nodes):
        """recover --delete: drop the VMs wherever they are (flow recover --delete)."""
        for node in nodes:
            node.disposing = True
        self.ask_vms([n for n in nodes if n.dispose_seq is None], "recover",
                     {"operation": "delete"})

    def serve(self, role):
        """A deployed role: WARNING on a troubled VM and back, cooldown's end,
        the min_vms floor, then elasticity (only while the service RUNNING)."""
        active = self.active(role)
        troubled = [n for n in active if n.status in TROUBLE or is_failure(n.status)]
        if troubled and role.state in ("RUNNING", "COOLDOWN"):
            message = ", ".join(f"VM {n.vm_id} {n.status}" for n in troubled[:5])
            self.move_role(role, "warning", message)
            add_log(self.session, self.service, "W", f"role {role.name}: {message}")
        elif not troubled and role.state == "WARNING":
            self.move_role(role, "recovered", "")
        if role.state == "COOLDOWN" and (role.cooldown_until is None
                                         or self.now >= role.cooldown_until):
            self.move_role(role, "cooled")
        low = role.body.get("min_vms")
        if low is not None and role.cardinality < low:
            self.scale(role, low, f"cardinality {role.cardinality} is below min_vms {low}")
            return
        if role.state == "RUNNING" and self.service.state == "RUNNING":
            self.elasticity(role)

    def scale(self, role, cardinality, reason, cooldown=None):
        add_log(self.session, self.service, "I",
                f"role {role.name}: scale {role.cardinality} -> {cardinality} ({reason})")
        role.cardinality = cardinality
        policy_state = dict(role.policy_state or {})
        policy_state["cooldown"] = cooldown
        role.policy_state = policy_state
        self.move_role(role, "scale", "")
        self.converge(role, "scale_failure", "scaled")

    def cooldown(self, role):
        """Seconds of COOLDOWN after a scale: the policy's that fired, else
        the role's, else the service's, else flow.default_cooldown."""
        cooldown = (role.policy_state or {}).get("cooldown")
        if cooldown is None:
            cooldown = role.body.get("cooldown", self.service.body.get("cooldown",
                                                                       DEFAULT_COOLDOWN))
        return int(cooldown)

    def elasticity(self, role):
        policy_state = dict(role.policy_state or {})
        low, high = role.body.get("min_vms"), role.body.get("max_vms")
        vms = None
        for index, policy in enumerate(role.body.get("elasticity_policies") or []):
            key = f"e{index}"
            seen = dict(policy_state.get(key) or {"true": 0, "last": None})
            period = policy.get("period") or CHECK_INTERVAL
            if seen["last"] and (self.now.timestamp() - seen["last"]) < period - 0.05:
                continue
            if vms is None:
                vms = self.attributes(role)
            holds = elasticity.compile_expression(policy["expression"]).evaluate(vms)
            seen = {"true": seen["true"] + 1 if holds else 0, "last": self.now.timestamp()}
            policy_state[key] = seen
            if seen["true"] >= max(1, policy.get("period_number") or 1):
                policy_state[key] = {"true": 0, "last": seen["last"]}
                role.policy_state = policy_state
                new = elasticity.adjusted_cardinality(policy, role.cardinality, low, high)
                if new != role.cardinality:
                    self.scale(role, new, f"elasticity policy {index}: "
                               f"{policy['expression']}", policy.get("cooldown"))
                    return
        for index, policy in enumerate(role.body.get("scheduled_policies") or []):
            key = f"s{index}"
            seen = dict(policy_state.get(key) or {})
            due = False
            if "recurrence" in policy:
                upcoming = seen.get("next")
                if upcoming is None:
                    seen["next"] = elasticity.next_recurrence(policy["recurrence"],
                                                              self.now).timestamp()
                elif self.now.timestamp() >= upcoming:
                    due = True
                    seen["next"] = elasticity.next_recurrence(policy["recurrence"],
                                                              self.now).timestamp()
            elif not seen.get("done") and self.now >= templates.parse_time(policy["start_time"]):
                due = seen["done"] = True
            policy_state[key] = seen
            if due:
                role.policy_state = policy_state
                new = elasticity.adjusted_cardinality(policy, role.cardinality, low, high)
                if new != role.cardinality:
                    self.scale(role, new, f"scheduled policy {index}")
                    return
        role.policy_state = policy_state

    def attributes(self, role):
        out = []
        for node in self.active(role):
            vm = self.vms.get(node.vm_id)
            if vm is not None and self.running(node):
                template = vm.template or {}
                out.append(elasticity.vm_attributes(template.get("USER_TEMPLATE"),
                                                    vm.monitoring, template))
        return out

    # -- one pass

    def run(self):
        self.refresh_nodes()
        service = self.service
        if service.state == "PENDING":
            self.move_service("deploy")
        for role in list(self.roles):       # a removed role leaves the list
            run_role_actions(self, role)
            self.step(role)
        if service.state == "UNDEPLOYING":
            # parents after their children, in the same pass when nothing waits
            for role in reversed(self.roles):
                if role.state == "UNDEPLOYING":
                    self.undeploy_step(role)
        self.settle_service()

    def step(self, role):
        service = self.service
        if service.state == "UNDEPLOYING":
            if role.state not in ("UNDEPLOYING", "DONE", "FAILED_UNDEPLOYING"):
                self.move_role(role, "undeploy")
            return
        if role.state == "PENDING" and service.state in ("DEPLOYING", "HOLD") \
                and self.parents_running(role):
            self.deploy_role(role)
            if role.state == "RUNNING":
                self.after_deployed(role)
        elif role.state == "DEPLOYING":
            self.converge(role, "deploy_failure", "deployed")
            if role.state == "RUNNING":
                self.after_deployed(role)
        elif role.state == "SCALING":
            self.converge(role, "scale_failure", "scaled")
            if role.state == "COOLDOWN":
                self.step(role)
        elif role.state == "COOLDOWN" and (role.policy_state or {}).get("removing"):
            self.drop_role(role)
        elif role.state in states.SERVING:
            self.serve(role)

    def drop_role(self, role):
        """A role being removed whose VMs are all gone leaves the service and
        its template."""
        self.session.flush()        # its nodes' rows go first
        self.session.delete(role)
        self.roles.remove(role)
        del self.by_name[role.name], self.nodes[role.id]
        body = self.service.body
        self.service.body = {**body, "roles": [r for r in body["roles"]
                                               if r["name"] != role.name]}
        add_log(self.session, self.service, "I", f"role {role.name} removed")
        self.changed = True

    def after_deployed(self, role):
        add_log(self.session, self.service, "I", f"role {role.name} is RUNNING")
        # children waiting on this role start in the same pass
        for other in self.roles:
            if other.state == "PENDING" and role.name in other.body.get("parents", []) \
                    and self.parents_running(other):
                self.step(other)

    def settle_service(self):
        service = self.service
        for _ in range(4):
            action = service_action(service.state, [r.state for r in self.roles])
            if action == "scale_failure" and allows("service", service.state, "scale"):
                # a role failed in the pass its scale began (a quota refused its
                # VMs): the service scales first, then fails with it
                action = "scale"
            if action is None or not allows("service", service.state, action):
                break
            self.move_service(action)
        if service.body.get("automatic_deletion") and service.state in states.SERVING \
                and not any(self.nodes[r.id] for r in self.roles) \
                and all(r.cardinality == 0 for r in self.roles):
            add_log(self.session, service, "I", "every VM is gone: automatic deletion")
            self.undeploy()

    def undeploy(self):
        self.move_service("undeploy")
        for role in self.roles:
            if role.state not in ("UNDEPLOYING", "DONE"):
                self.move_role(role, "undeploy")
        for role in reversed(self.roles):
            self.undeploy_step(role)
        self.settle_service()


def reconcile(session, lifecycle, service_id, now=None):
    """Take every step the service's state calls for (see the module
    docstring). Returns (changed, acted): whether a state or cardinality
    changed, and whether VMs were asked to do something (then the caller
    runs it once more after commit, for events that came before it)."""
    service = session.get(FlowService, service_id, with_for_update=True)
    if service is None or service.state == "DONE":
        return False, False
    one = Pass(session, lifecycle, service, now or utcnow())
    one.run()
    return finish(one)


def finish(one):
    if one.changed:
        one.service.seq += 1
        one.service.updated_at = one.now
        one.session.flush()
        outbox.add_event(one.session, messages.FLOW, messages.FLOW_SERVICE, describe(one.session, one.service))
    return one.changed, one.acted


# ---------------------------------------------------------------- user actions

def act(session, lifecycle, service_id, do):
    """Run ``do(pass)`` on a locked service, then reconcile in the same pass."""
    service = get_service(session, service_id, lock=True)
    one = Pass(session, lifecycle, service, utcnow())
    one.refresh_nodes()
    try:
        do(one)
    except FlowTransitionError as exc:
        raise FailedPrecondition(f"service {service_id}: {exc}") from None
    one.run()
    finish(one)
    return service


def undeploy(session, lifecycle, service_id):
    def do(one):
        add_log(session, one.service, "I", "undeploy asked")
        one.undeploy()
    return act(session, lifecycle, service_id, do)


def recover(session, lifecycle, service_id, delete=False):
    """Retry only what failed: failed VMs get their driver command again
    (recover --retry), VMs that did not go away are asked again. ``delete``:
    drop every VM wherever it is, and the service with them."""
    def do(one):
        if delete:
            add_log(session, one.service, "I", "recover --delete: every VM is dropped")
            one.service.deleting = True
            if one.service.state == "UNDEPLOYING":
                for role in one.roles:
                    for node in one.nodes[role.id]:
                        node.dispose_seq = None
            elif one.service.state != "FAILED_UNDEPLOYING":
                one.undeploy()
                return
        if one.service.state not in states.FAILED:
            if delete:
                return
            raise FailedPrecondition(f"service {service_id} is {one.service.state}: only a "
                                     f"FAILED_DEPLOYING, FAILED_SCALING or FAILED_UNDEPLOYING "
                                     f"service can be recovered")
        add_log(session, one.service, "I", "recover asked")
        for role in one.roles:
            if role.state not in states.FAILED:
                continue
            for node in one.nodes[role.id]:
                if node.disposing and (one.dispose_failed(node) or is_failure(node.status)):
                    node.dispose_seq = None     # ask again
                    if is_failure(node.status):
                        one.retry_vm(node)
                elif is_failure(node.status):
                    one.retry_vm(node)
            one.move_role(role, "recover", "")
        one.move_service("recover")
    return act(session, lifecycle, service_id, do)


def release(session, lifecycle, service_id):
    def do(one):
        if one.service.state != "HOLD":
            raise FailedPrecondition(f"service {service_id} is {one.service.state}: only a "
                                     "HOLD service can be released")
        for role in one.roles:
            if role.state == "HOLD":
                for node in one.nodes[role.id]:
                    if node.status == "HOLD":
                        one.lifecycle.call("vm_action", node.vm_id, "release")
                        one.acted = True
                role.released = True
                one.move_role(role, "release", "")
            elif role.state == "PENDING":
                role.released = True
        one.move_service("release")
    return act(session, lifecycle, service_id, do)


def scale(session, lifecycle, service_id, role_name, cardinality, force=False):
    """Set a role's cardinality: within [min_vms, max_vms] unless ``force``."""
    try:
        cardinality = int(cardinality)
    except (TypeError, ValueError):
        raise InvalidArgument(f"cardinality: {cardinality!r} is not a whole number") from None
    if cardinality < 0:
        raise InvalidArgument(f"cardinality: {cardinality} is negative")

    def do(one):
        role = get_role(session, one.service, role_name)
        low, high = role.body.get("min_vms"), role.body.get("max_vms")
        if not force and low is not None and cardinality < low:
            raise FailedPrecondition(f"role {role_name}: cardinality {cardinality} is below "
                                     f"min_vms {low} (force to go below)")
        if not force and high is not None and cardinality > high:
            raise FailedPrecondition(f"role {role_name}: cardinality {cardinality} is above "
                                     f"max_vms {high} (force to go above)")
        if not allows("service", one.service.state, "scale"):
            raise FlowTransitionError("service", "scale", one.service.state)
        one.scale(role, cardinality, "asked" + (" (forced)" if force else ""))
    return act(session, lifecycle, service_id, do)


def add_role(session, lifecycle, service_id, role_body):
    """Add a role to a deployed service. It is checked as the template's last
    role (a unique name, parents that exist, its VM template), then deployed
    like any role: the service is DEPLOYING until it runs, and with
    ``straight`` it waits for its parents."""
    def do(one):
        if not allows("service", one.service.state, "add_role"):
            raise FailedPrecondition(f"service {service_id} is {one.service.state}: a role can "
                                     f"be added only to a service in one of: "
                                     f"{', '.join(states.allowed_sources('service', 'add_role'))}")
        body = templates.validate_added_role(one.service.body, role_body)
        check_vm_template(lifecycle, body, "role: vm_template")
        role = FlowRole(service_id=one.service.id, name=body["name"],
                        position=max((r.position for r in one.roles), default=-1) + 1,
                        body=body, state="PENDING", cardinality=int(body.get("cardinality", 1)),
                        vm_count=0, released=False, message="", policy_state={})
        session.add(role)
        session.flush()
        one.roles.append(role)
        one.by_name[role.name], one.nodes[role.id] = role, []
        one.service.body = {**one.service.body, "roles": [*one.service.body["roles"], body]}
        add_log(session, one.service, "I", f"role {role.name} added")
        one.move_service("add_role")
    return act(session, lifecycle, service_id, do)


def remove_role(session, lifecycle, service_id, role_name):
    """Remove a role from a deployed service: its VMs are ended first (a scale
    to 0 with its shutdown_action: SCALING, FAILED_SCALING if one does not go,
    and recover retries it), then it leaves the service. Refused while
    another role names it as a parent, and for the last role."""
    def do(one):
        role = get_role(session, one.service, role_name)
        dependents = [r.name for r in one.roles if role_name in r.body.get("parents", [])]
        if dependents:
            raise FailedPrecondition(f"role {role_name}: role(s) {', '.join(dependents)} "
                                     f"depend on it (parents); remove them first")
        if len(one.roles) == 1:
            raise FailedPrecondition(f"role {role_name} is the only role of service "
                                     f"{service_id}; delete the service instead")
        if not allows("service", one.service.state, "scale"):
            raise FailedPrecondition(f"service {service_id} is {one.service.state}: a role can "
                                     f"be removed only from a service in one of: "
                                     f"{', '.join(states.allowed_sources('service', 'scale'))}")
        role.policy_state = {**(role.policy_state or {}), "removing": True, "action": None}
        one.scale(role, 0, "the role is removed")
    return act(session, lifecycle, service_id, do)


def role_action(session, lifecycle, service_id, role_name, action, period=0, number=0):
    """Run a VM action on every VM of a role: all at once, or ``number`` VMs
    every ``period`` seconds (the rest waits in the role's policy_state, so a
    restart carries on). Returns the VM ids acted on now."""
    if action not in VM_ACTIONS:
        raise InvalidArgument(f"action: unknown role action {action!r}; choose from "
                              f"{', '.join(VM_ACTIONS)}")
    period, number = int(period or 0), int(number or 0)
    if period < 0 or number < 0:
        raise InvalidArgument("period and number must not be negative")

    def do(one):
        role = get_role(session, one.service, role_name)
        if one.service.state in ("UNDEPLOYING", "DONE"):
            raise FailedPrecondition(f"service {service_id} is {one.service.state}")
        ids = [n.vm_id for n in one.active(role)]
        state = dict(role.policy_state or {})
        state["action"] = {"action": action, "vms": ids, "period": period, "number": number,
                           "next": one.now.timestamp()}
        role.policy_state = state
        add_log(session, one.service, "I", f"role {role.name}: {action} on VMs "
                f"{', '.join(map(str, ids)) or '(none)'}")
        run_role_actions(one, role)
    return act(session, lifecycle, service_id, do)


def run_role_actions(one, role):
    """The due batch of a role action under way, if any."""
    state = dict(role.policy_state or {})
    pending = state.get("action")
    if not pending or one.now.timestamp() < pending["next"]:
        return
    count = pending["number"] if pending["number"] and pending["period"] else len(pending["vms"])
    batch, rest = pending["vms"][:count], pending["vms"][count:]
    name, hard = pending["action"].removesuffix("-hard"), pending["action"].endswith("-hard")
    for vm_id in batch:
        try:
            one.lifecycle.call("vm_action", vm_id, name, {"hard": True} if hard else None)
            one.acted = True
        except (FailedPrecondition, NotFound, InvalidArgument) as exc:
            add_log(one.session, one.service, "W", f"VM {vm_id}: {exc}")
    state["action"] = {**pending, "vms": rest,
                       "next": one.now.timestamp() + pending["period"]} if rest else None
    role.policy_state = state


def delete_template(session, template_id):
    template = get_template(session, template_id)
    out = template_to_dict(template)
    session.delete(template)
    return out
