"""The scheduler service: places each VM the moment it becomes PENDING, and
moves RUNNING VMs flagged for rescheduling.

It owns nothing durable. A ``vm.state`` event for a PENDING VM triggers a
placement at once, one for a RUNNING VM with ``resched`` a live migration; a
VM leaving a host (capacity freed) or a host becoming MONITORED triggers a
sweep, and a periodic sweep catches whatever events were missed (and frees
that migrations leave behind on arrival). The final reservation is
lifecycle's, atomic in the database, so any number of schedulers can run side
by side.
"""
import logging

from nameko.events import event_handler
from nameko.exceptions import RemoteError
from nameko.rpc import RpcProxy
from nameko.timer import timer
from sqlalchemy import and_, or_, select

from cirrus import config, messages
from cirrus.db.models import Host, VirtualMachine
from cirrus.dependencies import Database
from services.scheduler.placement import HostView, VmRequest, rank, rank_elsewhere

log = logging.getLogger(__name__)

SWEEP_INTERVAL = config.get()["scheduler"].get("sweep_interval", 5)

# statuses entered by leaving a host, i.e. freeing capacity
OFF_HOST = ("DONE", "STOPPED", "UNDEPLOYED")


class SchedulerService:
    name = "scheduler"

    db = Database()
    lifecycle = RpcProxy(messages.LIFECYCLE)

    @event_handler(messages.LIFECYCLE, messages.VM_STATE)
    def on_vm_state(self, event):
        if event["status"] == "PENDING" or (event["status"] == "RUNNING" and event.get("resched")):
            self.schedule([event["id"]])
        elif event["status"] in OFF_HOST:
            self.schedule()

    @event_handler(messages.LIFECYCLE, messages.HOST_STATE)
    def on_host_state(self, event):
        if event["state"] == "MONITORED":
            self.schedule()

    @timer(interval=SWEEP_INTERVAL)
    def sweep(self):
        self.schedule()

    def schedule(self, vm_ids=None):
        """Place the given PENDING VMs and move the given RUNNING VMs flagged
        for rescheduling, or all of them, oldest first. HOLD VMs wait."""
        vms = VirtualMachine
        with self.db() as session:
            query = select(vms.id, vms.cpu, vms.memory, vms.sched_message, vms.state,
                           vms.host_id).where(or_(
                               vms.state == "PENDING",
                               and_(vms.state == "ACTIVE", vms.lcm_state == "RUNNING",
                                    vms.resched.is_(True))))
            if vm_ids is not None:
                query = query.where(vms.id.in_(vm_ids))
            todo = session.execute(query.order_by(vms.id)).all()
            if not todo:
                return
            hosts = [HostView(h.id, h.name, h.max_cpu, h.max_mem, h.cpu_usage, h.mem_usage,
                              h.running_vms)
                     for h in session.scalars(select(Host).where(Host.state == "MONITORED"))]
        for vm_id, cpu, memory, old_message, state, host_id in todo:
            vm = VmRequest(vm_id, int(round(cpu * 100)), memory)
            if state == "PENDING":
                self.place(vm, hosts, old_message)
            else:
                self.move(vm, hosts, host_id, old_message)

    def place(self, vm, hosts, old_message):
        candidates, reason = rank(vm, hosts)
        self.try_hosts(vm, candidates, reason, old_message, self.deploy)

    def move(self, vm, hosts, current_host_id, old_message):
        candidates, reason = rank_elsewhere(vm, hosts, current_host_id)
        self.try_hosts(vm, candidates, reason, old_message, self.migrate)

    def try_hosts(self, vm, candidates, reason, old_message, send):
        """Send ``vm`` to the first candidate that takes it; ``send`` answers
        "sent", "gone" (the VM moved on: stop) or why the host refused."""
        for host in candidates:
            answer = send(vm, host)
            if answer == "sent":
                host.reserve(vm.cpu, vm.memory)
                return
            if answer == "gone":
                return      # another scheduler got it first, or the user acted
            reason = answer
        if reason and reason != old_message:
            self.lifecycle.set_sched_message(vm.id, reason)

    def deploy(self, vm, host):
        answer = self.lifecycle.deploy(vm.id, host.id)
        if answer["outcome"] == "deployed":
            log.info("VM %s placed on %s", vm.id, host.name)
            return "sent"
        return "gone" if answer["outcome"] == "vm_not_pending" else answer["reason"]

    def migrate(self, vm, host):
        try:
            self.lifecycle.vm_action(vm.id, "migrate", {"host_id": host.id, "live": True})
        except RemoteError as err:
            if err.exc_type != "FailedPrecondition":
                raise
            # the VM's status refusing the migration is TransitionError's text
            return "gone" if f"VM {vm.id}: cannot " in (err.value or "") else err.value
        log.info("VM %s rescheduled to %s", vm.id, host.name)
        return "sent"
