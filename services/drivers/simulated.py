"""A simulated hypervisor for scale tests, like OpenNebula's dummy driver.

Every action succeeds after an optional delay, and fails when the VM's
template scripts it: ``SIMULATE_FAIL = "deploy"`` (or a comma separated list
of actions, e.g. "clone, shutdown"). ``SIMULATE_DELAY`` (seconds) overrides
the backend's delay for one VM. The host reports a fixed capacity.

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
import os
import threading
import time

from services.drivers import backend
from services.drivers.backend import (MV_DIRECTIONS, Backend, disk_specs, domain_name,
                                      runtime_of, template_of, vm_id_of, vm_report)
from services.drivers.context import CONTEXT_ISO, context_script, context_token

URI = "simulated:///"


class SimulatedFailure(RuntimeError):
    pass


class SimulatedBackend(Backend):

    uri = URI

    def __init__(self, cores=16, memory_mb=32768, cpu_mhz=2000, delay=0.0, state_file=None):
        self.cores = cores
        self.memory_mb = memory_mb
        self.cpu_mhz = cpu_mhz
        self.delay = delay
        self.state_file = state_file
        self._domains = {}          # deploy id -> {"state", "memory_kb", "template"}
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
            self._domains[name] = {"state": backend.RUNNING, "template": template_of(vm),
                                   "memory_kb": int(vm.get("memory") or 0) * 1024}
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
                saved = self._checkpoints.pop(name, None) or {
                    "template": template_of(vm), "memory_kb": int(vm.get("memory") or 0) * 1024}
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
        with self._lock:
            domains = dict(self._domains)
        running = [d for d in domains.values() if d["state"] == backend.RUNNING]
        # simulated guests take their memory and sit idle
        report = backend.host_totals(self.cores, self.cpu_mhz, self.memory_mb * 1024,
                                     sum(d["memory_kb"] for d in running), 0)
        report["HYPERVISOR"] = "simulated"
        report["URI"] = self.uri
        report["VMS"] = [vm_report(name, d["state"],
                                   memory_kb=d["memory_kb"] if d["state"] == backend.RUNNING
                                   else 0)
                         for name, d in sorted(domains.items()) if vm_id_of(name) is not None]
        return report

    def watch(self, callback):
        self._watcher = callback

    def change(self, deploy_id, state, reason):
        """The simulated hypervisor changes a domain on its own (a guest powers off,
        an operator destroys it): as libvirt would, it tells the watcher."""
        with self._lock:
            if state == backend.GONE:
                self._domains.pop(deploy_id, None)
            elif deploy_id in self._domains:
                self._domains[deploy_id]["state"] = state
            self._changed()
        if self._watcher is not None:
            self._watcher(deploy_id, state, reason)
