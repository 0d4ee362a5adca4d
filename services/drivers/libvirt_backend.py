"""The libvirt backend: test:///default in-process, or qemu:///system for real guests.

Each VM is a persistent domain ``cirrus-<id>`` whose files (disk copies and
the serial console log) live in ``<datastore>/<id>/``. The domain XML comes
from ``domain_xml``, a pure function of the VM.

Failures are libvirt's own exceptions, so their message reaches the VM. On
test:///default this template makes deploy fail (BOOT_FAILURE), because
libvirt refuses the architecture:

    OS = [ ARCH = "bogus" ]     ->  "unsupported configuration: Unknown architecture bogus"

and a DISK whose SOURCE does not exist makes clone fail (PROLOG_FAILURE):

    DISK = [ SOURCE = "/nonexistent/disk.img" ]  ->  "DISK 0: source /nonexistent/disk.img does not exist"
"""
import functools
import logging
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from services.drivers import backend
from services.drivers.backend import (Backend, disk_source, domain_name, sections, template_of,
                                     vm_id_of)

log = logging.getLogger(__name__)

# libvirt also prints every error on stderr; here they arrive as exceptions
libvirt.registerErrorHandler(lambda _ctx, _error: None, None)

QCOW2_MAGIC = b"QFI\xfb"
CONSOLE_LOG = "console.log"
SHUTDOWN_REPEAT = 5     # seconds between ACPI shutdown requests to a guest
UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
STATES = {
    libvirt.VIR_DOMAIN_RUNNING: backend.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: backend.RUNNING,     # running, waiting on I/O
    libvirt.VIR_DOMAIN_PAUSED: backend.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: backend.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: backend.RUNNING,    # still shutting down
    libvirt.VIR_DOMAIN_SHUTOFF: backend.POWEROFF,
    libvirt.VIR_DOMAIN_CRASHED: backend.CRASHED,
}


# ---------------------------------------------------------------- domain XML

def kvm_usable():
    """KVM needs /dev/kvm and a CPU with hardware virtualization. Some
    sandboxes offer a /dev/kvm whose guests never boot, so check both."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def domain_type_for(uri):
    if uri.startswith("test:"):
        return "test"
    return "kvm" if kvm_usable() else "qemu"


def positive_int(vm, key):
    value = vm.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or int(value) != value:
        raise ValueError(f"VM {vm.get('id')}: {key} must be a positive integer, got {value!r}")
    return int(value)


def disk_path(vm_dir, index):
    """Where clone puts DISK ``index`` (OpenNebula's disk.<DISK_ID>)."""
    return os.path.join(vm_dir, f"disk.{index}")


def disk_target(disk, index):
    prefix = disk.get("DEV_PREFIX", "vd")
    return disk.get("TARGET") or prefix + "abcdefghijklmnopqrstuvwxyz"[index]


def _sub(parent, tag, text=None, **attrs):
    element = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        element.text = str(text)
    return element


def domain_xml(vm, vm_dir, domain_type, disk_formats=None):
    """The libvirt domain of ``vm``: memory (MB) and VCPU, OS kernel/initrd/cmdline
    when given, one disk per DISK with a source (its copy in ``vm_dir``), a
    user-mode interface per NIC, and for qemu a serial console logged to
    ``vm_dir/console.log``. ``disk_formats`` maps a DISK index to "raw" or
    "qcow2" (default raw)."""
    template = template_of(vm)
    disk_formats = disk_formats or {}
    os_section = template.get("OS") or {}
    emulated = domain_type != "test"

    domain = ET.Element("domain", type=domain_type)
    _sub(domain, "name", domain_name(vm["id"]))
    if vm.get("name"):
        _sub(domain, "title", vm["name"])
    _sub(domain, "memory", positive_int(vm, "memory") * 1024, unit="KiB")
    _sub(domain, "vcpu", positive_int(vm, "vcpu"))

    os_element = _sub(domain, "os")
    type_attrs = {key.lower(): os_section[key] for key in ("ARCH", "MACHINE") if os_section.get(key)}
    _sub(os_element, "type", "hvm", **type_attrs)
    if os_section.get("KERNEL"):
        _sub(os_element, "kernel", os_section["KERNEL"])
        if os_section.get("INITRD"):
            _sub(os_element, "initrd", os_section["INITRD"])
        cmdline = os_section.get("KERNEL_CMDLINE") or os_section.get("KERNEL_CMD")
        if cmdline:
            _sub(os_element, "cmdline", cmdline)
    else:
        _sub(os_element, "boot", dev="hd")
    if emulated:
        # ACPI lets a graceful shutdown press the guest's power button
        features = _sub(domain, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    for index, disk in enumerate(sections(template, "DISK")):
        if not disk_source(disk):
            continue
        element = _sub(devices, "disk", type="file", device="disk")
        if emulated:
            _sub(element, "driver", name="qemu", type=disk_formats.get(index, "raw"))
        _sub(element, "source", file=disk_path(vm_dir, index))
        _sub(element, "target", dev=disk_target(disk, index), bus="virtio")
        if str(disk.get("READONLY", "NO")).upper() == "YES":
            _sub(element, "readonly")
    for nic in sections(template, "NIC"):
        # qemu user-mode networking only: no bridges, nothing leaves the host
        element = _sub(devices, "interface", type="user")
        if nic.get("MAC"):
            _sub(element, "mac", address=nic["MAC"])
        _sub(element, "model", type=nic.get("MODEL", "virtio"))
    if emulated:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "log", file=os.path.join(vm_dir, CONSOLE_LOG))
        _sub(serial, "target", port=0)
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port=0)
    return ET.tostring(domain, encoding="unicode")


# ---------------------------------------------------------------- the backend

def reconnecting(method):
    """Run ``method`` once more on a new connection if libvirt dropped the old
    one (a restarted libvirtd). Safe because every method is idempotent."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except libvirt.libvirtError as exc:
            if self._alive():
                raise
            log.warning("libvirt connection to %s lost (%s); reconnecting", self.uri, exc)
            self._drop_connection()
            return method(self, *args, **kwargs)
    return wrapper


def is_missing(exc):
    return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


class LibvirtBackend(Backend):

    def __init__(self, uri, datastore, shutdown_timeout=30, domain_type=None):
        self.uri = uri
        self.datastore = datastore
        self.shutdown_timeout = shutdown_timeout
        self.domain_type = domain_type or domain_type_for(uri)
        self._connection = None
        self._lock = threading.Lock()
        self._cpu_samples = {}      # deploy id or None (host) -> (busy ns, total ns)

    # ------------------------------------------------------------ connection

    @property
    def conn(self):
        # libvirt connections are thread safe; only opening one needs the lock
        with self._lock:
            if self._connection is None:
                self._connection = libvirt.open(self.uri)
            return self._connection

    def _alive(self):
        try:
            return self._connection is not None and self._connection.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def _drop_connection(self):
        with self._lock:
            old, self._connection = self._connection, None
        if old is not None:
            try:
                old.close()
            except libvirt.libvirtError:
                pass

    def close(self):
        self._drop_connection()

    def _lookup(self, deploy_id):
        try:
            return self.conn.lookupByName(deploy_id)
        except libvirt.libvirtError as exc:
            if is_missing(exc):
                return None
            raise

    def vm_dir(self, vm):
        return os.path.join(self.datastore, str(int(vm["id"])))

    # ------------------------------------------------------------ VM actions

    @reconnecting
    def deploy(self, vm):
        name = domain_name(vm["id"])
        existing = self._lookup(name)
        if existing is not None and existing.isActive():
            return name
        if existing is not None:
            # a stale definition (e.g. after a failed boot): define it afresh
            self._undefine(existing)
        vm_dir = self.vm_dir(vm)
        os.makedirs(vm_dir, exist_ok=True)
        xml = domain_xml(vm, vm_dir, self.domain_type, self._disk_formats(vm, vm_dir))
        dom = self.conn.defineXML(xml)
        try:
            dom.create()
        except libvirt.libvirtError:
            self._undefine(dom)     # leave nothing half-made behind
            raise
        return name

    @reconnecting
    def shutdown(self, deploy_id, timeout=None):
        timeout = self.shutdown_timeout if timeout is None else timeout
        dom = self._lookup(deploy_id)
        if dom is None or not dom.isActive():
            return
        start = time.monotonic()
        asked = None
        while self._active(deploy_id):
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(f"{deploy_id} did not shut down within {timeout} s")
            if asked is None or now - asked >= SHUTDOWN_REPEAT:
                # ask again: a guest still booting may not have heard the first press
                self._ask_shutdown(dom)
                asked = now
            time.sleep(0.2)

    @reconnecting
    def cancel(self, deploy_id):
        dom = self._lookup(deploy_id)
        if dom is not None:
            self._destroy(dom)

    @reconnecting
    def poll(self, deploy_id):
        dom = self._lookup(deploy_id)
        if dom is None:
            return {"STATE": backend.GONE}
        try:
            state, _max_kb, memory_kb, _vcpus, cpu_ns = dom.info()
        except libvirt.libvirtError as exc:
            if is_missing(exc):
                return {"STATE": backend.GONE}
            raise
        state = STATES.get(state, backend.UNKNOWN)
        if state == backend.POWEROFF:
            self._cpu_samples.pop(deploy_id, None)
            return {"STATE": state, "CPU": 0.0, "MEMORY": 0}
        cpu = self._cpu_percent(deploy_id, cpu_ns, time.monotonic_ns())
        return {"STATE": state, "CPU": cpu, "MEMORY": memory_kb}

    # ------------------------------------------------------------ transfer actions

    def clone(self, vm):
        vm_dir = self.vm_dir(vm)
        os.makedirs(vm_dir, exist_ok=True)
        disks = []
        for index, disk in enumerate(sections(template_of(vm), "DISK")):
            source = disk_source(disk)
            if not source:
                continue
            target = disk_path(vm_dir, index)
            if not os.path.exists(target):
                copy_disk(index, source, target)
            disks.append(target)
        return {"vm_dir": vm_dir, "disks": disks}

    @reconnecting
    def delete(self, vm):
        dom = self._lookup(domain_name(vm["id"]))
        if dom is not None:
            self._destroy(dom)
            self._undefine(dom)
        if os.path.isdir(self.vm_dir(vm)):
            shutil.rmtree(self.vm_dir(vm))

    # ------------------------------------------------------------ monitoring

    @reconnecting
    def monitor(self):
        conn = self.conn
        _model, memory_mb, cores, mhz = conn.getInfo()[:4]
        domains = self._cirrus_domains(conn)
        report = backend.host_totals(cores, mhz, memory_mb * 1024,
                                     self._used_memory_kb(conn, domains),
                                     self._used_cpu(conn, cores))
        report["HYPERVISOR"] = self.domain_type
        report["VMS"] = [{"DEPLOY_ID": name, "VM_ID": vm_id, "STATE": state}
                         for name, vm_id, state, _memory_kb in domains]
        return report

    def _cirrus_domains(self, conn):
        """(name, vm id, state, memory KB) of each domain Cirrus made."""
        out = []
        for dom in conn.listAllDomains():
            vm_id = vm_id_of(dom.name())
            if vm_id is None:
                continue
            try:
                state, _max_kb, memory_kb = dom.info()[:3]
            except libvirt.libvirtError as exc:
                if is_missing(exc):     # undefined while we listed
                    continue
                raise
            out.append((dom.name(), vm_id, STATES.get(state, backend.UNKNOWN), memory_kb))
        return out

    def _used_memory_kb(self, conn, domains):
        try:
            stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
            return stats["total"] - stats["free"] - stats.get("buffers", 0) - stats.get("cached", 0)
        except libvirt.libvirtError:
            # the test driver has no node memory stats: count what domains use
            return sum(memory_kb for _n, _i, state, memory_kb in domains
                       if state != backend.POWEROFF)

    def _used_cpu(self, conn, cores):
        """Busy share of the host's CPU since the last report, in percent of a core."""
        try:
            stats = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
        except libvirt.libvirtError:
            return 0
        total = sum(stats.values())
        busy = total - stats.get("idle", 0) - stats.get("iowait", 0)
        previous = self._cpu_samples.get(None)
        self._cpu_samples[None] = (busy, total)
        if previous is None or total <= previous[1]:
            return 0
        return round((busy - previous[0]) / (total - previous[1]) * cores * 100)

    def _cpu_percent(self, deploy_id, cpu_ns, now_ns):
        previous = self._cpu_samples.get(deploy_id)
        self._cpu_samples[deploy_id] = (cpu_ns, now_ns)
        if previous is None or now_ns <= previous[1]:
            return 0.0
        return round((cpu_ns - previous[0]) / (now_ns - previous[1]) * 100, 1)

    # ------------------------------------------------------------ helpers

    def _active(self, deploy_id):
        dom = self._lookup(deploy_id)
        return dom is not None and dom.isActive() == 1

    def _ask_shutdown(self, dom):
        try:
            dom.shutdown()
        except libvirt.libvirtError as exc:
            # it may have stopped since we looked
            if not is_missing(exc) and exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise

    def _destroy(self, dom):
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if not is_missing(exc):
                raise

    def _undefine(self, dom):
        self._cpu_samples.pop(dom.name(), None)
        try:
            dom.undefineFlags(UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            if not is_missing(exc):
                raise

    def _disk_formats(self, vm, vm_dir):
        formats = {}
        for index, disk in enumerate(sections(template_of(vm), "DISK")):
            path = disk_path(vm_dir, index)
            if disk_source(disk) and os.path.exists(path):
                formats[index] = image_format(path)
        return formats


def image_format(path):
    with open(path, "rb") as image:
        return "qcow2" if image.read(4) == QCOW2_MAGIC else "raw"


def copy_disk(index, source, target):
    """Copy DISK ``index`` into the VM's directory: a copy-on-write overlay for a
    qcow2 image, a sparse copy otherwise. Writes a temporary file and renames it,
    so a half-made copy is never taken for a done one."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"DISK {index}: source {source} does not exist")
    if not os.path.isfile(source):
        raise ValueError(f"DISK {index}: source {source} is not a file")
    partial = target + ".part"
    if image_format(source) == "qcow2" and shutil.which("qemu-img"):
        command = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                   "-b", os.path.abspath(source), partial]
    else:
        command = ["cp", "--sparse=always", source, partial]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"DISK {index}: could not copy {source}: {done.stderr.strip()}")
    os.replace(partial, target)
