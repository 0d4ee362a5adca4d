"""The scheduler service: places each VM the moment it becomes PENDING.

It owns nothing durable. A ``vm.state`` event for a PENDING VM triggers a
placement at once; a VM leaving a host (capacity freed) or a host becoming
MONITORED triggers a sweep of every PENDING VM, and a periodic sweep catches
whatever events were missed. The final reservation is lifecycle's, atomic in
the database, so any number of schedulers can run side by side.
"""
import logging

from nameko.events import event_handler
from nameko.rpc import RpcProxy
from nameko.timer import timer
from sqlalchemy import select

from cirrus import config, messages
from cirrus.db.models import Host, VirtualMachine
from cirrus.dependencies import Database
from services.scheduler.placement import HostView, VmRequest, rank

log = logging.getLogger(__name__)

SWEEP_INTERVAL = config.get()["scheduler"].get("sweep_interval", 5)


class SchedulerService:
    name = "scheduler"

    db = Database()
    lifecycle = RpcProxy(messages.LIFECYCLE)

    @event_handler(messages.LIFECYCLE, messages.VM_STATE)
    def on_vm_state(self, event):
        if event["status"] == "PENDING":
            self.schedule([event["id"]])
        elif event["status"] == "DONE":     # the only status that frees capacity
            self.schedule()

    @event_handler(messages.LIFECYCLE, messages.HOST_STATE)
    def on_host_state(self, event):
        if event["state"] == "MONITORED":
            self.schedule()

    @timer(interval=SWEEP_INTERVAL)
    def sweep(self):
        self.schedule()

    def schedule(self, vm_ids=None):
        """Place the given PENDING VMs, or all of them, oldest first."""
        with self.db() as session:
            query = select(VirtualMachine.id, VirtualMachine.cpu, VirtualMachine.memory,
                           VirtualMachine.sched_message).where(VirtualMachine.state == "PENDING")
            if vm_ids is not None:
                query = query.where(VirtualMachine.id.in_(vm_ids))
            pending = session.execute(query.order_by(VirtualMachine.id)).all()
            if not pending:
                return
            hosts = [HostView(h.id, h.name, h.max_cpu, h.max_mem, h.cpu_usage, h.mem_usage,
                              h.running_vms)
                     for h in session.scalars(select(Host).where(Host.state == "MONITORED"))]
        for vm_id, cpu, memory, old_message in pending:
            vm = VmRequest(vm_id, int(round(cpu * 100)), memory)
            self.place(vm, hosts, old_message)

    def place(self, vm, hosts, old_message):
        candidates, reason = rank(vm, hosts)
        for host in candidates:
            answer = self.lifecycle.deploy(vm.id, host.id)
            if answer["outcome"] == "deployed":
                host.reserve(vm.cpu, vm.memory)
                log.info("VM %s placed on %s", vm.id, host.name)
                return
            if answer["outcome"] == "vm_not_pending":
                return      # another scheduler got it first, or the user acted
            reason = answer["reason"]
        if reason and reason != old_message:
            self.lifecycle.set_sched_message(vm.id, reason)
