"""A simulated hypervisor for scale tests, like OpenNebula's dummy driver.

Every action succeeds after an optional delay, and fails when

- the VM's template scripts it: ``SIMULATE_FAIL = "deploy"`` (or a comma
  separated list of actions, e.g. "clone, shutdown"); ``SIMULATE_DELAY``
  (seconds) overrides the backend's delay for one VM;
- or the host was told at runtime to fail its next N commands of an action
  (``FailureScript``, filled by ``cirrus-node simulate-fail``, see worker.py).

The host reports a fixed capacity and plausible usage: each running VM keeps
its memory and uses a share of its CPU that drifts slowly with time
(``guest_load``), its disks take datastore space, and network and disk
counters only grow.

Transfer actions make no files: clone checks the disks and the context as a
real node does and reports where they would be (``simulated:///cirrus-<id>/
disk.<id>``, an ln disk at its image), and delete reports every save_as as
saved.

The domains live in memory, and also in ``state_file`` when one is given
(``cirrus-node --sim-state PATH``), so that they outlive a worker restart as a
real hypervisor's would. Saved VMs are kept as checkpoints; a checkpoint named
in the VM's runtime counts as present even if another simulated node made it,
as if the nodes shared a datastore, so a VM saved or migrated on one node is
restored on another.
"""
import json
import math
import os
import threading
import time

from cirrus import messages
from services.drivers import backend
from services.drivers.backend import (MV_DIRECTIONS, Backend, disk_specs, domain_name,
                                      runtime_of, template_of, vm_id_of, vm_report)
from services.drivers.context import CONTEXT_ISO, context_script, context_token

URI = "simulated:///"
HYPERVISOR_MEMORY_KB = 512 * 1024   # what the simulated host itself uses
DEFAULT_DISK_MB = 2048              # a disk whose size the spec does not say
LOAD_PERIOD = 600                   # seconds of one cycle of a guest's CPU load
NET_BYTES_PER_CPU_S = 64 * 1024     # traffic of a guest per second of CPU it uses
DISK_BYTES_PER_CPU_S = 16 * 1024


# a running guest's counters, and how many bytes each grows by per second of CPU it uses
GROWING = {"NETRX": NET_BYTES_PER_CPU_S, "NETTX": NET_BYTES_PER_CPU_S // 2,
           "DISKRDBYTES": DISK_BYTES_PER_CPU_S, "DISKWRBYTES": DISK_BYTES_PER_CPU_S // 4}


class SimulatedFailure(RuntimeError):
    pass


class FailureScript:
    """Failures a simulated host was told to make: the next ``count`` commands
    of an action fail, with a message. Thread safe; a command takes one."""

    def __init__(self):
        self._left = {}         # action -> [count, message]
        self._lock = threading.Lock()

    def add(self, action, count, message=None):
        """Script (or with count 0 clear) failures of ``action``; returns what is
        now scripted for it, in words. Bad values raise ValueError naming them."""
        if action not in messages.DRIVER_ACTIONS:
            raise ValueError(f"action: must be one of {', '.join(messages.DRIVER_ACTIONS)}, "
                             f"got {action!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count: must be a whole number of 0 or more, got {count!r}")
        if message is not None and (not isinstance(message, str) or not message.strip()):
            raise ValueError(f"message: must be a non-empty string or left out, got {message!r}")
        with self._lock:
            if count == 0:
                self._left.pop(action, None)
                return f"no {action} fails"
            self._left[action] = [count, message]
        what = f"the next {action} fails" if count == 1 else f"the next {count} {action}s fail"
        return what + (f": {message}" if message else "")

    def take(self, action):
        """If the next ``action`` must fail: the error to raise, else None."""
        with self._lock:
            scripted = self._left.get(action)
            if scripted is None:
                return None
            scripted[0] -= 1
            if scripted[0] == 0:
                del self._left[action]
        return scripted[1] or f"simulated {action} failure (scripted, {scripted[0]} more to fail)"

    def pending(self):
        with self._lock:
            return {action: count for action, (count, _message) in self._left.items()}


# the states a domain can be changed to behind the platform's back (change)
CHANGES = (backend.RUNNING, backend.PAUSED, backend.POWEROFF, backend.GONE)


def libvirt_reason(before, after):
    """The "EVENT/DETAIL" libvirt's lifecycle callback gives (libvirt_backend.
    event_state) when a domain goes from ``before`` to ``after`` on its own:
    an operator's virsh destroy, suspend, resume, start or undefine."""
    if after == backend.RUNNING:
        return "RESUMED/UNPAUSED" if before == backend.PAUSED else "STARTED/BOOTED"
    return {backend.PAUSED: "SUSPENDED/PAUSED", backend.POWEROFF: "STOPPED/DESTROYED",
            backend.GONE: "UNDEFINED/REMOVED"}[after]


def guest_load(vm_id, now):
    """The share of its CPU a simulated guest uses at ``now`` (0.05 .. 0.95): a
    slow wave, each VM at its own phase, so hosts' usage differs and moves."""
    return 0.5 + 0.45 * math.sin(2 * math.pi * now / LOAD_PERIOD + vm_id * 2.399)


def new_domain(vm):
    """A simulated domain, running, as deploy makes it."""
    return {"state": backend.RUNNING, "template": template_of(vm),
            "memory_kb": int(vm.get("memory") or 0) * 1024,
            "cpu": float(vm.get("cpu") or 1), "disk_mb": disk_mb(vm),
            "usage": dict.fromkeys(GROWING, 0)}


def disk_mb(vm):
    """Datastore space the VM's disks take (a size the spec does not give counts
    DEFAULT_DISK_MB; a persistent ln image lives in the image datastore)."""
    try:
        disks = disk_specs(vm)
    except ValueError:
        return 0
    return sum(disk.get("size_mb") or DEFAULT_DISK_MB for disk in disks
               if disk.get("clone") != "ln")


class SimulatedBackend(Backend):

    uri = URI

    def __init__(self, cores=16, memory_mb=32768, cpu_mhz=2000, delay=0.0, state_file=None,
                 datastore_mb=1048576, clock=time.time):
        self.cores = cores
        self.memory_mb = memory_mb
        self.cpu_mhz = cpu_mhz
        self.delay = delay
        self.state_file = state_file
        self.datastore_mb = datastore_mb
        self.clock = clock
        self.failures = FailureScript()
        self._counters = {"NETRX": 0, "NETTX": 0}   # the host's, grown at each report
        self._counted_at = None
        self._domains = {}          # deploy id -> {"state", "memory_kb", "cpu", "disk_mb",
        #                                           "template", "usage": {counter: value}}
        self._checkpoints = {}      # deploy id -> the domain as it was saved
        self._parked = set()        # ids of VMs whose files mv moved out
        self._watcher = None
        self._lock = threading.Lock()
        if state_file and os.path.exists(state_file):
            self._load()

    # ------------------------------------------------------------ state file

    def _load(self):
        try:
            with open(self.state_file) as f:
                state = json.load(f)
            self._domains = dict(state["domains"])
            self._checkpoints = dict(state["checkpoints"])
            self._parked = set(state["parked"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"simulated state file {self.state_file}: cannot read it ({exc})") \
                from None

    def _changed(self):
        """Write the state file (with _lock held): a temporary file renamed over
        the old one, so a crash leaves one or the other, never half of one."""
        if not self.state_file:
            return
        partial = f"{self.state_file}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            json.dump({"domains": self._domains, "checkpoints": self._checkpoints,
                       "parked": sorted(self._parked)}, f)
        os.replace(partial, self.state_file)

    # ------------------------------------------------------------ helpers

    def _act(self, action, vm=None, deploy_id=None):
        """Wait the scripted delay, then fail if the template asks for it. Actions
        that only get a deploy id use the template the domain was deployed with."""
        if vm is not None:
            template = template_of(vm)
        else:
            with self._lock:
                template = self._domains.get(deploy_id, {}).get("template", {})
        time.sleep(float(template.get("SIMULATE_DELAY", self.delay)))
        scripted = str(template.get("SIMULATE_FAIL", ""))
        if action in {word.strip().lower() for word in scripted.split(",")}:
            raise SimulatedFailure(f"simulated {action} failure (SIMULATE_FAIL = {scripted!r})")
        error = self.failures.take(action)
        if error:
            raise SimulatedFailure(error)

    def _set_state(self, deploy_id, state):
        with self._lock:
            if deploy_id in self._domains:
                self._domains[deploy_id]["state"] = state
                self._changed()

    def _running(self, deploy_id, action):
        with self._lock:
            domain = self._domains.get(deploy_id)
        if domain is None:
            raise LookupError(f"cannot {action} {deploy_id}: no such domain on {self.uri}")
        if domain["state"] != backend.RUNNING:
            raise RuntimeError(f"cannot {action} {deploy_id}: it is not running")

    # ------------------------------------------------------------ VM actions

    def deploy(self, vm):
        self._act("deploy", vm)
        name = domain_name(vm["id"])
        with self._lock:
            if self._domains.get(name, {}).get("state") != backend.RUNNING:
                self._domains[name] = new_domain(vm)
            self._changed()
        return name

    def shutdown(self, deploy_id, timeout=None):
        self._act("shutdown", deploy_id=deploy_id)
        self._set_state(deploy_id, backend.POWEROFF)

    def cancel(self, deploy_id):
        self._act("cancel", deploy_id=deploy_id)
        self._set_state(deploy_id, backend.POWEROFF)

    def poll(self, deploy_id):
        self._act("poll", deploy_id=deploy_id)
        with self._lock:
            domain = self._domains.get(deploy_id)
        if domain is None:
            return {"STATE": backend.GONE}
        running = domain["state"] == backend.RUNNING
        return {"STATE": domain["state"], "CPU": 0.0,
                "MEMORY": domain["memory_kb"] if running else 0}

    def save(self, vm):
        self._act("save", vm)
        return self._checkpoint(vm)

    def _checkpoint(self, vm):
        name = domain_name(vm["id"])
        with self._lock:
            domain = self._domains.get(name)
            if domain is not None and domain["state"] in (backend.RUNNING, backend.PAUSED):
                self._checkpoints[name] = domain
            elif name not in self._checkpoints:
                where = "not running" if domain is not None else f"not on {self.uri}"
                raise RuntimeError(f"cannot save {name}: it is {where} and there is no "
                                   f"checkpoint of it")
            self._domains.pop(name, None)
            self._changed()
        return {"checkpoint": f"{self.uri}{name}/checkpoint", "vm_dir": None}

    def restore(self, vm):
        self._act("restore", vm)
        name = domain_name(vm["id"])
        with self._lock:
            domain = self._domains.get(name)
            if domain is not None and domain["state"] in (backend.RUNNING, backend.PAUSED):
                domain["state"] = backend.RUNNING
            elif name in self._checkpoints or runtime_of(vm).get("checkpoint"):
                saved = self._checkpoints.pop(name, None) or new_domain(vm)
                self._domains[name] = {**saved, "state": backend.RUNNING}
            else:
                where = "not running" if domain is not None else f"not on {self.uri}"
                raise FileNotFoundError(f"cannot restore {name}: it is {where} and there is "
                                        f"no checkpoint of it")
            self._changed()
        return name

    def reboot(self, deploy_id):
        self._act("reboot", deploy_id=deploy_id)
        self._running(deploy_id, "reboot")

    def reset(self, deploy_id):
        self._act("reset", deploy_id=deploy_id)
        self._running(deploy_id, "reset")

    def migrate(self, vm, dest_host, dest_uri):
        # simulated nodes are separate processes: the VM travels as a checkpoint
        self._act("migrate", vm)
        return self._checkpoint(vm)

    # ------------------------------------------------------------ transfer actions

    def clone(self, vm):
        # the same checks as a real node, so a bad spec fails here too; no files
        disks = disk_specs(vm)
        context_token(vm)
        if vm.get("context") is not None:
            context_script(vm["context"])
        self._act("clone", vm)
        base = f"{self.uri}{domain_name(vm['id'])}"
        info = {"vm_dir": None,
                "disks": [disk["source"] if disk.get("clone") == "ln"
                          else f"{base}/disk.{disk['id']}" for disk in disks]}
        if vm.get("context") is not None:
            info["context"] = f"{base}/{CONTEXT_ISO}"
        return info

    def mv(self, vm, direction, from_dir=None):
        self._act("mv", vm)
        if direction not in MV_DIRECTIONS:
            raise ValueError(f"mv: direction must be one of {', '.join(MV_DIRECTIONS)}, "
                             f"got {direction!r}")
        name = domain_name(vm["id"])
        with self._lock:
            if direction == "out":
                domain = self._domains.get(name)
                if domain is not None and domain["state"] != backend.POWEROFF:
                    raise RuntimeError(f"cannot move VM {vm['id']}'s files out: {name} is "
                                       f"still running")
                self._domains.pop(name, None)
                self._parked.add(vm["id"])
            else:
                self._parked.discard(vm["id"])
            self._changed()
        return {"vm_dir": None}

    def delete(self, vm):
        try:
            disks = disk_specs(vm)
        except ValueError:
            disks = []      # as a real node: clone refused them, there is nothing to save
        self._act("delete", vm)
        name = domain_name(vm["id"])
        with self._lock:
            self._domains.pop(name, None)
            self._checkpoints.pop(name, None)
            self._parked.discard(vm["id"])
            self._changed()
        # simulated disks are saved as a real node would save them, without files
        return {"saved": [disk["save_as"] for disk in disks if disk["save_as"]]}

    # ------------------------------------------------------------ monitoring

    def monitor(self):
        now = self.clock()
        with self._lock:
            elapsed = 0.0 if self._counted_at is None else max(0.0, now - self._counted_at)
            self._counted_at = now
            vms, used_cpu, used_kb, used_mb, traffic = [], 0.0, HYPERVISOR_MEMORY_KB, 0, 0
            for name, domain in sorted(self._domains.items()):
                used_mb += domain.get("disk_mb", 0)     # disks stay while it is off
                vm_id = vm_id_of(name)
                if vm_id is None:
                    continue
                if domain["state"] != backend.RUNNING:
                    vms.append(vm_report(name, domain["state"]))
                    continue
                cpu = domain.get("cpu", 1) * 100 * guest_load(vm_id, now)
                usage = domain.setdefault("usage", dict.fromkeys(GROWING, 0))
                for key, per_cpu_s in GROWING.items():
                    usage[key] += int(cpu / 100 * per_cpu_s * elapsed)
                traffic += cpu / 100 * NET_BYTES_PER_CPU_S * elapsed
                used_cpu += cpu
                used_kb += domain["memory_kb"]
                vms.append(vm_report(name, backend.RUNNING, round(cpu, 1), domain["memory_kb"],
                                     net_rx=usage["NETRX"], net_tx=usage["NETTX"],
                                     disk_read=usage["DISKRDBYTES"],
                                     disk_write=usage["DISKWRBYTES"]))
            # the host's own chatter (monitoring, ssh) beside its guests' traffic
            self._counters["NETRX"] += int(traffic + 2048 * elapsed)
            self._counters["NETTX"] += int(traffic + 1024 * elapsed)
            counters = dict(self._counters)
        report = backend.host_totals(self.cores, self.cpu_mhz, self.memory_mb * 1024,
                                     used_kb, used_cpu)
        report.update(backend.datastore_totals(self.datastore_mb, used_mb), **counters,
                      HYPERVISOR="simulated", URI=self.uri, VMS=vms)
        return report

    def watch(self, callback):
        self._watcher = callback

    def change(self, deploy_id, state, reason=None):
        """The simulated hypervisor changes a domain on its own (a guest powers off,
        an operator destroys it): as libvirt would, it tells the watcher, with
        libvirt's own reason unless ``reason`` is given. Returns what changed, in
        words. A state it cannot go to, or a domain it does not have, raises
        ValueError naming it and changes nothing."""
        if state not in CHANGES:
            raise ValueError(f"state: must be one of {', '.join(CHANGES)}, got {state!r}")
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise ValueError(f"reason: must be a non-empty string or left out, got {reason!r}")
        with self._lock:
            domain = self._domains.get(deploy_id)
            if domain is None:
                raise ValueError(f"no domain {deploy_id} on this host: VM "
                                 f"{vm_id_of(deploy_id)} is not here")
            before = domain["state"]
            if before == state:
                raise ValueError(f"{deploy_id} is already {state}: libvirt would report "
                                 f"no change")
            if state == backend.PAUSED and before != backend.RUNNING:
                raise ValueError(f"{deploy_id} is {before}: only a running domain can be "
                                 f"paused")
            if state == backend.GONE:
                del self._domains[deploy_id]
            else:
                domain["state"] = state
            self._changed()
        reason = reason or libvirt_reason(before, state)
        if self._watcher is not None:
            self._watcher(deploy_id, state, reason)
        return f"{deploy_id} {before} -> {state} ({reason})"
