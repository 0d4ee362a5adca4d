"""Placement: which hosts can take a VM, best first. Pure functions, no I/O.

Capacity is checked against what VMs have *allocated*, as OpenNebula does: a
host fits when MAX_CPU - CPU_USAGE >= 100*CPU and MAX_MEM - MEM_USAGE >= MEMORY.
Among the hosts that fit, the default policy is packing: the host with the
most VMs first, so that whole hosts stay free for large VMs. A running VM
asked to move (resched) ranks the same way among the hosts it is not on.
"""
from dataclasses import dataclass


@dataclass
class HostView:
    id: int
    name: str
    max_cpu: int
    max_mem: int
    cpu_usage: int
    mem_usage: int
    running_vms: int

    @property
    def free_cpu(self):
        return self.max_cpu - self.cpu_usage

    @property
    def free_mem(self):
        return self.max_mem - self.mem_usage

    def reserve(self, cpu, memory):
        self.cpu_usage += cpu
        self.mem_usage += memory
        self.running_vms += 1


@dataclass
class VmRequest:
    id: int
    cpu: int        # percent of a core
    memory: int     # MB


def rank(vm, hosts):
    """The hosts that fit ``vm``, best first, and why none does if the list is empty."""
    if not hosts:
        return [], "No host is enabled and monitored"
    fitting = [h for h in hosts if h.free_cpu >= vm.cpu and h.free_mem >= vm.memory]
    if fitting:
        return sorted(fitting, key=lambda h: (-h.running_vms, h.id)), None
    if not any(h.free_cpu >= vm.cpu for h in hosts):
        return [], f"Not enough CPU capacity: {vm.cpu}/{max(h.free_cpu for h in hosts)}"
    return [], f"Not enough memory: {vm.memory}/{max(h.free_mem for h in hosts)} MB"


def rank_elsewhere(vm, hosts, current_host_id):
    """``rank`` for a VM that must leave ``current_host_id``: every other host."""
    others = [h for h in hosts if h.id != current_host_id]
    if not others:
        return [], "No other host is enabled and monitored"
    return rank(vm, others)
