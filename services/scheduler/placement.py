"""Placement: which host each VM goes to. Pure: no I/O, no clock.

OpenNebula's matchmaker (REFERENCE.md section 2, docs/scheduler.md):

- **Capacity** counts what VMs have *allocated*: a host fits when
  MAX_CPU - CPU_USAGE >= 100*CPU and MAX_MEM - MEM_USAGE >= MEMORY, where MAX_*
  is the host's total minus RESERVED_CPU/RESERVED_MEM (negative: overcommit).
- **Requirements**: the VM's SCHED_REQUIREMENTS, and a CLUSTER_ID in its
  template restricts it to those clusters (the automatic requirement).
- **Rank**: the VM's SCHED_RANK if it has one, else the policy's: packing
  (RUNNING_VMS), striping (-RUNNING_VMS), load-aware (FREE_CPU), custom
  (``scheduler.rank``, 0 if unset) or fixed (the host's PRIORITY). Highest
  first; ties go to the lowest host id, so placement is deterministic.
- **VM groups**: per role, HOST_AFFINED/HOST_ANTI_AFFINED hosts and a POLICY
  among its own VMs; ANTI_AFFINED roles never share a host; AFFINED roles (and
  the VMs of an AFFINED role) form one *affined set* that goes to one host
  together, and waits until one host fits all of it.
- **Limits**: MAX_HOST VMs per host and MAX_DISPATCH VMs per pass (0: none).

Speed, for 10,000 VMs and 2,500 hosts: each host's attribute dict is built
once per pass and updated in place when a VM is reserved on it. VMs that ask
the same thing (same requirements, rank and size) share a *class*, which keeps
a heap of its hosts by rank: choosing is a pop, and a reservation re-pushes
only the host it changed. Capacity is checked before any expression, and an
expression's result is cached for the whole pass unless it reads an attribute
that reservations change (CPU_USAGE, MEM_USAGE, RUNNING_VMS).
"""
import heapq
import json
from collections import defaultdict
from dataclasses import dataclass, field

from cirrus.expressions import FALLS, ExpressionError, compile_rank, compile_requirements

# attributes that change as VMs are placed within a pass
DYNAMIC = frozenset({"CPU_USAGE", "MEM_USAGE", "RUNNING_VMS"})

POLICIES = {
    "packing": lambda a: a["RUNNING_VMS"],
    "striping": lambda a: -a["RUNNING_VMS"],
    "load-aware": lambda a: a["FREE_CPU"],
    "fixed": lambda a: number(a.get("PRIORITY")),
}
# policies whose rank of a host may rise when a VM is reserved on it (a rank
# expression may too: see ``rises_with_use``)
RISING_POLICIES = {"packing"}
POLICY_NUMBERS = {"0": "packing", "1": "striping", "2": "load-aware", "3": "custom",
                  "4": "fixed"}


def number(value, default=0.0):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def policy_name(value):
    """A policy from its name or OpenNebula's number; ValueError names the choices."""
    name = POLICY_NUMBERS.get(str(value).strip(), str(value).strip().lower())
    if name not in POLICIES and name != "custom":
        raise ValueError(f"scheduler.policy: unknown policy {value!r}; choose from packing, "
                         "striping, load-aware, custom, fixed (or 0-4)")
    return name


@dataclass
class HostView:
    """A host as the scheduler sees it during one pass. ``attributes`` is
    everything SCHED_REQUIREMENTS and SCHED_RANK may read (see ``host_view``)."""
    id: int
    name: str
    max_cpu: int            # effective: total - RESERVED_CPU
    max_mem: int
    cpu_usage: int
    mem_usage: int
    running_vms: int
    attributes: dict = field(default_factory=dict)
    version: int = 0        # bumped at each reservation in this pass
    dispatched: int = 0     # VMs sent here in this pass (MAX_HOST)

    def __post_init__(self):
        self.attributes.update(NAME=self.name, ID=self.id, MAX_CPU=self.max_cpu,
                               MAX_MEM=self.max_mem)
        for key, value in (("CLUSTER_ID", -1), ("HYPERVISOR", ""), ("USED_CPU", 0),
                           ("FREE_CPU", self.max_cpu), ("USED_MEM", 0),
                           ("FREE_MEM", self.max_mem)):
            self.attributes.setdefault(key, value)
        self._sync()

    @property
    def room_cpu(self):
        return self.max_cpu - self.cpu_usage

    @property
    def room_mem(self):
        return self.max_mem - self.mem_usage

    def fits(self, cpu, memory):
        return self.max_cpu - self.cpu_usage >= cpu and self.max_mem - self.mem_usage >= memory

    def reserve(self, cpu, memory):
        self.cpu_usage += cpu
        self.mem_usage += memory
        self.running_vms += 1
        self.dispatched += 1
        self.version += 1
        self._sync()

    def release(self, cpu, memory):
        """Give back a reservation lifecycle did not make after all."""
        self.cpu_usage -= cpu
        self.mem_usage -= memory
        self.running_vms -= 1
        self.dispatched -= 1
        self.version += 1
        self._sync()

    def renewed(self, cpu_usage, mem_usage, running_vms):
        """This host for a new pass, with the usage given (``attributes`` copied)."""
        return HostView(self.id, self.name, self.max_cpu, self.max_mem, cpu_usage, mem_usage,
                        running_vms, dict(self.attributes))

    def _sync(self):
        self.attributes.update(CPU_USAGE=self.cpu_usage, MEM_USAGE=self.mem_usage,
                               RUNNING_VMS=self.running_vms)


def host_view(row, cluster_template=None):
    """A HostView from a host's columns (a mapping or an object with id, name,
    cluster_id, max_cpu, max_mem, reserved_cpu, reserved_mem, cpu_usage,
    mem_usage, running_vms, template, monitoring). Attributes, later ones
    winning: the monitoring report, the cluster's template, the host's template,
    then the computed ones. Memory is in MB throughout (OpenNebula uses KB)."""
    get = row.get if isinstance(row, dict) else lambda k, d=None: getattr(row, k, d)
    mon = get("monitoring") or {}
    attributes = {k: v for k, v in mon.items() if not isinstance(v, (dict, list))}
    attributes.update(cluster_template or {})
    attributes.update(get("template") or {})
    max_cpu = (get("max_cpu") or 0) - (get("reserved_cpu") or 0)
    used_cpu = int(number(mon.get("USEDCPU")))
    used_mem = int(number(mon.get("USEDMEMORY"))) // 1024
    total_mem = get("max_mem") or 0
    free_mem = (int(number(mon["FREEMEMORY"])) // 1024 if "FREEMEMORY" in mon
                else total_mem - used_mem)
    cluster_id = get("cluster_id")
    attributes.update(
        CLUSTER_ID=-1 if cluster_id is None else cluster_id,
        HYPERVISOR=mon.get("HYPERVISOR", ""),
        USED_CPU=used_cpu, FREE_CPU=int(number(mon.get("FREECPU"), max_cpu - used_cpu)),
        USED_MEM=used_mem, FREE_MEM=free_mem)
    return HostView(get("id"), get("name"), max_cpu, total_mem - (get("reserved_mem") or 0),
                    get("cpu_usage") or 0, get("mem_usage") or 0, get("running_vms") or 0,
                    attributes)


@dataclass
class VmRequest:
    id: int
    cpu: int                # percent of a core
    memory: int             # MB
    template: dict = field(default_factory=dict)
    group: int = None       # VM group id
    role: str = None
    current_host: int = None    # a RUNNING VM to move: it must leave this host
    request_id: str = None      # of the last action on the VM: its log lines name it

    @property
    def priority(self):
        return number(self.template.get("USER_PRIORITY"))


@dataclass
class Group:
    """A VM group for one pass: its roles and rules, and where its VMs are."""
    id: int
    name: str
    roles: dict             # name -> {"policy", "host_affined", "host_anti_affined"}
    rules: list
    placed: dict = field(default_factory=lambda: defaultdict(set))    # role -> host ids

    @classmethod
    def from_dict(cls, data, placed=()):
        """``placed``: (role, host id) of the group's VMs that are on a host."""
        group = cls(data["id"], data["name"], {r["name"]: r for r in data["roles"]},
                    data.get("rules") or [])
        for role, host_id in placed:
            group.placed[role].add(host_id)
        return group

    def affined_roles(self, role):
        """The roles whose VMs must share a host with ``role``'s (itself included)."""
        linked, todo = {role}, [role]
        while todo:
            current = todo.pop()
            for rule in self.rules:
                if rule["policy"] == "AFFINED" and current in rule["roles"]:
                    for other in rule["roles"]:
                        if other not in linked:
                            linked.add(other)
                            todo.append(other)
        return linked

    def is_affined(self, role):
        return len(self.affined_roles(role)) > 1 or self.roles[role]["policy"] == "AFFINED"

    def anti_roles(self, role):
        out = {role} if self.roles[role]["policy"] == "ANTI_AFFINED" else set()
        for rule in self.rules:
            if rule["policy"] == "ANTI_AFFINED" and role in rule["roles"]:
                out.update(r for r in rule["roles"] if r != role)
        return out

    def allows(self, role, host_id):
        spec = self.roles[role]
        if spec["host_affined"] and host_id not in spec["host_affined"]:
            return False
        if host_id in spec["host_anti_affined"]:
            return False
        if any(host_id in self.placed[r] for r in self.anti_roles(role)):
            return False
        if self.is_affined(role):
            there = set().union(*(self.placed[r] for r in self.affined_roles(role)))
            if there and host_id not in there:
                return False
        return True


class Unplaceable(Exception):
    """A VM that no host can take in this pass; the message is the reason."""


class Planner:
    """One scheduling pass over a fixed set of hosts. ``choose(vm)`` gives the
    best host (or raises Unplaceable), ``reserve(vm, host)`` records a
    placement, ``forget(host)`` drops a host lifecycle refused."""

    def __init__(self, hosts, policy="packing", default_rank="", groups=None, max_host=0):
        self.hosts = {h.id: h for h in hosts}
        self.order = sorted(self.hosts)
        self.policy = policy_name(policy)
        self.default_rank = default_rank or ""
        self.groups = groups or {}
        self.max_host = max_host or 0
        self.changes = []           # ids of the hosts changed by reservations, in order
        self.classes = {}
        self.requirement_cache = {}
        self.static_matches = {}    # (requirement, clusters) -> {host id: matches}
        self.ranked_matches = {}    # (requirement, clusters, rank) -> see ``ranked``
        self.compiled = {}

    # ------------------------------------------------------------ expressions

    def compile(self, kind, text, template):
        """A compiled expression, or None for none; cached by text (and the
        template, when the text has $VARIABLEs)."""
        if not text or not str(text).strip():
            return None
        key = (kind, text, json.dumps(template, sort_keys=True) if "$" in text else None)
        if key not in self.compiled:
            build = compile_requirements if kind == "requirements" else compile_rank
            self.compiled[key] = build(text, template)
        return self.compiled[key]

    def expressions(self, vm):
        """(requirement, rank, rank function, whether the rank may rise as VMs
        are reserved, cluster ids) for a VM; Unplaceable if they do not compile."""
        template = vm.template
        try:
            requirement = self.compile("requirements", template.get("SCHED_REQUIREMENTS"),
                                       template)
            rank_text = template.get("SCHED_RANK") or (
                self.default_rank if self.policy == "custom" else "")
            rank = self.compile("rank", rank_text, template)
        except ExpressionError as exc:
            raise Unplaceable(str(exc)) from None
        if rank is not None:
            rank_fn, rank_rises = rank.evaluate, rises_with_use(rank)
        elif self.policy == "custom":
            rank_fn, rank_rises = (lambda a: 0.0), False
        else:
            rank_fn, rank_rises = POLICIES[self.policy], self.policy in RISING_POLICIES
        return requirement, rank, rank_fn, rank_rises, cluster_ids(template)

    def matches(self, requirement, clusters, host):
        if clusters is not None and host.attributes["CLUSTER_ID"] not in clusters:
            return False
        if requirement is None:
            return True
        version = host.version if requirement.attributes & DYNAMIC else -1
        key = (id(requirement), host.id)
        cached = self.requirement_cache.get(key)
        if cached is None or cached[0] != version:
            cached = (version, bool(requirement.evaluate(host.attributes)))
            self.requirement_cache[key] = cached
        return cached[1]

    def open(self, host):
        return self.max_host <= 0 or host.dispatched < self.max_host

    def ranked(self, requirement, clusters, rank_fn, matched):
        """([(heap entry, host)] of the hosts that match a static requirement,
        best first; how many changes the pass had then): made once for the
        classes that differ only in VM size (``matched`` is the
        requirement's shared match table)."""
        key = (requirement, clusters, rank_fn)
        found = self.ranked_matches.get(key)
        if found is None:
            hosts = []
            for host_id in self.order:
                host = self.hosts[host_id]
                match = matched.get(host_id)
                if match is None:
                    match = matched[host_id] = self.matches(requirement, clusters, host)
                if match:
                    hosts.append(host)
            entries = sorted(zip([(-rank_fn(host.attributes), host.id, host.version)
                                  for host in hosts], hosts), key=lambda pair: pair[0])
            found = self.ranked_matches[key] = (entries, len(self.changes))
        return found

    # ------------------------------------------------------------ choosing

    def choose(self, vm):
        """The best host for ``vm``; Unplaceable with the reason if none."""
        if not self.hosts:
            raise Unplaceable("No host is enabled and monitored")
        if vm.group in self.groups or vm.current_host is not None:
            return self.choose_by_scan(vm, [vm])     # rules of its own: look at every host
        return self.vm_class(vm).choose()

    def vm_class(self, vm):
        requirement, rank, rank_fn, rank_rises, clusters = self.expressions(vm)
        key = (id(requirement) if requirement else None, id(rank) if rank else None,
               vm.cpu, vm.memory, clusters)
        found = self.classes.get(key)
        if found is None:
            found = self.classes[key] = VmClass(self, vm.cpu, vm.memory, requirement, rank_fn,
                                                rank_rises, clusters)
        return found

    def choose_by_scan(self, vm, members):
        """The best host for a VM with group rules, or for an affined set
        (``members``, all to one host): every host is looked at."""
        requirements = [self.expressions(m) for m in members]
        cpu, memory = sum(m.cpu for m in members), sum(m.memory for m in members)
        rank_fn = requirements[0][2]
        best, best_key, matching = None, None, []
        for host_id in self.order:
            host = self.hosts[host_id]
            if host.id == vm.current_host:
                continue
            if not all(self.matches(req, clusters, host)
                       for req, _, _, _, clusters in requirements):
                continue
            if not all(self.group_allows(m, host.id) for m in members):
                continue
            matching.append(host)
            if not host.fits(cpu, memory) or not self.open(host):
                continue
            key = (-rank_fn(host.attributes), host.id)
            if best_key is None or key < best_key:
                best, best_key = host, key
        if best is not None:
            if vm.current_host is not None:
                self.check_better(vm, -best_key[0], requirements[0])
            return best
        if not matching:
            raise Unplaceable(self.no_match_reason(vm))
        raise Unplaceable(self.capacity_reason(cpu, memory, matching, members))

    def check_better(self, vm, best_rank, expressions):
        """A VM asked to move (resched) leaves a host that still takes VMs and
        still meets its requirements only for a host of higher rank than that
        one, counted without the VM itself."""
        current = self.hosts.get(vm.current_host)
        requirement, _, rank_fn, _, clusters = expressions
        if current is None or not self.matches(requirement, clusters, current):
            return      # disabled (flush), failed, or no longer what the VM requires
        without = dict(current.attributes, CPU_USAGE=current.cpu_usage - vm.cpu,
                       MEM_USAGE=current.mem_usage - vm.memory,
                       RUNNING_VMS=current.running_vms - 1)
        if best_rank <= rank_fn(without):
            raise Unplaceable(f"No host ranks higher than its current host {current.name}")

    def no_match_reason(self, vm):
        if vm.current_host is not None and set(self.hosts) <= {vm.current_host}:
            return "No other host is enabled and monitored"
        if vm.group is not None and vm.group in self.groups:
            return (f"No host matches the requirements and the rules of VM group "
                    f"{self.groups[vm.group].name} (role {vm.role})")
        return "No host matches the requirements"

    def capacity_reason(self, cpu, memory, hosts, members=()):
        """Why none of ``hosts`` (which match the requirements) takes the VM."""
        what = ""
        if len(members) > 1:
            group = self.groups[members[0].group]
            what = f" for the affined set of {len(members)} VMs of VM group {group.name}"
        if not any(h.room_cpu >= cpu for h in hosts):
            return f"Not enough CPU capacity{what}: {cpu}/{max(h.room_cpu for h in hosts)}"
        if not any(h.room_mem >= memory for h in hosts):
            return f"Not enough memory{what}: {memory}/{max(h.room_mem for h in hosts)} MB"
        if not any(h.fits(cpu, memory) for h in hosts):
            return f"No host has both {cpu}% CPU and {memory} MB free{what}"
        return f"Every host that fits got MAX_HOST VMs in this pass{what}"

    def group_allows(self, vm, host_id):
        if vm.group is None or vm.group not in self.groups:
            return True
        return self.groups[vm.group].allows(vm.role, host_id)

    # ------------------------------------------------------------ recording

    def reserve(self, vm, host):
        host.reserve(vm.cpu, vm.memory)
        self.changes.append(host.id)
        if vm.group is not None and vm.group in self.groups:
            self.groups[vm.group].placed[vm.role].add(host.id)

    def release(self, vm, host):
        """Lifecycle gave ``vm``'s share of ``host`` back (the VM waits for its
        devices): the host has that room again for the rest of the pass, and
        every class looks at it again. The VM group keeps counting the VM on
        the host for this pass, which only keeps its rules stricter."""
        host.release(vm.cpu, vm.memory)
        self.changes.append(host.id)
        for vm_class in self.classes.values():
            vm_class.failure = None
            vm_class.consider(host)

    def forget(self, host):
        """Lifecycle refused ``host`` (another scheduler filled it): skip it
        for the rest of the pass."""
        self.hosts.pop(host.id, None)
        self.order = [h for h in self.order if h != host.id]
        self.changes.append(host.id)

    # ------------------------------------------------------------ a whole pass

    def plan(self, vms, max_dispatch=0):
        """Choose hosts for ``vms`` in order (USER_PRIORITY, then FIFO),
        reserving in this view as it goes. Yields (members, host or None,
        reason): ``members`` is one VM, or an affined set of a VM group that
        goes to one host together. The caller may ``forget`` a host between
        steps; the members it could not place are its business."""
        dispatched = 0
        done = set()
        group_members = defaultdict(list)
        for vm in sorted(vms, key=lambda v: v.id):
            if vm.group in self.groups and vm.current_host is None:
                group_members[vm.group].append(vm)
        for vm in sorted(vms, key=lambda v: (-v.priority, v.id)):
            if vm.id in done:
                continue
            members = self.affined_set(vm, group_members)
            done.update(m.id for m in members)
            if max_dispatch and dispatched >= max_dispatch:
                return
            try:
                if len(members) > 1:
                    self.check_affined_set(members)
                    host = self.choose_by_scan(vm, members)
                else:
                    host = self.choose(vm)
            except Unplaceable as exc:
                yield members, None, str(exc)
                continue
            for member in members:
                self.reserve(member, host)
            dispatched += len(members)
            yield members, host, None

    def check_affined_set(self, members):
        """An affined set shares one host: none of its roles may keep its VMs
        apart (lifecycle refuses such groups; this guards older rows)."""
        group = self.groups[members[0].group]
        for role in {m.role for m in members}:
            apart = group.anti_roles(role)
            if sum(m.role in apart for m in members) > (role in apart):
                raise Unplaceable(f"VM group {group.name}: role {role} must share one host with "
                                  f"its affined roles but keep apart from {', '.join(sorted(apart))}")

    def affined_set(self, vm, group_members):
        """``vm`` and the pending VMs that must go to its host with it."""
        group = self.groups.get(vm.group)
        if group is None or vm.current_host is not None or not group.is_affined(vm.role):
            return [vm]
        roles = group.affined_roles(vm.role)
        return [m for m in group_members[vm.group] if m.role in roles]


def rises_with_use(rank):
    """Whether a rank expression may rise for a host as VMs are reserved on
    it: reservations only add to CPU_USAGE, MEM_USAGE and RUNNING_VMS, so a
    rank that falls (or stays) as each of them grows, as ``-RUNNING_VMS`` or
    ``PRIORITY * 10 - RUNNING_VMS``, never rises. Such a class skips the
    eager refresh (VmClass)."""
    return any(rank.trends.get(name, FALLS) != FALLS for name in rank.attributes & DYNAMIC)


def cluster_ids(template):
    """The automatic requirement: a template's CLUSTER_ID ("1" or "1,2")."""
    value = template.get("CLUSTER_ID")
    if value in (None, ""):
        return None
    ids = []
    for part in str(value).split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            raise Unplaceable(f"CLUSTER_ID: must be cluster ids, got {value!r}") from None
    return frozenset(ids)


class VmClass:
    """The VMs of a pass that ask the same: requirement, rank, size and
    clusters. Its heap holds (-rank, host id, host version) for the hosts that
    fit and match. Capacity only shrinks within a pass, so a host that does
    not fit now never will; an entry whose host changed since is *stale*:
    - if the host's rank can only have stayed or fallen, and whether it
      matches cannot have changed, the stale entry is checked again when it
      reaches the top (and pushed back with its new rank if the host still fits);
    - otherwise (packing, a rank that may rise as reservations add to what
      it reads, or a requirement reading what they change) the class is
      *eager*: before choosing, it pushes afresh every host changed since it
      last looked, and drops stale entries."""

    def __init__(self, planner, cpu, memory, requirement, rank_fn, rank_rises, clusters):
        self.planner, self.cpu, self.memory = planner, cpu, memory
        self.requirement, self.rank_fn, self.clusters = requirement, rank_fn, clusters
        dynamic = bool(requirement and requirement.attributes & DYNAMIC)
        self.eager = rank_rises or dynamic
        # whether each host matches, for a requirement that reservations cannot
        # change, shared by the classes that ask it: an eager class asks again
        # for every host changed, thousands of times a pass
        self.matched = None if dynamic else planner.static_matches.setdefault(
            (id(requirement), clusters), {})
        self.failure = None
        if self.matched is None:
            self.heap = [entry for entry in map(self.entry, planner.hosts.values()) if entry]
            heapq.heapify(self.heap)
            self.seen = len(planner.changes)
        else:
            # the sorted entries of the hosts it fits: a heap already. Entries of
            # hosts changed since they were ranked are stale and handled as any
            # (an eager class pushes those hosts afresh: it has seen no change since)
            entries, self.seen = planner.ranked(requirement, clusters, rank_fn, self.matched)
            limited = planner.max_host > 0
            self.heap = [entry for entry, host in entries
                         if host.max_cpu - host.cpu_usage >= cpu
                         and host.max_mem - host.mem_usage >= memory
                         and (not limited or planner.open(host))]

    def entry(self, host):
        """The heap entry of ``host`` as it is now, or None if this class's VMs
        do not fit it or do not match it (the test of every pass: kept flat)."""
        if host.max_cpu - host.cpu_usage < self.cpu or host.max_mem - host.mem_usage < self.memory:
            return None
        planner, matched = self.planner, self.matched
        if planner.max_host > 0 and not planner.open(host):
            return None
        if matched is None:
            if not planner.matches(self.requirement, self.clusters, host):
                return None
        else:
            match = matched.get(host.id)
            if match is None:
                match = matched[host.id] = planner.matches(self.requirement, self.clusters, host)
            if not match:
                return None
        return -self.rank_fn(host.attributes), host.id, host.version

    def consider(self, host):
        entry = self.entry(host)
        if entry is not None:
            heapq.heappush(self.heap, entry)

    def refresh(self):
        changes = self.planner.changes
        if self.seen < len(changes):
            hosts = self.planner.hosts
            for host_id in set(changes[self.seen:]):
                if host_id in hosts:
                    self.consider(hosts[host_id])
            self.seen = len(changes)

    def choose(self):
        if self.failure:
            raise Unplaceable(self.failure)     # capacity only shrinks within a pass
        if self.eager:
            self.refresh()
        hosts, heap = self.planner.hosts, self.heap
        while heap:
            _, host_id, version = heap[0]
            host = hosts.get(host_id)
            if host is None:
                heapq.heappop(heap)
            elif host.version != version:
                # stale; an eager class has the host's fresh entry already
                entry = None if self.eager else self.entry(host)
                if entry is None:
                    heapq.heappop(heap)
                else:
                    heapq.heapreplace(heap, entry)
            elif not self.planner.open(host):
                heapq.heappop(heap)
            else:
                return host
        self.failure = self.reason()
        raise Unplaceable(self.failure)

    def reason(self):
        planner = self.planner
        matching = [h for h in planner.hosts.values()
                    if planner.matches(self.requirement, self.clusters, h)]
        if not matching:
            return "No host matches the requirements"
        return planner.capacity_reason(self.cpu, self.memory, matching)
