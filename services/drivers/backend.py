"""The one interface every hypervisor backend implements.

A backend does what OpenNebula's driver scripts do for one node: the
virtualization actions (deploy, shutdown, cancel, poll, save, restore, reboot,
reset, migrate), the transfer actions (clone, mv, delete), host monitoring and
the hypervisor's own news about its domains (``watch``). Every action is
idempotent, because a command is redelivered if the worker dies before acking
it: deploying a running VM returns its id, stopping or deleting a missing one
succeeds, saving a VM already saved or moving a directory already moved
reports what is there. A failure is an exception whose message says what went
wrong.

``vm`` is the dict a command carries: {"id", "name", "cpu", "vcpu", "memory"
(MB), "template" (OpenNebula keys: OS, DISK, NIC...), "deploy_id", "runtime"
(what earlier results reported: "checkpoint", "vm_dir"...)}.
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

CHECKPOINT = "checkpoint"   # the file save writes in the VM's directory
MV_DIRECTIONS = ("out", "in")


def domain_name(vm_id):
    """The name of a VM's domain, which is also its deploy id."""
    return f"{DOMAIN_PREFIX}{int(vm_id)}"


def vm_id_of(name):
    """The VM id in a domain name Cirrus made, or None for anyone else's domain."""
    match = _DOMAIN_NAME.match(name)
    return int(match.group(1)) if match else None


def runtime_of(vm):
    """What earlier results of the VM's commands reported (checkpoint, vm_dir...)."""
    return vm.get("runtime") or {}


def vm_report(deploy_id, state, cpu=0.0, memory_kb=0, net_rx=0, net_tx=0, disk_read=0,
              disk_write=0):
    """One VM in a host.monitor report, in OpenNebula's names."""
    return {"DEPLOY_ID": deploy_id, "VM_ID": vm_id_of(deploy_id), "STATE": state,
            "CPU": cpu, "MEMORY": memory_kb, "NETRX": net_rx, "NETTX": net_tx,
            "DISKRDBYTES": disk_read, "DISKWRBYTES": disk_write}


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

    uri = None          # what a migration to this node's hypervisor is sent to
    reconnects = 0      # times the hypervisor connection was opened again: news may be lost

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
    def save(self, vm):
        """Save the domain's memory to a checkpoint in the VM's directory and undefine
        it; returns {"checkpoint": path, "vm_dir": dir}."""

    @abc.abstractmethod
    def restore(self, vm):
        """Bring the VM back running: a running domain is left alone, a paused one is
        resumed, otherwise it comes back from its checkpoint. Returns its deploy id."""

    @abc.abstractmethod
    def reboot(self, deploy_id):
        """Ask the guest to reboot."""

    @abc.abstractmethod
    def reset(self, deploy_id):
        """Reset the domain at once (press its reset button)."""

    @abc.abstractmethod
    def migrate(self, vm, dest_host, dest_uri):
        """Move the running VM to ``dest_uri``'s hypervisor; returns what the target's
        restore needs (e.g. {"checkpoint": path})."""

    @abc.abstractmethod
    def clone(self, vm):
        """Transfer: make the VM's directory and put a copy of each DISK in it."""

    @abc.abstractmethod
    def mv(self, vm, direction, from_dir=None):
        """Transfer: "out" undefines the domain and parks the VM's directory; "in"
        brings it (from ``from_dir`` or the parking) into this node's datastore.
        Returns {"vm_dir": where the directory now is}."""

    @abc.abstractmethod
    def delete(self, vm):
        """Transfer: remove the domain if it is still there, and the VM's directory
        (in the datastore or parked)."""

    @abc.abstractmethod
    def monitor(self):
        """Host monitoring: HYPERVISOR, URI, TOTALCPU, CPUSPEED, TOTALMEMORY, USEDMEMORY,
        FREEMEMORY, USEDCPU, FREECPU, and VMS: [vm_report(...)] for the domains
        Cirrus owns."""

    @abc.abstractmethod
    def watch(self, callback):
        """From now on, call ``callback(deploy_id, state, reason)`` (from any thread)
        whenever a domain changes state, whoever changed it."""

    def close(self):
        """Release the backend's connection."""
