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
(what earlier results reported: "checkpoint", "vm_dir"...)}, and from
lifecycle's deploy on "disks", "nics", "context" and "token" (the shapes are
in disk_problem, nic_specs and services/drivers/context.py).
"""
import abc
import os
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


# ---------------------------------------------------------------- disks and NICs
# What lifecycle computes at deploy time (args.vm "disks" and "nics",
# services/lifecycle/devices.py); a template DISK that names a SOURCE or PATH
# and no image is not among them and is read from the template as before.

DISK_TYPES = ("file", "swap", "fs")
DISK_FORMATS = ("qcow2", "raw")
CLONE_MODES = ("overlay", "copy", "ln")
_TARGET = re.compile(r"^(vd|sd|hd|xvd)[a-z]{1,2}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_MODEL = re.compile(r"^[A-Za-z0-9_-]+$")


def disk_target(disk, index):
    """A template DISK's device name: TARGET, or DEV_PREFIX (vd) and its index."""
    prefix = disk.get("DEV_PREFIX", "vd")
    return disk.get("TARGET") or prefix + "abcdefghijklmnopqrstuvwxyz"[index]


def template_disks(vm):
    """The old way: each template DISK with a SOURCE/PATH, copied (a qcow2 image
    gets an overlay, decided when the file is seen, so "format" is None)."""
    return [{"id": index, "type": "file", "source": disk_source(disk), "format": None,
             "clone": None, "size_mb": None, "target": disk_target(disk, index),
             "readonly": str(disk.get("READONLY", "NO")).upper() == "YES", "save_as": None}
            for index, disk in enumerate(sections(template_of(vm), "DISK"))
            if disk_source(disk)]


def _absolute_path(value):
    return isinstance(value, str) and os.path.isabs(value) and "\0" not in value


def _positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def disk_problem(disk):
    """What is wrong with one entry of "disks", naming the field, or None."""
    if not isinstance(disk, dict):
        return f"disks: each disk must be an object, got {type(disk).__name__}"
    disk_id = disk.get("id")
    if not isinstance(disk_id, int) or isinstance(disk_id, bool) or disk_id < 0:
        return f"disks: id must be a DISK index (an integer from 0), got {disk_id!r}"
    where = f"DISK {disk_id}"
    kind = disk.get("type")
    if kind not in DISK_TYPES:
        return f"{where}: type must be one of {', '.join(DISK_TYPES)}, got {kind!r}"
    if kind == "file":
        if not _absolute_path(disk.get("source")):
            return f"{where}: source must be an absolute image path, got {disk.get('source')!r}"
        if disk.get("format") not in DISK_FORMATS:
            return (f"{where}: format must be one of {', '.join(DISK_FORMATS)}, "
                    f"got {disk.get('format')!r}")
        if disk.get("clone") not in CLONE_MODES:
            return (f"{where}: clone must be one of {', '.join(CLONE_MODES)}, "
                    f"got {disk.get('clone')!r}")
        if disk.get("size_mb") is not None and not _positive(disk.get("size_mb")):
            return f"{where}: size_mb must be a positive integer, got {disk.get('size_mb')!r}"
    elif not _positive(disk.get("size_mb")):
        return (f"{where}: a {kind} disk needs size_mb, a positive integer, "
                f"got {disk.get('size_mb')!r}")
    if not isinstance(disk.get("target"), str) or not _TARGET.match(disk["target"]):
        return f"{where}: target must be a device name such as vda, got {disk.get('target')!r}"
    if not isinstance(disk.get("readonly", False), bool):
        return f"{where}: readonly must be true or false, got {disk.get('readonly')!r}"
    if disk.get("save_as") is not None and not _absolute_path(disk["save_as"]):
        return f"{where}: save_as must be an absolute path or null, got {disk['save_as']!r}"
    return None


def disk_specs(vm):
    """The VM's disks, checked, in DISK order: lifecycle's "disks" (image and
    volatile disks), and the template's SOURCE/PATH disks at the indexes those
    leave free. A bad entry raises ValueError naming the disk and the field,
    before anything is made."""
    disks = vm.get("disks") or []
    if not isinstance(disks, list):
        raise ValueError(f"VM {vm.get('id')}: disks must be a list, got {type(disks).__name__}")
    for disk in disks:
        problem = disk_problem(disk)
        if problem:
            raise ValueError(f"VM {vm.get('id')}: {problem}")
    given = {disk["id"] for disk in disks}
    disks = sorted(disks + [disk for disk in template_disks(vm) if disk["id"] not in given],
                   key=lambda disk: disk["id"])
    for field in ("id", "target"):
        values = [disk[field] for disk in disks]
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"VM {vm.get('id')}: disks: {field} {', '.join(repeated)} "
                             f"appears more than once")
    return [{"size_mb": None, "readonly": False, "save_as": None, **disk} for disk in disks]


def nic_specs(vm):
    """The VM's NICs as [{"mac", "model"}]: "nics" when lifecycle sent some
    (one per template NIC), else the template's NIC sections. A bad MAC or
    model raises ValueError."""
    if not vm.get("nics"):
        nics = [{"id": index, "mac": nic.get("MAC"), "model": nic.get("MODEL")}
                for index, nic in enumerate(sections(template_of(vm), "NIC"))]
    elif isinstance(vm["nics"], list) and all(isinstance(n, dict) for n in vm["nics"]):
        nics = vm["nics"]
    else:
        raise ValueError(f"VM {vm.get('id')}: nics must be a list of objects")
    checked = []
    for index, nic in enumerate(nics):
        where = f"VM {vm.get('id')}: NIC {nic.get('id', index)}"
        mac, model = nic.get("mac"), nic.get("model") or "virtio"
        if mac is not None and not (isinstance(mac, str) and _MAC.match(mac)):
            raise ValueError(f"{where}: mac must look like 02:00:0a:00:00:01, got {mac!r}")
        if not (isinstance(model, str) and _MODEL.match(model)):
            raise ValueError(f"{where}: model must be a NIC model such as virtio, got {model!r}")
        checked.append({"mac": mac, "model": model})
    return checked


def host_totals(cores, mhz, total_kb, used_kb, used_cpu):
    """Host monitoring in OpenNebula's names; CPU is in percent of one core."""
    total_cpu = int(cores) * 100
    used_cpu = max(0, min(total_cpu, int(used_cpu)))
    used_kb = max(0, min(int(total_kb), int(used_kb)))
    return {"TOTALCPU": total_cpu, "CPUSPEED": int(mhz), "USEDCPU": used_cpu,
            "FREECPU": total_cpu - used_cpu, "TOTALMEMORY": int(total_kb),
            "USEDMEMORY": used_kb, "FREEMEMORY": int(total_kb) - used_kb}


def datastore_totals(total_mb, used_mb):
    """The system datastore's space in OpenNebula's names (MB)."""
    total_mb, used_mb = int(total_mb), max(0, min(int(total_mb), int(used_mb)))
    return {"DS_LOCATION_TOTAL_MB": total_mb, "DS_LOCATION_USED_MB": used_mb,
            "DS_LOCATION_FREE_MB": total_mb - used_mb}


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
        """Transfer: make the VM's directory, each disk of disk_specs(vm) in it, and
        the context CD when the VM has a "context". Returns {"vm_dir", "disks":
        [paths], "context": the CD's path (only with a context)}."""

    @abc.abstractmethod
    def mv(self, vm, direction, from_dir=None):
        """Transfer: "out" undefines the domain and parks the VM's directory; "in"
        brings it (from ``from_dir`` or the parking) into this node's datastore.
        Returns {"vm_dir": where the directory now is}."""

    @abc.abstractmethod
    def delete(self, vm):
        """Transfer: remove the domain if it is still there, copy each disk with a
        save_as there, and remove the VM's directory (in the datastore or parked);
        never an ln image. Returns {"saved": [save_as paths now holding a disk]}."""

    @abc.abstractmethod
    def monitor(self):
        """Host monitoring: HYPERVISOR, URI, TOTALCPU, CPUSPEED, TOTALMEMORY, USEDMEMORY,
        FREEMEMORY, USEDCPU, FREECPU (host_totals), DS_LOCATION_TOTAL_MB, _USED_MB,
        _FREE_MB (the system datastore, datastore_totals), NETRX, NETTX (bytes the
        host's NICs moved since boot), and VMS: [vm_report(...)] for the domains
        Cirrus owns."""

    @abc.abstractmethod
    def watch(self, callback):
        """From now on, call ``callback(deploy_id, state, reason)`` (from any thread)
        whenever a domain changes state, whoever changed it."""

    def close(self):
        """Release the backend's connection."""
