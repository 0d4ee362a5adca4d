"""The one interface every hypervisor backend implements.

A backend does what OpenNebula's driver scripts do for one node: the
virtualization actions (deploy, shutdown, cancel, poll), the transfer actions
(clone, delete) and host monitoring. Every method is idempotent, because a
command is redelivered if the worker dies before acking it: deploying a
running VM returns its id, and stopping or deleting a missing one succeeds.
A failure is an exception whose message says what went wrong.

``vm`` is the dict a command carries: {"id", "name", "cpu", "vcpu", "memory"
(MB), "template" (OpenNebula keys: OS, DISK, NIC...), "deploy_id"}.
"""
import abc
import re

DOMAIN_PREFIX = "cirrus-"
_DOMAIN_NAME = re.compile(r"^cirrus-(\d+)$")

# VM states in poll and monitor reports
RUNNING = "RUNNING"      # active
PAUSED = "PAUSED"        # active but paused
POWEROFF = "POWEROFF"    # defined on the host, not running
CRASHED = "CRASHED"
GONE = "GONE"            # not on the host at all
UNKNOWN = "UNKNOWN"


def domain_name(vm_id):
    """The name of a VM's domain, which is also its deploy id."""
    return f"{DOMAIN_PREFIX}{int(vm_id)}"


def vm_id_of(name):
    """The VM id in a domain name Cirrus made, or None for anyone else's domain."""
    match = _DOMAIN_NAME.match(name)
    return int(match.group(1)) if match else None


def template_of(vm):
    """The VM's template with its keys in upper case, as OpenNebula stores them."""
    def upper(value):
        if isinstance(value, dict):
            return {str(k).upper(): upper(v) for k, v in value.items()}
        if isinstance(value, list):
            return [upper(v) for v in value]
        return value
    return upper(vm.get("template") or {})


def sections(template, key):
    """A template section that may appear once or repeat (DISK, NIC), as a list."""
    value = (template or {}).get(key)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def disk_source(disk):
    """Where a DISK's image is: SOURCE, or PATH as OpenNebula also accepts."""
    return disk.get("SOURCE") or disk.get("PATH")


def host_totals(cores, mhz, total_kb, used_kb, used_cpu):
    """Host monitoring in OpenNebula's names; CPU is in percent of one core."""
    total_cpu = int(cores) * 100
    used_cpu = max(0, min(total_cpu, int(used_cpu)))
    used_kb = max(0, min(int(total_kb), int(used_kb)))
    return {"TOTALCPU": total_cpu, "CPUSPEED": int(mhz), "USEDCPU": used_cpu,
            "FREECPU": total_cpu - used_cpu, "TOTALMEMORY": int(total_kb),
            "USEDMEMORY": used_kb, "FREEMEMORY": int(total_kb) - used_kb}


class Backend(abc.ABC):
    """One node's hypervisor."""

    @abc.abstractmethod
    def deploy(self, vm):
        """Define and start the VM's domain; returns its deploy id."""

    @abc.abstractmethod
    def shutdown(self, deploy_id, timeout):
        """Ask the guest to power off; fails if it is still up after ``timeout`` s."""

    @abc.abstractmethod
    def cancel(self, deploy_id):
        """Stop the domain at once (pull the plug)."""

    @abc.abstractmethod
    def poll(self, deploy_id):
        """The domain's state and usage: {"STATE", "CPU" (%), "MEMORY" (KB)}."""

    @abc.abstractmethod
    def clone(self, vm):
        """Transfer: make the VM's directory and put a copy of each DISK in it."""

    @abc.abstractmethod
    def delete(self, vm):
        """Transfer: remove the domain if it is still there, and the VM's directory."""

    @abc.abstractmethod
    def monitor(self):
        """Host monitoring: HYPERVISOR, TOTALCPU, CPUSPEED, TOTALMEMORY, USEDMEMORY,
        FREEMEMORY, USEDCPU, FREECPU, and VMS: [{"DEPLOY_ID", "VM_ID", "STATE"}]
        for the domains Cirrus owns."""

    def close(self):
        """Release the backend's connection."""
