"""The flow service: OneFlow's service templates and multi-VM services.

Entrypoints are thin: each opens a transaction through the outbox relay and
calls a function of ``engine``. Services move on events, never by polling:
a ``vm.state`` or ``vm.updated`` event of one of a service's VMs asks for a
reconcile of that service; reconciles asked while one runs are merged into
the next. A backstop timer (``flow.check_interval``) reconciles every live
service, which also ends cooldowns, evaluates elasticity periods, runs role
actions in batches and fails steps past ``flow.step_timeout``; it fires at
start too, so a restarted flow service resumes every service at once.
"""
import logging

from nameko.events import event_handler
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy, rpc
from nameko.timer import timer

from cirrus import config, messages
from cirrus.dependencies import OutboxRelay, vm_state_handler
from cirrus.metrics import Metrics
from cirrus.tracing import Tracing
from cirrus.errors import CirrusError
from services.flow import engine

log = logging.getLogger(__name__)

OUTBOX_INTERVAL = config.get()["lifecycle"].get("outbox_interval", 1)

api = rpc(expected_exceptions=CirrusError)


class Reconciles(DependencyProvider):
    """Merges reconcile requests per service: a request for a service whose
    reconcile is under way is taken by that worker's next round, so a burst
    of VM events makes a few passes, not one each."""

    def setup(self):
        self.wanted, self.busy = set(), set()

    def get_dependency(self, worker_ctx):
        return self

    def run(self, service_id, do_pass):
        self.wanted.add(service_id)
        if service_id in self.busy:
            return
        self.busy.add(service_id)
        try:
            while service_id in self.wanted:
                self.wanted.discard(service_id)
                if do_pass(service_id):
                    # it made or ended VMs: events may have come before its commit
                    self.wanted.add(service_id)
        finally:
            self.busy.discard(service_id)


class ServiceOfVm(DependencyProvider):
    """Which service each VM belongs to, remembered once known: a VM never
    changes service, so a VM event of a service's VM costs no query (a 500-VM
    service's deploy brings 2,000 of them); only VMs in no service (yet) are
    looked up each time. Forgotten when the VM is DONE."""

    def setup(self):
        self.known = {}

    def get_dependency(self, worker_ctx):
        return self


class FlowService:
    name = messages.FLOW

    relay = OutboxRelay()
    metrics = Metrics()
    trace = Tracing()
    lifecycle_rpc = RpcProxy(messages.LIFECYCLE)
    reconciles = Reconciles()
    services_of_vms = ServiceOfVm()

    @property
    def lifecycle(self):
        return engine.Lifecycle(self.lifecycle_rpc)

    # -------------------------------------------------------------- templates

    @api
    def create_template(self, owner_id, body):
        with self.relay.transaction() as session:
            return engine.template_to_dict(engine.create_template(session, self.lifecycle,
                                                                  owner_id, body))

    @api
    def list_templates(self, owner_id=None):
        with self.relay.session_factory() as session:
            return engine.list_templates(session, owner_id)

    @api
    def get_template(self, template_id):
        with self.relay.session_factory() as session:
            return engine.template_to_dict(engine.get_template(session, template_id))

    @api
    def update_template(self, template_id, body):
        with self.relay.transaction() as session:
            return engine.template_to_dict(engine.update_template(session, self.lifecycle,
                                                                  template_id, body))

    @api
    def delete_template(self, template_id):
        with self.relay.transaction() as session:
            return engine.delete_template(session, template_id)

    @api
    def clone_template(self, template_id, name, owner_id):
        with self.relay.transaction() as session:
            return engine.template_to_dict(engine.clone_template(session, template_id, name,
                                                                 owner_id))

    # -------------------------------------------------------------- services

    @api
    def instantiate(self, template_id, owner_id, name=None, custom_attrs=None, networks=None,
                    request_id=None, reservation=None):
        """A new service; a ``request_id`` the owner used before (an
        instantiate repeated after a crash) returns the service it made."""
        with self.relay.transaction() as session:
            service = engine.instantiate(session, self.lifecycle, template_id, owner_id, name,
                                         custom_attrs, networks, request_id, reservation)
        self.reconcile(service.id)
        return self.get_service(service.id)

    @api
    def list_services(self, owner_id=None):
        with self.relay.session_factory() as session:
            return engine.list_services(session, owner_id)

    @api
    def get_service(self, service_id):
        with self.relay.session_factory() as session:
            return engine.describe(session, engine.get_service(session, service_id))

    @api
    def undeploy(self, service_id):
        return self.act(service_id, engine.undeploy)

    @api
    def recover(self, service_id, delete=False):
        return self.act(service_id, engine.recover, delete)

    @api
    def release(self, service_id):
        return self.act(service_id, engine.release)

    @api
    def scale(self, service_id, role, cardinality, force=False):
        return self.act(service_id, engine.scale, role, cardinality, force)

    @api
    def role_action(self, service_id, role, action, period=0, number=0):
        return self.act(service_id, engine.role_action, role, action, period, number)

    @api
    def add_role(self, service_id, role_body):
        return self.act(service_id, engine.add_role, role_body)

    @api
    def remove_role(self, service_id, role):
        return self.act(service_id, engine.remove_role, role)

    def act(self, service_id, action, *args):
        with self.relay.transaction() as session:
            action(session, self.lifecycle, service_id, *args)
        self.reconcile(service_id)
        return self.get_service(service_id)

    # -------------------------------------------------------------- events

    @vm_state_handler(*messages.VM_STATE_IN_FLOW)
    def on_vm_state(self, event):
        self.vm_changed(event["id"])
        if event.get("status") == "DONE":
            self.services_of_vms.known.pop(event["id"], None)

    @event_handler(messages.LIFECYCLE, messages.VM_UPDATED)
    def on_vm_updated(self, event):
        self.vm_changed(event["id"])

    def vm_changed(self, vm_id):
        known = self.services_of_vms.known
        service_id = known.get(vm_id)
        if service_id is None:
            with self.relay.session_factory() as session:
                service_id = engine.service_of_vm(session, vm_id)
            if service_id is not None:
                known[vm_id] = service_id
        if service_id is not None:
            self.reconcile(service_id)

    @timer(interval=engine.CHECK_INTERVAL, eager=True)
    def backstop(self):
        """What events missed, time-driven steps, and resuming after a restart."""
        with self.relay.session_factory() as session:
            ids = engine.services_to_check(session)
        for service_id in ids:
            try:
                self.reconcile(service_id)
            except Exception:
                log.exception("service %s: reconcile failed; the next check retries",
                              service_id)

    @timer(interval=OUTBOX_INTERVAL)
    def flush_outbox(self):
        self.relay.flush()

    def reconcile(self, service_id):
        self.reconciles.run(service_id, self.one_pass)

    def one_pass(self, service_id):
        with self.relay.transaction() as session:
            changed, acted = engine.reconcile(session, self.lifecycle, service_id)
        return acted
