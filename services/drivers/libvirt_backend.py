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

clone makes the disks (services/drivers/storage.py: overlay, copy, ln in
place, swap, fs) and the context CD (services/drivers/context.py) in
``<datastore>/<id>/``; the domain attaches the CD as a read-only CD-ROM.
delete copies SAVE_AS disks out before removing that directory, which never
holds an ln image.

save writes the domain's memory to ``<datastore>/<id>/checkpoint`` (through a
``.part`` file renamed when complete) and undefines the domain; restore brings
it back with ``conn.restore`` and defines it again, so that it stays defined
after a power off as a deployed one does. mv moves ``<datastore>/<id>`` to and
from ``<parking>/<id>`` (a rename; a copy then a rename across file systems).

Live migration, by where the VM goes:

- this node is on test:///default (or any test:/// URI): every process has
  its own private test hypervisor, so nothing can migrate into another. The
  domain is saved to its checkpoint in the datastore, which nodes share, and
  undefined; BOOT_MIGRATE's restore on the target brings it back there.
- dest_uri is this node's own URI (say two nodes on one qemu:///system): both
  nodes drive the same hypervisor, there is nothing to move. The domain must
  be running; it keeps running, and the target's restore finds it so.
- any other dest_uri: a real live migration, ``migrateToURI3`` peer to peer,
  persistent on the target and undefined here. The disks must be at the same
  path on the target (a shared datastore), as with OpenNebula's shared TM.

Events: ``start_event_loop`` registers libvirt's default event loop, before
any connection is opened, and runs it in a daemon thread; ``watch`` registers
a lifecycle callback on the connection (again on every new connection) that
turns libvirt's (event, detail) into a backend state with ``event_state``.
"""
import errno
import functools
import logging
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from services.drivers import backend
from services.drivers.backend import (CHECKPOINT, MV_DIRECTIONS, Backend, disk_specs,
                                      domain_name, nic_specs, runtime_of, template_of, vm_id_of,
                                      vm_report)
from services.drivers.context import (CONTEXT_ISO, build_context_iso, context_script,
                                      context_token)
from services.drivers.storage import (declared_format, disk_file, image_format, make_disk,
                                      save_disk)

log = logging.getLogger(__name__)

# libvirt also prints every error on stderr; here they arrive as exceptions
libvirt.registerErrorHandler(lambda _ctx, _error: None, None)

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
# a real live migration: the guest keeps running, and the target keeps the definition
MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


# ---------------------------------------------------------------- events

EVENTS = ("DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED", "STOPPED", "SHUTDOWN",
          "PMSUSPENDED", "CRASHED")
EVENT_NAMES = {getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}"): name for name in EVENTS}


def _detail_names(event):
    prefix = f"VIR_DOMAIN_EVENT_{event}_"
    return {getattr(libvirt, key): key[len(prefix):] for key in dir(libvirt)
            if key.startswith(prefix) and not key.endswith("_LAST")}


EVENT_DETAILS = {event: _detail_names(event) for event in EVENTS}
# What a lifecycle event says the domain is now. DEFINED changes nothing, and
# SHUTDOWN is left out on purpose: libvirt also sends it when a reboot is done
# as a shutdown followed by a reset, and a real power off is followed at once
# by STOPPED/SHUTDOWN.
EVENT_STATES = {
    "STARTED": backend.RUNNING,
    "RESUMED": backend.RUNNING,
    "SUSPENDED": backend.PAUSED,
    "PMSUSPENDED": backend.PAUSED,
    "STOPPED": backend.POWEROFF,
    "CRASHED": backend.CRASHED,
    "UNDEFINED": backend.GONE,
}
EVENT_DETAIL_STATES = {("STOPPED", "CRASHED"): backend.CRASHED,    # the guest panicked
                       ("STOPPED", "FAILED"): backend.CRASHED}     # the emulator died


def event_state(event, detail):
    """(state, reason such as "STOPPED/DESTROYED") for a libvirt lifecycle event,
    or None when the event does not change what Cirrus knows."""
    name = EVENT_NAMES.get(event)
    if name not in EVENT_STATES:
        return None
    detail_name = EVENT_DETAILS[name].get(detail, str(detail))
    state = EVENT_DETAIL_STATES.get((name, detail_name), EVENT_STATES[name])
    return state, f"{name}/{detail_name}"


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop():
    """Register libvirt's default event loop and run it in a daemon thread. Only
    connections opened afterwards deliver events (and keepalives), so this runs
    before the first one. Idempotent."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _run_event_loop():
    while True:
        libvirt.virEventRunDefaultImpl()


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


def _sub(parent, tag, text=None, **attrs):
    element = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        element.text = str(text)
    return element


def domain_xml(vm, vm_dir, domain_type, disk_formats=None):
    """The libvirt domain of ``vm``: memory (MB) and VCPU, OS kernel/initrd/cmdline
    when given, one disk per entry of backend.disk_specs (its file in
    ``vm_dir``, or the image itself for ln), a user-mode interface per NIC, the
    context CD-ROM when the VM has a context, and for qemu a serial console
    logged to ``vm_dir/console.log``. A disk's driver type is the format its
    spec declares; template disks take it from ``disk_formats`` (DISK index
    -> "raw" or "qcow2", default raw)."""
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
    disks = disk_specs(vm)
    for disk in disks:
        element = _sub(devices, "disk", type="file", device="disk")
        if emulated:
            _sub(element, "driver", name="qemu",
                 type=declared_format(disk) or disk_formats.get(disk["id"], "raw"))
        _sub(element, "source", file=disk_file(vm_dir, disk))
        _sub(element, "target", dev=disk["target"], bus="virtio")
        if disk["readonly"]:
            _sub(element, "readonly")
    if vm.get("context") is not None:
        context_cdrom(devices, vm_dir, os_section, [disk["target"] for disk in disks],
                      emulated)
    for nic in nic_specs(vm):
        # qemu user-mode networking only: no bridges, nothing leaves the host
        element = _sub(devices, "interface", type="user")
        if nic["mac"]:
            _sub(element, "mac", address=nic["mac"])
        _sub(element, "model", type=nic["model"])
    if emulated:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "log", file=os.path.join(vm_dir, CONSOLE_LOG))
        _sub(serial, "target", port=0)
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port=0)
    return ET.tostring(domain, encoding="unicode")


def context_cdrom(devices, vm_dir, os_section, taken, emulated):
    """The context CD: IDE on the default (i440fx) machine, SATA on q35, which
    has no IDE; its target is the first of hda.. (sda..) no disk uses."""
    bus = "sata" if "q35" in str(os_section.get("MACHINE", "")) else "ide"
    prefix = "sd" if bus == "sata" else "hd"
    target = next(prefix + letter for letter in "abcdefghijklmnopqrstuvwxyz"
                  if prefix + letter not in taken)
    element = _sub(devices, "disk", type="file", device="cdrom")
    if emulated:
        _sub(element, "driver", name="qemu", type="raw")
    _sub(element, "source", file=os.path.join(vm_dir, CONTEXT_ISO))
    _sub(element, "target", dev=target, bus=bus)
    _sub(element, "readonly")


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

    def __init__(self, uri, datastore, shutdown_timeout=30, domain_type=None, parking=None):
        start_event_loop()      # before any connection, or it would never deliver events
        self.uri = uri
        self.datastore = datastore
        self.parking = parking or default_parking(datastore)
        self.shutdown_timeout = shutdown_timeout
        self.domain_type = domain_type or domain_type_for(uri)
        self._connection = None
        self._opened = 0
        self._lock = threading.Lock()
        self._cpu_samples = {}      # deploy id, ("monitor", deploy id) or None (host) -> sample
        self._devices = {}          # deploy id -> (uuid, disk targets, MACs)
        self._watcher = None        # callback(deploy_id, state, reason)
        self._event_callbacks = {}  # connection -> its lifecycle callback id

    # ------------------------------------------------------------ connection

    @property
    def conn(self):
        # libvirt connections are thread safe; only opening one needs the lock
        with self._lock:
            if self._connection is None:
                self._connection = libvirt.open(self.uri)
                self._opened += 1
                self._prepare(self._connection)
            return self._connection

    @property
    def reconnects(self):
        return max(0, self._opened - 1)

    def _prepare(self, conn):
        """Hear about a new connection's death and its domains' events (with _lock held)."""
        try:
            conn.registerCloseCallback(self._on_closed, None)
        except libvirt.libvirtError:
            pass        # the in-process test driver has no close callbacks: it never closes
        if self._watcher is not None and conn not in self._event_callbacks:
            self._event_callbacks[conn] = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _on_closed(self, conn, reason, _opaque):
        """In the event thread: libvirtd went away. The next call opens a new
        connection (the monitor loop makes one within its interval)."""
        log.warning("libvirt connection to %s closed (reason %s)", self.uri, reason)
        with self._lock:
            if self._connection is conn:
                self._connection = None
            self._event_callbacks.pop(conn, None)

    def watch(self, callback):
        with self._lock:
            self._watcher = callback
            if self._connection is not None:
                self._prepare(self._connection)

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        """In the event thread: pass the news on at once."""
        news = event_state(event, detail)
        watcher = self._watcher
        if news is None or watcher is None:
            return
        try:
            watcher(dom.name(), *news)
        except Exception:
            log.exception("handling a %s event of %s failed", news[1], dom.name())

    def _alive(self):
        try:
            return self._connection is not None and self._connection.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def _drop_connection(self):
        with self._lock:
            old, self._connection = self._connection, None
            callback_id = self._event_callbacks.pop(old, None)
        if old is not None:
            try:
                if callback_id is not None:
                    old.domainEventDeregisterAny(callback_id)
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

    def parked_dir(self, vm):
        return os.path.join(self.parking, str(int(vm["id"])))

    def _running_domain(self, deploy_id, action):
        dom = self._lookup(deploy_id)
        if dom is None:
            raise LookupError(f"cannot {action} {deploy_id}: no such domain on {self.uri}")
        if not dom.isActive():
            raise RuntimeError(f"cannot {action} {deploy_id}: it is not running")
        return dom

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

    @reconnecting
    def save(self, vm):
        name = domain_name(vm["id"])
        vm_dir = self.vm_dir(vm)
        checkpoint = os.path.join(vm_dir, CHECKPOINT)
        partial = checkpoint + ".part"
        dom = self._lookup(name)
        if dom is not None and dom.isActive():
            os.makedirs(vm_dir, exist_ok=True)
            dom.save(partial)       # stops the domain once its memory is all on disk
            os.replace(partial, checkpoint)
        elif os.path.exists(partial):
            # a save that finished (it stopped the domain) before we could rename
            os.replace(partial, checkpoint)
        if not os.path.exists(checkpoint):
            where = "not running" if dom is not None else f"not on {self.uri}"
            raise RuntimeError(f"cannot save {name}: it is {where} and there is no checkpoint "
                               f"at {checkpoint}")
        if dom is not None:
            self._undefine(dom)
        return {"checkpoint": checkpoint, "vm_dir": vm_dir}

    @reconnecting
    def restore(self, vm):
        name = domain_name(vm["id"])
        dom = self._lookup(name)
        if dom is not None and dom.isActive():
            self._resume_if_paused(dom)
            return name
        candidates = list(dict.fromkeys(
            path for path in (runtime_of(vm).get("checkpoint"),
                              os.path.join(self.vm_dir(vm), CHECKPOINT)) if path))
        checkpoint = next((path for path in candidates if os.path.isfile(path)), None)
        if checkpoint is None:
            where = "not running" if dom is not None else f"not on {self.uri}"
            raise FileNotFoundError(f"cannot restore {name}: it is {where} and there is no "
                                    f"checkpoint at {' nor '.join(candidates)}")
        self.conn.restore(checkpoint)
        dom = self.conn.lookupByName(name)
        self._resume_if_paused(dom)
        if not dom.isPersistent():
            # restored domains are transient: define it, so a power off leaves it defined
            self.conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE
                                            | libvirt.VIR_DOMAIN_XML_SECURE))
        os.remove(checkpoint)
        return name

    @reconnecting
    def reboot(self, deploy_id):
        self._running_domain(deploy_id, "reboot").reboot(0)

    @reconnecting
    def reset(self, deploy_id):
        self._running_domain(deploy_id, "reset").reset(0)

    @reconnecting
    def migrate(self, vm, dest_host, dest_uri):
        # which of the three happens when: see the module's docstring
        name = domain_name(vm["id"])
        if self.uri.startswith("test:"):
            return self.save(vm)
        if dest_uri == self.uri:
            self._running_domain(name, f"migrate to {dest_host}")
            return {}
        dom = self._lookup(name)
        if dom is not None and dom.isActive():
            dom.migrateToURI3(dest_uri, {}, MIGRATE_FLAGS)
        elif not running_at(dest_uri, name):     # not already moved by an earlier try
            raise RuntimeError(f"cannot migrate {name} to {dest_host}: it is not running on "
                               f"{self.uri} nor on {dest_uri}")
        return {}

    def _resume_if_paused(self, dom):
        if STATES.get(dom.info()[0]) == backend.PAUSED:
            dom.resume()

    # ------------------------------------------------------------ transfer actions

    def clone(self, vm):
        """Make each disk (storage.make_disk) and the context CD in the VM's
        directory. Specs are checked first, so a bad one makes nothing."""
        disks = disk_specs(vm)
        token = context_token(vm)
        if vm.get("context") is not None:
            context_script(vm["context"])       # a bad key: refused before any file
        vm_dir = self.vm_dir(vm)
        os.makedirs(vm_dir, exist_ok=True)
        info = {"vm_dir": vm_dir, "disks": [make_disk(vm_dir, disk) for disk in disks]}
        if vm.get("context") is not None:
            info["context"] = build_context_iso(vm_dir, vm["context"], token)
        return info

    @reconnecting
    def mv(self, vm, direction, from_dir=None):
        if direction not in MV_DIRECTIONS:
            raise ValueError(f"mv: direction must be one of {', '.join(MV_DIRECTIONS)}, "
                             f"got {direction!r}")
        if direction == "out":
            self._undefine_stopped(vm)
            source, target = self.vm_dir(vm), self.parked_dir(vm)
        else:
            source, target = from_dir or self.parked_dir(vm), self.vm_dir(vm)
        move_dir(source, target)
        info = {"vm_dir": target}
        if os.path.isfile(os.path.join(target, CHECKPOINT)):
            info["checkpoint"] = os.path.join(target, CHECKPOINT)
        return info

    def _undefine_stopped(self, vm):
        name = domain_name(vm["id"])
        dom = self._lookup(name)
        if dom is None:
            return
        if dom.isActive():
            raise RuntimeError(f"cannot move VM {vm['id']}'s files out: {name} is still running")
        self._undefine(dom)

    @reconnecting
    def delete(self, vm):
        """Remove the domain, save the disks marked SAVE_AS, then remove the VM's
        directory; an ln image is outside it and stays. Returns {"saved": [paths]}."""
        try:
            disks = disk_specs(vm)
        except ValueError as exc:
            # clone refused these specs, so it made no disk to save: clean up all the same
            log.warning("delete of VM %s saves nothing: %s", vm["id"], exc)
            disks = []
        dom = self._lookup(domain_name(vm["id"]))
        if dom is not None:
            self._destroy(dom)
            self._undefine(dom)
        vm_dirs = (self.vm_dir(vm), self.parked_dir(vm))
        saved = [disk["save_as"] for disk in disks
                 if disk["save_as"] and save_disk(vm_dirs, disk)]
        for vm_dir in vm_dirs:
            if os.path.isdir(vm_dir):
                shutil.rmtree(vm_dir)
        return {"saved": saved}

    # ------------------------------------------------------------ monitoring

    @reconnecting
    def monitor(self):
        conn = self.conn
        _model, memory_mb, cores, mhz = conn.getInfo()[:4]
        domains = self._cirrus_domains(conn)
        report = backend.host_totals(cores, mhz, memory_mb * 1024,
                                     self._used_memory_kb(conn, memory_mb * 1024, domains),
                                     self._used_cpu(conn, cores))
        report.update(datastore_space(self.datastore))
        report.update(host_net_counters())
        report["HYPERVISOR"] = self.domain_type
        report["URI"] = self.uri
        report["VMS"] = [self._vm_report(dom, state, memory_kb, cpu_ns)
                         for dom, state, memory_kb, cpu_ns in domains]
        return report

    def _cirrus_domains(self, conn):
        """(domain, state, memory KB, CPU time ns) of each domain Cirrus made."""
        out = []
        for dom in conn.listAllDomains():
            if vm_id_of(dom.name()) is None:
                continue
            try:
                state, _max_kb, memory_kb, _vcpus, cpu_ns = dom.info()
            except libvirt.libvirtError as exc:
                if is_missing(exc):     # undefined while we listed
                    continue
                raise
            out.append((dom, STATES.get(state, backend.UNKNOWN), memory_kb, cpu_ns))
        return out

    def _vm_report(self, dom, state, memory_kb, cpu_ns):
        """A VM's state and usage; counters libvirt cannot give (the test driver's
        or user-mode networking's) count as zero."""
        name = dom.name()
        if state in (backend.POWEROFF, backend.CRASHED):
            self._cpu_samples.pop(("monitor", name), None)
            return vm_report(name, state)
        cpu = self._cpu_percent(("monitor", name), cpu_ns, time.monotonic_ns())
        disks, macs = self._devices_of(dom)
        net = [stats_or_zeros(dom.interfaceStats, mac, 8) for mac in macs]
        block = [stats_or_zeros(dom.blockStats, target, 5) for target in disks]
        return vm_report(name, state, cpu, memory_kb,
                         net_rx=sum(s[0] for s in net), net_tx=sum(s[4] for s in net),
                         disk_read=sum(s[1] for s in block), disk_write=sum(s[3] for s in block))

    def _devices_of(self, dom):
        """A domain's disk targets and NIC MACs, read from its XML once per definition."""
        uuid = dom.UUIDString()
        cached = self._devices.get(dom.name())
        if cached is None or cached[0] != uuid:
            try:
                root = ET.fromstring(dom.XMLDesc(0))
            except libvirt.libvirtError:
                return [], []
            disks = [t.get("dev") for t in root.findall("devices/disk/target") if t.get("dev")]
            macs = [m.get("address") for m in root.findall("devices/interface/mac")
                    if m.get("address")]
            cached = self._devices[dom.name()] = (uuid, disks, macs)
        return cached[1], cached[2]

    def _used_memory_kb(self, conn, total_kb, domains):
        """The host's used memory: the node's memory stats (page cache and buffers
        count as free), else its free memory, else what the domains use."""
        try:
            stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
            return stats["total"] - stats["free"] - stats.get("buffers", 0) - stats.get("cached", 0)
        except libvirt.libvirtError:
            pass
        # the test driver has neither: its getFreeMemory says KiB where others say bytes
        if self.domain_type != "test":
            try:
                return total_kb - conn.getFreeMemory() // 1024
            except libvirt.libvirtError:
                pass
        return sum(memory_kb for _dom, state, memory_kb, _cpu in domains
                   if state not in (backend.POWEROFF, backend.CRASHED))

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
        self._cpu_samples.pop(("monitor", dom.name()), None)
        self._devices.pop(dom.name(), None)
        try:
            dom.undefineFlags(UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            if not is_missing(exc):
                raise

    def _disk_formats(self, vm, vm_dir):
        """Template disks' formats, read from their files (specs declare theirs)."""
        formats = {}
        for disk in disk_specs(vm):
            path = disk_file(vm_dir, disk)
            if declared_format(disk) is None and os.path.exists(path):
                formats[disk["id"]] = image_format(path)
        return formats


# NICs that carry guests' traffic, already counted as theirs, not the host's own
GUEST_NICS = ("lo", "vnet", "tap", "macvtap", "virbr", "veth")


def parse_net_dev(text):
    """Bytes received and sent by the host's own NICs since boot, from the text
    of /proc/net/dev: {"NETRX", "NETTX"}."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, counters = line.partition(":")
        fields = counters.split()
        if not sep or len(fields) < 9 or name.strip().startswith(GUEST_NICS):
            continue
        rx += int(fields[0])
        tx += int(fields[8])
    return {"NETRX": rx, "NETTX": tx}


def host_net_counters(path="/proc/net/dev"):
    try:
        with open(path) as f:
            return parse_net_dev(f.read())
    except OSError:
        return {"NETRX": 0, "NETTX": 0}


def datastore_space(datastore):
    """The system datastore's space: statvfs of its directory (of the nearest
    existing parent until the first VM makes it), in MB, as an unprivileged
    user sees the free space."""
    path = os.path.abspath(datastore)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    fs = os.statvfs(path)
    total_mb = fs.f_blocks * fs.f_frsize // 2**20
    return backend.datastore_totals(total_mb, total_mb - fs.f_bavail * fs.f_frsize // 2**20)


def default_parking(datastore):
    """Where mv out parks VM directories: "parked" beside the datastore."""
    return os.path.join(os.path.dirname(os.path.abspath(datastore)), "parked")


def stats_or_zeros(read, device, size):
    try:
        return read(device)
    except libvirt.libvirtError:
        return (0,) * size


def running_at(uri, deploy_id):
    """Whether ``deploy_id`` runs on the hypervisor at ``uri`` (False if unreachable)."""
    try:
        other = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        return other.lookupByName(deploy_id).isActive() == 1
    except libvirt.libvirtError:
        return False
    finally:
        other.close()


def move_dir(source, target):
    """Move a VM's directory. Idempotent: the source gone and the target there is
    a move already done, and the same directory is nothing to do. Across file
    systems it copies to a temporary name first, so a half-made copy is never
    taken for a done one."""
    if os.path.abspath(source) == os.path.abspath(target):
        return
    if not os.path.exists(source):
        if os.path.isdir(target):
            return
        raise FileNotFoundError(f"cannot move {source} to {target}: neither exists")
    if os.path.exists(target):
        raise FileExistsError(f"cannot move {source} to {target}: both exist, and {target} "
                              f"is not overwritten")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target + ".part"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, symlinks=True)
        os.rename(partial, target)
        shutil.rmtree(source)
