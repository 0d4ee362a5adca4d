"""The lifecycle service: owns VMs, their states and history, hosts and VM templates.

Entrypoints are thin: each opens a transaction through the outbox relay and
calls a function of ``logic``. Driver results and host monitoring come in as
events from the nodes; state changes and driver commands leave through the
outbox after commit.
"""
from eventlet.event import Event
from eventlet.semaphore import Semaphore
from nameko.events import event_handler
from nameko.extensions import DependencyProvider
from nameko.rpc import rpc
from nameko.timer import timer

from cirrus import config, messages, tracing
from cirrus.dependencies import OutboxRelay
from cirrus.metrics import Metrics
from cirrus.tracing import Tracing
from cirrus.errors import CirrusError
from services.lifecycle import (accounting, clusters, images, logic, monitoring, user_template,
                                vnets)

OUTBOX_INTERVAL = config.get()["lifecycle"].get("outbox_interval", 1)
HOST_TIMEOUT = config.get()["lifecycle"].get("host_timeout", 15)

api = rpc(expected_exceptions=CirrusError)


class Batches(DependencyProvider):
    """Driver results (each message's list of them) and creates that arrive
    together are applied in one transaction. Each handler queues its item and
    waits; whichever handler finds no batch under way applies everything
    queued, again until nothing is, so a lone item never waits for others.
    The handlers return (and Nameko acks) only after their batch committed,
    each with its item's answer (``apply_batch`` returns one per item, or
    None). A batch that fails is retried one item at a time, so one bad item
    fails (and is requeued, or answers its caller with the error) alone."""

    def setup(self):
        self.queued = []
        self.lock = Semaphore()

    def get_dependency(self, worker_ctx):
        return self

    def apply(self, item, apply_batch):
        done = Event()
        self.queued.append((item, done))
        while not done.ready() and self.lock.acquire(blocking=False):
            try:
                while self.queued:
                    batch, self.queued = self.queued, []
                    self._run(batch, apply_batch)
            finally:
                self.lock.release()
        return done.wait()

    @staticmethod
    def _run(batch, apply_batch):
        try:
            answers = apply_batch([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].send_exception(exc)
                return
            for one in batch:
                Batches._run([one], apply_batch)
        else:
            for (_, done), answer in zip(batch, answers or [None] * len(batch)):
                done.send(answer)


class LifecycleService:
    name = messages.LIFECYCLE

    relay = OutboxRelay()
    metrics = Metrics(cluster=True)    # also VMs per status, outbox rows waiting
    trace = Tracing()
    results = Batches()
    creates = Batches()

    # -------------------------------------------------------------- VMs

    @api
    def allocate(self, owner_id, name, cpu, vcpu, memory, template, hold=False,
                 request_id=None):
        return self.creates.apply(
            {"owner_id": owner_id, "name": name, "cpu": cpu, "vcpu": vcpu, "memory": memory,
             "template": template, "hold": hold, "request_id": request_id,
             "last_request_id": tracing.request_id()},   # the batch serves many requests
            self.allocate_batch)

    def allocate_batch(self, creates):
        with self.relay.transaction() as session:
            return logic.allocate_many(session, creates)

    @api
    def deploy(self, vm_id, host_id):
        with self.relay.transaction() as session:
            return logic.deploy(session, vm_id, host_id)

    @api
    def deploy_many(self, placements):
        with self.relay.transaction() as session:
            return logic.deploy_many(session, placements)

    @api
    def vm_action(self, vm_id, action, options=None):
        with self.relay.transaction() as session:
            return logic.describe(session, logic.vm_action(session, vm_id, action, options))

    @api
    def get_vm(self, vm_id):
        with self.relay.session_factory() as session:
            return logic.get_vm(session, vm_id)

    @api
    def list_vms(self, owner_id=None, include_done=False):
        with self.relay.session_factory() as session:
            return logic.list_vms(session, owner_id, include_done)

    @api
    def set_sched_message(self, vm_id, message):
        with self.relay.transaction() as session:
            logic.set_sched_message(session, vm_id, message)

    @api
    def set_sched_messages(self, messages_by_vm):
        with self.relay.transaction() as session:
            logic.set_sched_messages(session, messages_by_vm)

    @api
    def update_vm_template(self, vm_id, attrs, replace=False):
        """The VM's user template (READY=YES...); a vm.updated event follows."""
        with self.relay.transaction() as session:
            return logic.describe(session, user_template.update(session, vm_id, attrs, replace))

    @event_handler(messages.NODE, messages.COMMAND_RESULTS, requeue_on_error=True)
    def on_command_results(self, batch):
        self.results.apply(batch["results"], self.apply_results)

    @event_handler(messages.NODE, messages.COMMAND_RESULT, requeue_on_error=True)
    def on_command_result(self, result):
        """One result, as nodes of earlier versions send them."""
        self.results.apply([result], self.apply_results)

    def apply_results(self, batches):
        with self.relay.transaction() as session:
            logic.handle_results(session, [result for batch in batches for result in batch])

    @event_handler(messages.NODE, messages.HOST_MONITOR, requeue_on_error=True)
    def on_host_monitor(self, report):
        with self.relay.transaction() as session:
            monitoring.handle_monitor(session, report)

    @event_handler(messages.NODE, messages.VM_EVENT, requeue_on_error=True)
    def on_vm_event(self, event):
        with self.relay.transaction() as session:
            monitoring.handle_vm_event(session, event)

    # a host is failed after HOST_TIMEOUT s of silence; look a few times per timeout
    @timer(interval=max(1, HOST_TIMEOUT / 3))
    def check_hosts(self):
        with self.relay.transaction() as session:
            monitoring.detect_failed_hosts(session, HOST_TIMEOUT)

    @timer(interval=OUTBOX_INTERVAL)
    def flush_outbox(self):
        """Send what a crash or a broker outage left in the outbox."""
        self.relay.flush()

    # -------------------------------------------------------------- hosts

    @api
    def create_host(self, name, ha="none"):
        with self.relay.transaction() as session:
            return logic.host_to_dict(monitoring.create_host(session, name, ha))

    @api
    def get_host(self, host_id):
        with self.relay.session_factory() as session:
            return logic.host_to_dict(logic.get_host(session, host_id))

    @api
    def list_hosts(self):
        with self.relay.session_factory() as session:
            return logic.list_hosts(session)

    @api
    def enable_host(self, host_id):
        with self.relay.transaction() as session:
            return logic.host_to_dict(logic.set_host_enabled(session, host_id, True))

    @api
    def disable_host(self, host_id):
        with self.relay.transaction() as session:
            return logic.host_to_dict(logic.set_host_enabled(session, host_id, False))

    @api
    def delete_host(self, host_id):
        with self.relay.transaction() as session:
            return logic.delete_host(session, host_id)

    @api
    def offline_host(self, host_id):
        with self.relay.transaction() as session:
            return logic.host_to_dict(monitoring.offline_host(session, host_id))

    @api
    def flush_host(self, host_id):
        with self.relay.transaction() as session:
            return logic.host_to_dict(monitoring.flush_host(session, host_id))

    @api
    def set_host_ha(self, host_id, policy):
        with self.relay.transaction() as session:
            return logic.host_to_dict(monitoring.set_host_ha(session, host_id, policy))

    @api
    def accounting(self, owner_id=None, start=None, end=None):
        with self.relay.session_factory() as session:
            return accounting.report(session, owner_id, start, end)

    # -------------------------------------------------------------- templates

    @api
    def create_template(self, owner_id, name, body):
        with self.relay.transaction() as session:
            template = logic.create_template(session, owner_id, name, body)
        return self.get_template(template.id)

    @api
    def get_template(self, template_id):
        with self.relay.session_factory() as session:
            return logic.template_to_dict(session, logic.get_template(session, template_id))

    @api
    def list_templates(self, owner_id=None):
        with self.relay.session_factory() as session:
            return logic.list_templates(session, owner_id)

    @api
    def delete_template(self, template_id):
        with self.relay.transaction() as session:
            template = logic.get_template(session, template_id)
            out = logic.template_to_dict(session, template)
            session.delete(template)
            return out

    # -------------------------------------------------------------- placement data
    # (issue 4) clusters, host templates and VM groups: see services/lifecycle/clusters.py

    @api
    def update_host(self, host_id, template, replace=False):
        with self.relay.transaction() as session:
            return logic.host_to_dict(clusters.update_host(session, host_id, template, replace))

    @api
    def create_cluster(self, name, template=None):
        with self.relay.transaction() as session:
            return clusters.cluster_to_dict(session, clusters.create_cluster(session, name,
                                                                             template))

    @api
    def get_cluster(self, cluster_id):
        with self.relay.session_factory() as session:
            return clusters.cluster_to_dict(session, clusters.get_cluster(session, cluster_id))

    @api
    def list_clusters(self):
        with self.relay.session_factory() as session:
            return clusters.list_clusters(session)

    @api
    def update_cluster(self, cluster_id, template, replace=False):
        with self.relay.transaction() as session:
            cluster = clusters.update_cluster(session, cluster_id, template, replace)
            return clusters.cluster_to_dict(session, cluster)

    @api
    def delete_cluster(self, cluster_id):
        with self.relay.transaction() as session:
            return clusters.delete_cluster(session, cluster_id)

    @api
    def cluster_add_host(self, cluster_id, host_id):
        with self.relay.transaction() as session:
            return clusters.cluster_to_dict(session, clusters.add_host(session, cluster_id,
                                                                       host_id))

    @api
    def cluster_del_host(self, cluster_id, host_id):
        with self.relay.transaction() as session:
            return clusters.cluster_to_dict(session, clusters.del_host(session, cluster_id,
                                                                       host_id))

    @api
    def create_vmgroup(self, owner_id, name, roles, rules=None):
        with self.relay.transaction() as session:
            group = clusters.create_vmgroup(session, owner_id, name, roles, rules)
            return clusters.vmgroup_to_dict(session, group)

    @api
    def get_vmgroup(self, group_id):
        with self.relay.session_factory() as session:
            return clusters.vmgroup_to_dict(session, clusters.get_vmgroup(session, group_id))

    @api
    def list_vmgroups(self, owner_id=None):
        with self.relay.session_factory() as session:
            return clusters.list_vmgroups(session, owner_id)

    @api
    def delete_vmgroup(self, group_id):
        with self.relay.transaction() as session:
            return clusters.delete_vmgroup(session, group_id)

    # -------------------------------------------------------------- storage and networks
    # (issue 5) datastores, images and virtual networks: see services/lifecycle/images.py
    # and vnets.py; what a VM takes of them at deploy is services/lifecycle/devices.py

    @api
    def create_datastore(self, name, type, path, host_id=None):
        with self.relay.transaction() as session:
            ds = images.create_datastore(session, name, type, path, host_id)
            return images.datastore_to_dict(session, ds)

    @api
    def get_datastore(self, datastore):
        with self.relay.session_factory() as session:
            return images.datastore_to_dict(session, images.get_datastore(session, datastore))

    @api
    def list_datastores(self):
        with self.relay.session_factory() as session:
            return images.list_datastores(session)

    @api
    def delete_datastore(self, datastore_id):
        with self.relay.transaction() as session:
            return images.delete_datastore(session, datastore_id)

    @api
    def create_image(self, owner_id, name, path, datastore=None, persistent=False):
        with self.relay.transaction() as session:
            image = images.register_image(session, owner_id, name, path, datastore, persistent)
            return images.image_to_dict(session, image)

    @api
    def get_image(self, image_id):
        with self.relay.session_factory() as session:
            return images.image_to_dict(session, images.get_image(session, image_id))

    @api
    def list_images(self, owner_id=None):
        with self.relay.session_factory() as session:
            return images.list_images(session, owner_id)

    @api
    def delete_image(self, image_id):
        with self.relay.transaction() as session:
            return images.delete_image(session, image_id)

    @api
    def set_image_persistent(self, image_id, persistent):
        """image persistent / nonpersistent"""
        with self.relay.transaction() as session:
            return images.image_to_dict(session, images.set_persistent(session, image_id,
                                                                       persistent))

    @api
    def create_vnet(self, owner_id, name, template):
        with self.relay.transaction() as session:
            return vnets.vnet_to_dict(session, vnets.create_vnet(session, owner_id, name,
                                                                 template))

    @api
    def get_vnet(self, vnet_id):
        with self.relay.session_factory() as session:
            return vnets.vnet_to_dict(session, vnets.get_vnet(session, vnet_id))

    @api
    def list_vnets(self, owner_id=None):
        with self.relay.session_factory() as session:
            return vnets.list_vnets(session, owner_id)

    @api
    def delete_vnet(self, vnet_id):
        with self.relay.transaction() as session:
            return vnets.delete_vnet(session, vnet_id)

    @api
    def vnet_hold(self, vnet_id, address):
        with self.relay.transaction() as session:
            return vnets.vnet_to_dict(session, vnets.hold(session, vnet_id, address))

    @api
    def vnet_release(self, vnet_id, address):
        with self.relay.transaction() as session:
            return vnets.vnet_to_dict(session, vnets.release(session, vnet_id, address))

    @api
    def vnet_addar(self, vnet_id, ar):
        with self.relay.transaction() as session:
            return vnets.vnet_to_dict(session, vnets.add_range(session, vnet_id, ar))

    @api
    def vnet_rmar(self, vnet_id, ar_id):
        with self.relay.transaction() as session:
            return vnets.vnet_to_dict(session, vnets.remove_range(session, vnet_id, ar_id))
