"""The scheduler service: places each VM the moment it becomes PENDING, and
moves RUNNING VMs flagged for rescheduling.

It owns nothing durable. A ``vm.state`` event for a PENDING VM asks for a
placement at once, one for a RUNNING VM with ``resched`` a live migration; a
VM leaving a host (capacity freed) or a host becoming MONITORED or changing
asks for a pass over every waiting VM, and a periodic sweep catches whatever
events were missed. Requests that arrive while a pass runs are merged into
the next pass, so a burst of 10,000 creations makes a few passes, not 10,000.

A pass reads the hosts and the waiting VMs once, plans with
``placement.Planner`` and sends the placements to lifecycle in batches
(``deploy_many``). The reservation is lifecycle's, atomic in the database, so
any number of schedulers can run side by side: a host another scheduler
filled first is refused, dropped from this pass, and its VMs planned again.
"""
import logging
from collections import deque

from eventlet.semaphore import Semaphore
from nameko.events import event_handler
from nameko.exceptions import RemoteError
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy
from nameko.timer import timer
from sqlalchemy import and_, or_, select

from cirrus import config, messages, metrics, tracing
from cirrus.db.models import Cluster, Host, VirtualMachine, VmGroup
from cirrus.dependencies import Database, vm_state_handler
from cirrus.metrics import Metrics
from cirrus.tracing import Tracing
from cirrus.expressions import compile_rank
from services.scheduler.placement import Group, Planner, VmRequest, host_view, policy_name

log = logging.getLogger(__name__)


def setting(key, default):
    value = config.get()["scheduler"].get(key, default)
    return default if value is None else value


SWEEP_INTERVAL = setting("sweep_interval", 5)


class Settings:
    """The scheduler's knobs, read once: policy and default rank, MAX_VM
    (waiting VMs read per pass), MAX_DISPATCH (placements per pass), MAX_HOST
    (placements per host per pass), 0 meaning no limit, how many placements
    are planned before they leave grouped by host after a pass's first batch
    (``plan_ahead``), the size of the batches sent to lifecycle and how many
    may be in flight at once, and whether a VM flagged resched moves by live
    migration (else cold)."""

    def __init__(self):
        self.policy = policy_name(setting("policy", "packing"))
        self.rank = setting("rank", "")
        compile_rank(self.rank)     # an ExpressionError names what is wrong
        self.max_vm = int(setting("max_vm", 0))
        self.max_dispatch = int(setting("max_dispatch", 0))
        self.max_host = int(setting("max_host", 0))
        self.plan_ahead = max(1, int(setting("plan_ahead", 10000)))
        self.batch = max(1, int(setting("batch", 1000)))
        self.in_flight = max(1, int(setting("in_flight", 4)))
        self.live_migration = bool(setting("live_migration", True))


# read at start: a bad setting (an unknown policy) stops the service at once
SETTINGS = Settings()


class PassQueue(DependencyProvider):
    """Merges placement requests: the VM ids asked for (or "all") wait here
    while a pass runs, and the next pass takes them all at once."""

    def setup(self):
        self.ids, self.everything = set(), False
        self.lock = Semaphore()

    def get_dependency(self, worker_ctx):
        return self

    def run(self, vm_ids, do_pass):
        """Queue ``vm_ids`` (None: every waiting VM), then run passes until
        nothing is queued, unless another worker is already doing so."""
        if vm_ids is None:
            self.everything = True
        else:
            self.ids.update(vm_ids)
        while (self.everything or self.ids) and self.lock.acquire(blocking=False):
            try:
                while self.everything or self.ids:
                    ids = None if self.everything else self.ids
                    self.ids, self.everything = set(), False
                    do_pass(ids)
            finally:
                self.lock.release()


class HostCache(DependencyProvider):
    """The hosts' views between passes (``monitored_hosts``): a pass over
    2,500 unchanged hosts reads their usage, not their templates and
    monitoring."""

    def setup(self):
        self.known = {}

    def get_dependency(self, worker_ctx):
        return self.known


class SchedulerService:
    name = "scheduler"

    db = Database()
    metrics = Metrics()
    trace = Tracing()
    lifecycle = RpcProxy(messages.LIFECYCLE)
    queue = PassQueue()
    known_hosts = HostCache()

    @vm_state_handler(*messages.VM_STATE_TO_PLACE)
    def on_vm_state(self, event):
        if event["status"] == "PENDING" or (event["status"] == "RUNNING" and event.get("resched")):
            self.schedule([event["id"]])
        elif event.get("freed"):
            self.schedule()     # a VM left a host (or a migration target): room for others

    @event_handler(messages.LIFECYCLE, messages.HOST_STATE)
    def on_host_state(self, event):
        if event["state"] == "MONITORED":
            self.schedule()

    @timer(interval=SWEEP_INTERVAL)
    def sweep(self):
        self.schedule()

    def schedule(self, vm_ids=None):
        """Place the given PENDING VMs and move the given RUNNING VMs flagged
        for rescheduling, or all of them. HOLD VMs wait."""
        self.queue.run(vm_ids, self.one_pass)

    def one_pass(self, vm_ids):
        settings = SETTINGS
        self.pending_since = {}     # for the scheduling latency of the VMs placed
        with self.db() as session:
            vms, old_messages = waiting_vms(session, vm_ids, settings.max_vm, self.pending_since)
            if not vms:
                return
            hosts = monitored_hosts(session, self.known_hosts)
            groups = vm_groups(session, {vm.group for vm in vms if vm.group is not None})
        planner = Planner(hosts, settings.policy, settings.rank, groups, settings.max_host)
        reasons = {}
        pending = [vm for vm in vms if vm.current_host is None]
        for attempt in range(3):        # again for the VMs of hosts another scheduler filled
            pending = self.place(planner, pending, settings, reasons)
            if not pending:
                break
        for vm in vms:
            if vm.current_host is not None:
                self.move(planner, vm, reasons)
        changed = {vm_id: reason for vm_id, reason in reasons.items()
                   if reason != old_messages.get(vm_id)}
        if changed:
            self.lifecycle.set_sched_messages(changed)

    def place(self, planner, vms, settings, reasons):
        """Plan ``vms`` and send the placements: the first ``batch`` as soon
        as they are planned, so that lifecycle starts on them while planning
        goes on, then ``plan_ahead`` at a time, grouped by host. A host's VMs
        of a window go in one batch, so lifecycle sends its node one driver
        message for them, not one per batch they would otherwise be spread
        over (10,000 VMs on 2,500 hosts: 2,813 messages instead of 4,312).
        Returns the VMs whose host lifecycle refused (filled by another
        scheduler)."""
        held, count, sent, retry = {}, 0, deque(), []
        window = settings.batch     # the first batch leaves at once: lifecycle starts on it
        for members, host, reason in planner.plan(vms, settings.max_dispatch):
            if host is None:
                reasons.update((m.id, reason) for m in members)
                continue
            held.setdefault(host.id, []).extend((m, host) for m in members)
            count += len(members)
            if count >= window:
                retry += self.send_by_host(planner, held, sent, settings, reasons)
                held, count, window = {}, 0, settings.plan_ahead
        retry += self.send_by_host(planner, held, sent, settings, reasons)
        while sent:
            retry += self.settle(planner, *sent.popleft(), reasons)
        return retry

    def send_by_host(self, planner, held, sent, settings, reasons):
        """Send the placements ``held`` ({host id: [(VM, host)]}, hosts in the
        order they were first chosen) in batches of whole hosts of about
        ``batch`` VMs, up to ``in_flight`` batches at a time; returns the VMs
        to plan again, of the batches settled meanwhile."""
        batch, retry = [], []
        for placements in held.values():
            batch.extend(placements)
            if len(batch) >= settings.batch:
                retry += self.send(planner, batch, sent, settings, reasons)
                batch = []
        if batch:
            retry += self.send(planner, batch, sent, settings, reasons)
        return retry

    def send(self, planner, batch, sent, settings, reasons):
        """Send one batch; if ``in_flight`` are then out, settle the oldest
        and return its VMs to plan again."""
        sent.append((batch, self.lifecycle.deploy_many.call_async(
            [[vm.id, host.id] for vm, host in batch])))
        if len(sent) >= settings.in_flight:
            return self.settle(planner, *sent.popleft(), reasons)
        return []

    def settle(self, planner, batch, reply, reasons):
        """Read lifecycle's answers to one batch; returns the VMs to plan again."""
        answers = reply.result()
        hosts = {vm.id: (vm, host) for vm, host in batch}
        retry = []
        for answer in answers:
            vm, host = hosts[answer["vm_id"]]
            if answer["outcome"] == "deployed":
                reasons.pop(vm.id, None)
                metrics.scheduled(self.pending_since.get(vm.id))
                log.info("VM %s placed on %s", vm.id, host.name,
                         extra=tracing.fields(vm.request_id, vm.id))
            elif answer["outcome"] == "host_unfit":
                planner.forget(host)
                reasons[vm.id] = answer["reason"]
                retry.append(vm)
            elif answer["outcome"] == "vm_waits":
                # its devices (a lease, a persistent image) cannot be had now:
                # lifecycle gave the host's share back, and so does the plan
                planner.release(vm, host)
                reasons[vm.id] = answer["reason"]
            # vm_not_pending: another scheduler placed it, or its owner acted
        return retry

    def move(self, planner, vm, reasons):
        """Live-migrate a VM flagged for rescheduling to the best other host."""
        members, host, reason = next(planner.plan([vm]))
        if host is None:
            reasons[vm.id] = reason
            return
        try:
            with self.trace.acting_for(vm.request_id, vm.id):    # not the pass's request
                self.lifecycle.vm_action(vm.id, "migrate", {"host_id": host.id,
                                                             "live": SETTINGS.live_migration})
        except RemoteError as err:
            if err.exc_type != "FailedPrecondition":
                raise
            planner.forget(host)
            # the VM's status refusing the migration is TransitionError's text
            if f"VM {vm.id}: cannot " not in (err.value or ""):
                reasons[vm.id] = err.value
            return
        reasons.pop(vm.id, None)
        log.info("VM %s rescheduled to %s", vm.id, host.name,
                 extra=tracing.fields(vm.request_id, vm.id))


# ---------------------------------------------------------------- reading a pass

def waiting_vms(session, vm_ids=None, limit=0, since=None):
    """The VMs to place (PENDING) or move (RUNNING with resched), as
    VmRequests, and their current scheduling messages; ``since``, a dict,
    gets each one's last change (when it became PENDING)."""
    vms = VirtualMachine
    query = select(vms.id, vms.cpu, vms.memory, vms.template, vms.sched_message, vms.state,
                   vms.host_id, vms.vmgroup_id, vms.vmgroup_role, vms.updated_at,
                   vms.last_request_id).where(or_(
                       vms.state == "PENDING",
                       and_(vms.state == "ACTIVE", vms.lcm_state == "RUNNING",
                            vms.resched.is_(True))))
    if vm_ids is not None:
        query = query.where(vms.id.in_(sorted(vm_ids)))
    query = query.order_by(vms.id)
    if limit:
        query = query.limit(limit)
    requests, old = [], {}
    for row in session.execute(query):
        requests.append(VmRequest(
            row.id, int(round(row.cpu * 100)), row.memory, row.template or {},
            row.vmgroup_id, row.vmgroup_role,
            row.host_id if row.state == "ACTIVE" else None, row.last_request_id))
        old[row.id] = row.sched_message
        if since is not None:
            since[row.id] = row.updated_at
    return requests, old


def monitored_hosts(session, known=None):
    """A HostView of every MONITORED host, for one pass. ``known`` (a dict
    kept between passes: HostCache) holds each host's view as of its
    revision and its cluster's template; a pass reads every host's usage,
    and all of a host only when one of those changed."""
    known = {} if known is None else known
    clusters = dict(session.execute(select(Cluster.id, Cluster.template)).all())
    usage = session.execute(select(
        Host.id, Host.revision, Host.cluster_id, Host.cpu_usage, Host.mem_usage,
        Host.running_vms).where(Host.state == "MONITORED")).all()
    stale = [row.id for row in usage if known.get(row.id, (None, None))[:2]
             != (row.revision, clusters.get(row.cluster_id))]
    if stale:
        for row in session.execute(select(
                Host.id, Host.revision, Host.name, Host.cluster_id, Host.max_cpu, Host.max_mem,
                Host.reserved_cpu, Host.reserved_mem, Host.template, Host.monitoring)
                .where(Host.id.in_(stale))):
            cluster = clusters.get(row.cluster_id)
            known[row.id] = (row.revision, cluster, host_view(row._mapping, cluster))
    for gone in known.keys() - {row.id for row in usage}:
        del known[gone]
    return [known[row.id][2].renewed(row.cpu_usage, row.mem_usage, row.running_vms)
            for row in usage if row.id in known]     # (not one deleted between the reads)


def vm_groups(session, group_ids):
    """The groups of this pass, with the hosts their VMs are on (or moving to)."""
    if not group_ids:
        return {}
    vms = VirtualMachine
    placed = session.execute(
        select(vms.vmgroup_id, vms.vmgroup_role, vms.host_id, vms.target_host_id)
        .where(vms.vmgroup_id.in_(group_ids), vms.state != "DONE",
               or_(vms.host_id.is_not(None), vms.target_host_id.is_not(None)))).all()
    groups = {}
    for group in session.scalars(select(VmGroup).where(VmGroup.id.in_(group_ids))):
        on_hosts = [(role, host) for gid, role, host_id, target in placed if gid == group.id
                    for host in (host_id, target) if host is not None]
        groups[group.id] = Group.from_dict(
            {"id": group.id, "name": group.name, "roles": group.roles, "rules": group.rules},
            on_hosts)
    return groups
