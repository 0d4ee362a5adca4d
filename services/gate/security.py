"""Who may do what through OneGate, as plain functions: the per-VM token,
the reach of a guest (its own VM and its service's), restricted attributes
and actions, route groups switched off, and the per-VM rate limit.

A token is HMAC-SHA256 over "<vm id>:<start time>" with the platform secret
(services/lifecycle/devices.py makes it at deploy). The gate recomputes it
from the VM's current start and the current secret, so a token is useless
for another VM, stale once the VM is recreated (a new start), and dead once
the secret is rotated.
"""
import hmac
import threading
import time
from dataclasses import dataclass, field

from cirrus.template import is_digits
from services.gate.protocol import Forbidden, TooManyRequests, Unauthorized
from services.lifecycle.devices import vm_token

# never changed by a guest: they steer placement and the service's bookkeeping
ALWAYS_RESTRICTED = ("SCHED_REQUIREMENTS", "SERVICE_ID", "ROLE_NAME")
ROUTE_GROUPS = ("vm_read", "vm_write", "service_read", "vm_action", "service_scale")


@dataclass(frozen=True)
class Settings:
    """The ``gate:`` section, read once per process."""
    restricted_attributes: frozenset = frozenset(ALWAYS_RESTRICTED)
    restricted_actions: frozenset = frozenset({"reboot", "reboot-hard"})
    routes: dict = field(default_factory=lambda: {group: True for group in ROUTE_GROUPS})
    rate: float = 50.0
    burst: int = 100
    max_body: int = 65536
    configured_secret: str = None

    @classmethod
    def from_config(cls, gate):
        gate = gate or {}
        routes = {group: True for group in ROUTE_GROUPS}
        for group, enabled in (gate.get("routes") or {}).items():
            if group not in routes:
                raise ValueError(f"gate.routes.{group}: unknown route group; one of "
                                 f"{', '.join(ROUTE_GROUPS)}")
            routes[group] = bool(enabled)
        extra = gate.get("restricted_attributes") or []
        actions = gate.get("restricted_actions")
        return cls(
            restricted_attributes=frozenset(ALWAYS_RESTRICTED) | {str(a).upper() for a in extra},
            restricted_actions=frozenset(
                str(a).lower() for a in (["reboot", "reboot-hard"] if actions is None
                                         else actions)),
            routes=routes, rate=float(gate.get("rate", 50) or 0),
            burst=int(gate.get("burst", 100) or 1), max_body=int(gate.get("max_body", 65536)),
            configured_secret=str(gate["secret"]) if gate.get("secret") else None)


# ---------------------------------------------------------------- authentication

def claimed_vm_id(headers):
    """The VM id of X-ONEGATE-VMID; Unauthorized if missing or not a number."""
    raw = headers.get("X-ONEGATE-VMID")
    if raw is None:
        raise Unauthorized("X-ONEGATE-VMID: missing (the VMID of your context)")
    raw = raw.strip()
    if not is_digits(raw) or len(raw) > 12:
        raise Unauthorized(f"X-ONEGATE-VMID: {raw[:20]!r} is not a VM id")
    return int(raw)


def claimed_token(headers):
    token = headers.get("X-ONEGATE-TOKEN")
    if not token:
        raise Unauthorized("X-ONEGATE-TOKEN: missing (the content of token.txt of your context)")
    return token.strip()


def check_token(secret, vm_id, started_at, given):
    """Whether ``given`` is the token of VM ``vm_id`` started at
    ``started_at``; compared in constant time. Unauthorized otherwise, with
    one message for every reason, so a guess learns nothing."""
    if secret is None or started_at is None:
        raise Unauthorized("X-ONEGATE-TOKEN: not a valid token for this VM")
    expected = vm_token(secret, vm_id, started_at)
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise Unauthorized("X-ONEGATE-TOKEN: not a valid token for this VM")


# ---------------------------------------------------------------- authorization

def check_route(settings, group):
    if not settings.routes.get(group, False):
        raise Forbidden(f"this gate does not allow {group.replace('_', ' ')} "
                        f"(gate.routes.{group} is off)")


def check_reach(caller, target_id, target_service_id):
    """A guest reaches its own VM and the VMs of its own service."""
    if target_id == caller["id"]:
        return
    if caller["service_id"] is None or target_service_id != caller["service_id"]:
        raise Forbidden(f"VM {target_id} is not in your service: a VM sees only itself and "
                        "the VMs of its own service")


def check_attributes(settings, names):
    restricted = sorted(set(names) & settings.restricted_attributes)
    if restricted:
        raise Forbidden(f"restricted attribute(s) {', '.join(restricted)}: guests cannot "
                        "change them")


def check_action(settings, perform):
    if perform in settings.restricted_actions:
        raise Forbidden(f"action {perform} is restricted on this gate (gate.restricted_actions)")


# ---------------------------------------------------------------- rate limit

class RateLimiter:
    """A token bucket per VM: ``rate`` requests a second, ``burst`` at once.
    In memory, per gate process; buckets of quiet VMs are dropped as they
    fill up again, so memory follows the VMs that are busy."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.buckets = {}
        self.lock = threading.Lock()
        self.last_prune = clock()

    def take(self, vm_id):
        if self.rate <= 0:
            return
        now = self.clock()
        with self.lock:
            tokens, seen = self.buckets.get(vm_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - seen) * self.rate)
            if tokens < 1:
                wait = (1 - tokens) / self.rate
                self.buckets[vm_id] = (tokens, now)
                raise TooManyRequests(f"VM {vm_id}: more than {self.rate:g} requests a second "
                                      f"(burst {self.burst}); retry in {wait:.2f} s",
                                      headers={"Retry-After": str(max(1, round(wait)))})
            self.buckets[vm_id] = (tokens - 1, now)
            if now - self.last_prune > 60:
                self.prune(now)

    def prune(self, now):
        full = self.burst / self.rate
        self.buckets = {vm: (t, seen) for vm, (t, seen) in self.buckets.items()
                        if now - seen < full}
        self.last_prune = now
