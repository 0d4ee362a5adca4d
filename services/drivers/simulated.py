"""A simulated hypervisor for scale tests, like OpenNebula's dummy driver.

Every action succeeds after an optional delay, and fails when the VM's
template scripts it: ``SIMULATE_FAIL = "deploy"`` (or a comma separated list
of actions, e.g. "clone, shutdown"). ``SIMULATE_DELAY`` (seconds) overrides
the backend's delay for one VM. The host reports a fixed capacity, and the
domains live in memory only.
"""
import threading
import time

from services.drivers import backend
from services.drivers.backend import Backend, domain_name, template_of, vm_id_of


class SimulatedFailure(RuntimeError):
    pass


class SimulatedBackend(Backend):

    def __init__(self, cores=16, memory_mb=32768, cpu_mhz=2000, delay=0.0):
        self.cores = cores
        self.memory_mb = memory_mb
        self.cpu_mhz = cpu_mhz
        self.delay = delay
        self._domains = {}          # deploy id -> {"state", "memory_kb", "template"}
        self._lock = threading.Lock()

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

    def deploy(self, vm):
        self._act("deploy", vm)
        name = domain_name(vm["id"])
        with self._lock:
            self._domains[name] = {"state": backend.RUNNING, "template": template_of(vm),
                                   "memory_kb": int(vm.get("memory") or 0) * 1024}
        return name

    def shutdown(self, deploy_id, timeout=None):
        self._act("shutdown", deploy_id=deploy_id)
        self._power_off(deploy_id)

    def cancel(self, deploy_id):
        self._act("cancel", deploy_id=deploy_id)
        self._power_off(deploy_id)

    def _power_off(self, deploy_id):
        with self._lock:
            if deploy_id in self._domains:
                self._domains[deploy_id]["state"] = backend.POWEROFF

    def poll(self, deploy_id):
        self._act("poll", deploy_id=deploy_id)
        with self._lock:
            domain = self._domains.get(deploy_id)
        if domain is None:
            return {"STATE": backend.GONE}
        running = domain["state"] == backend.RUNNING
        return {"STATE": domain["state"], "CPU": 0.0,
                "MEMORY": domain["memory_kb"] if running else 0}

    def clone(self, vm):
        self._act("clone", vm)
        return {"vm_dir": None, "disks": []}

    def delete(self, vm):
        self._act("delete", vm)
        with self._lock:
            self._domains.pop(domain_name(vm["id"]), None)

    def monitor(self):
        with self._lock:
            domains = dict(self._domains)
        running = [d for d in domains.values() if d["state"] == backend.RUNNING]
        # simulated guests take their memory and sit idle
        report = backend.host_totals(self.cores, self.cpu_mhz, self.memory_mb * 1024,
                                     sum(d["memory_kb"] for d in running), 0)
        report["HYPERVISOR"] = "simulated"
        report["VMS"] = [{"DEPLOY_ID": name, "VM_ID": vm_id_of(name), "STATE": d["state"]}
                         for name, d in sorted(domains.items())]
        return report
