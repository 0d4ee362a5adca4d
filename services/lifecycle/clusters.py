"""What the scheduler places by, besides VMs: clusters, host templates and VM groups.

- A **cluster** is a named set of hosts with a template; its keys are
  attributes of each of its hosts in SCHED_REQUIREMENTS and SCHED_RANK. A host
  is in at most one cluster.
- A **host template** holds KEY=VALUE set by ``cirrus host update``: more
  attributes, PRIORITY (the fixed policy's rank), RESERVED_CPU and RESERVED_MEM.
- **Reserved capacity**: a host offers MAX_CPU - RESERVED_CPU and MAX_MEM -
  RESERVED_MEM. The host's RESERVED_* wins over its cluster's; a negative value
  allows overcommit. The value in effect is kept in ``hosts.reserved_cpu`` and
  ``hosts.reserved_mem`` so that lifecycle's atomic reservation compares
  against the same capacity as the scheduler.
- A **VM group** has roles, each with a POLICY among its own VMs (NONE,
  AFFINED: all on one host, ANTI_AFFINED: all on different hosts) and host
  lists (HOST_AFFINED: only these hosts, HOST_ANTI_AFFINED: never these), and
  rules between roles (AFFINED: the roles' VMs share one host, ANTI_AFFINED:
  no host runs VMs of two of the roles). A VM joins one with its template's
  ``VMGROUP = [VMGROUP_NAME = ..., ROLE = ...]`` (or VMGROUP_ID).
"""
import re

from sqlalchemy import select, update

from cirrus.db import get_row
from cirrus.db.models import Cluster, Host, VirtualMachine, VmGroup
from cirrus.expressions import ExpressionError, compile_rank, compile_requirements
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

RESERVED = ("RESERVED_CPU", "RESERVED_MEM")

# attributes the scheduler computes for every host; a template cannot set them
HOST_ATTRIBUTES = ("NAME", "ID", "CLUSTER_ID", "CLUSTER", "HYPERVISOR", "MAX_CPU", "CPU_USAGE",
                   "FREE_CPU", "USED_CPU", "MAX_MEM", "MEM_USAGE", "FREE_MEM", "USED_MEM",
                   "RUNNING_VMS")

KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")

POLICIES = ("NONE", "AFFINED", "ANTI_AFFINED")
RULE_POLICIES = ("AFFINED", "ANTI_AFFINED")


def checked_name(what, name):
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise InvalidArgument(f"name: a {what} needs a non-empty name")
    if len(name) > 128:
        raise InvalidArgument(f"name: at most 128 characters, got {len(name)}")
    return name


# ---------------------------------------------------------------- templates

def reservation(template, key):
    """RESERVED_CPU or RESERVED_MEM of a template as an int, None if unset."""
    value = (template or {}).get(key)
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        unit = "percent of a core" if key == "RESERVED_CPU" else "MB"
        raise InvalidArgument(f"{key}: must be a whole number of {unit} (negative allows "
                              f"overcommit), got {value!r}") from None


def merged_template(current, changes, replace=False, what="template"):
    """``changes`` (KEY: VALUE, an empty VALUE removes KEY) applied over
    ``current``, or replacing it; keys are upper-cased and checked."""
    if changes is None:
        changes = {}
    if not isinstance(changes, dict):
        raise InvalidArgument(f"{what}: must be a mapping of KEY to VALUE, got {changes!r}")
    out = {} if replace else dict(current or {})
    for key, value in changes.items():
        upper = str(key).strip().upper()
        if not KEY.match(upper):
            raise InvalidArgument(f"{what}: {key!r} is not a valid key (letters, digits and _, "
                                  "not starting with a digit)")
        if upper in HOST_ATTRIBUTES:
            raise InvalidArgument(f"{what}: {upper} is computed by the scheduler and cannot be "
                                  "set")
        if isinstance(value, (dict, list)):
            raise InvalidArgument(f"{what}: {upper} must be a single value, got {value!r}")
        if value is None or str(value) == "":
            out.pop(upper, None)
        else:
            out[upper] = str(value)
    for key in RESERVED:
        reservation(out, key)
    return out


def hosts_changed(session, hosts):
    """Set each host's reservation in effect (its own RESERVED_*, else its
    cluster's, else 0), and tell the scheduler about the monitored ones: their
    capacity or attributes changed, so a waiting VM may fit now."""
    from services.lifecycle.monitoring import host_state_event
    clusters = {}
    for host in hosts:
        cluster = None
        if host.cluster_id is not None:
            if host.cluster_id not in clusters:
                clusters[host.cluster_id] = session.get(Cluster, host.cluster_id)
            cluster = clusters[host.cluster_id]
        values = []
        for key in RESERVED:
            own = reservation(host.template, key)
            values.append(own if own is not None
                          else (reservation(cluster.template, key) if cluster else None) or 0)
        host.reserved_cpu, host.reserved_mem = values
        if host.state == "MONITORED":
            host_state_event(session, host)


def update_host(session, host_id, template, replace=False):
    """Merge KEY=VALUE into a host's template (an empty value removes the key)."""
    from services.lifecycle.logic import get_host
    host = get_host(session, host_id, lock=True)
    host.template = merged_template(host.template, template, replace)
    hosts_changed(session, [host])
    return host


# ---------------------------------------------------------------- clusters

def cluster_to_dict(session, cluster):
    hosts = session.execute(select(Host.id, Host.name).where(Host.cluster_id == cluster.id)
                            .order_by(Host.id)).all()
    return {"id": cluster.id, "name": cluster.name, "template": cluster.template or {},
            "hosts": [{"id": i, "name": n} for i, n in hosts]}


def get_cluster(session, cluster_id, lock=False):
    return get_row(session, Cluster, cluster_id, "cluster", lock)


def list_clusters(session):
    return [cluster_to_dict(session, c)
            for c in session.scalars(select(Cluster).order_by(Cluster.id))]


def create_cluster(session, name, template=None):
    name = checked_name("cluster", name)
    if session.scalar(select(Cluster.id).where(Cluster.name == name)) is not None:
        raise AlreadyExists(f"cluster {name!r} already exists")
    cluster = Cluster(name=name, template=merged_template({}, template))
    session.add(cluster)
    session.flush()
    return cluster


def cluster_hosts(session, cluster_id):
    return list(session.scalars(select(Host).where(Host.cluster_id == cluster_id)
                                .with_for_update()))


def update_cluster(session, cluster_id, template, replace=False):
    cluster = get_cluster(session, cluster_id, lock=True)
    cluster.template = merged_template(cluster.template, template, replace)
    session.flush()
    hosts_changed(session, cluster_hosts(session, cluster_id))
    return cluster


def delete_cluster(session, cluster_id):
    cluster = get_cluster(session, cluster_id, lock=True)
    out = cluster_to_dict(session, cluster)
    if out["hosts"]:
        names = ", ".join(h["name"] for h in out["hosts"][:5])
        raise FailedPrecondition(f"cluster {cluster.name} still has hosts ({names}); "
                                 "remove them with delhost first")
    session.delete(cluster)
    return out


def add_host(session, cluster_id, host_id):
    """Put a host in a cluster, taking it out of the one it was in."""
    from services.lifecycle.logic import get_host
    cluster = get_cluster(session, cluster_id)
    host = get_host(session, host_id, lock=True)
    host.cluster_id = cluster.id
    hosts_changed(session, [host])
    return cluster


def del_host(session, cluster_id, host_id):
    from services.lifecycle.logic import get_host
    cluster = get_cluster(session, cluster_id)
    host = get_host(session, host_id, lock=True)
    if host.cluster_id != cluster.id:
        raise FailedPrecondition(f"host {host.name} is not in cluster {cluster.name}")
    host.cluster_id = None
    hosts_changed(session, [host])
    return cluster


# ---------------------------------------------------------------- VM groups

def host_ids(session, role_name, key, value):
    """A role's host list, given as ids (a list or "1,2"), checked to exist."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidArgument(f"role {role_name}: {key} must be a list of host ids, got {value!r}")
    ids = []
    for item in items:
        try:
            ids.append(int(str(item).strip()))
        except ValueError:
            raise InvalidArgument(f"role {role_name}: {key} must list host ids, got "
                                  f"{item!r}") from None
    known = set(session.scalars(select(Host.id).where(Host.id.in_(ids))))
    missing = [i for i in ids if i not in known]
    if missing:
        raise InvalidArgument(f"role {role_name}: {key} names host {missing[0]}, which "
                              "does not exist")
    return sorted(set(ids))


def checked_roles(session, roles):
    if not isinstance(roles, list) or not roles:
        raise InvalidArgument("roles: a VM group needs at least one role")
    out = []
    for role in roles:
        if not isinstance(role, dict):
            raise InvalidArgument(f"roles: each role is a mapping with a name, got {role!r}")
        role = {str(k).lower(): v for k, v in role.items()}
        unknown = set(role) - {"name", "policy", "host_affined", "host_anti_affined"}
        if unknown:
            raise InvalidArgument(f"roles: unknown role key {sorted(unknown)[0]!r}; a role has "
                                  "name, policy, host_affined, host_anti_affined")
        name = str(role.get("name") or "").strip()
        if not name or not re.match(r"^[\w.-]+$", name):
            raise InvalidArgument(f"roles: a role name is letters, digits, '_', '-' or '.', "
                                  f"got {role.get('name')!r}")
        if name in (r["name"] for r in out):
            raise InvalidArgument(f"roles: role {name} is given twice")
        policy = str(role.get("policy") or "NONE").strip().upper()
        if policy not in POLICIES:
            raise InvalidArgument(f"role {name}: policy must be one of {', '.join(POLICIES)}, "
                                  f"got {role.get('policy')!r}")
        affined = host_ids(session, name, "host_affined", role.get("host_affined"))
        anti = host_ids(session, name, "host_anti_affined", role.get("host_anti_affined"))
        both = set(affined) & set(anti)
        if both:
            raise InvalidArgument(f"role {name}: host {min(both)} is both in host_affined and "
                                  "host_anti_affined")
        out.append({"name": name, "policy": policy, "host_affined": affined,
                    "host_anti_affined": anti})
    return out


def checked_rules(rules, roles):
    """Rules between roles; an AFFINED rule (all on one host) may not name an
    ANTI_AFFINED role (its VMs on different hosts)."""
    role_names = [r["name"] for r in roles]
    apart = {r["name"] for r in roles if r["policy"] == "ANTI_AFFINED"}
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise InvalidArgument(f"rules: must be a list of {{policy, roles}}, got {rules!r}")
    out, pairs = [], {}
    for rule in rules:
        if not isinstance(rule, dict) or set(rule) - {"policy", "roles"}:
            raise InvalidArgument(f"rules: each rule is {{policy, roles}}, got {rule!r}")
        policy = str(rule.get("policy") or "").strip().upper()
        if policy not in RULE_POLICIES:
            raise InvalidArgument(f"rules: policy must be AFFINED or ANTI_AFFINED, got "
                                  f"{rule.get('policy')!r}")
        names = rule.get("roles")
        if isinstance(names, str):
            names = names.split(",")
        names = [str(n).strip() for n in names or []]
        for name in names:
            if name not in role_names:
                raise InvalidArgument(f"rules: {policy} names role {name!r}, which the group "
                                      f"does not have (roles: {', '.join(role_names)})")
        if len(set(names)) < 2 or len(set(names)) != len(names):
            raise InvalidArgument(f"rules: {policy} needs at least two different roles, got "
                                  f"{names}; use a role's policy for its own VMs")
        if policy == "AFFINED" and apart & set(names):
            name = min(apart & set(names))
            raise InvalidArgument(f"rules: role {name} is ANTI_AFFINED (its VMs on different "
                                  "hosts), so it cannot be in an AFFINED rule (all on one host)")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pair = frozenset((a, b))
                if pairs.setdefault(pair, policy) != policy:
                    a, b = sorted(pair)
                    raise InvalidArgument(f"rules: roles {a} and {b} cannot be both AFFINED "
                                          "and ANTI_AFFINED")
        out.append({"policy": policy, "roles": names})
    return out


def vmgroup_to_dict(session, group, owner_name=None):
    members = session.execute(
        select(VirtualMachine.vmgroup_role, VirtualMachine.id)
        .where(VirtualMachine.vmgroup_id == group.id, VirtualMachine.state != "DONE")
        .order_by(VirtualMachine.id)).all()
    roles = [{**role, "vms": [vm for r, vm in members if r == role["name"]]}
             for role in group.roles]
    return {"id": group.id, "name": group.name, "owner_id": group.owner_id,
            "roles": roles, "rules": group.rules}


def get_vmgroup(session, group_id, lock=False):
    return get_row(session, VmGroup, group_id, "VM group", lock)


def list_vmgroups(session, owner_id=None):
    query = select(VmGroup).order_by(VmGroup.id)
    if owner_id is not None:
        query = query.where(VmGroup.owner_id == owner_id)
    return [vmgroup_to_dict(session, g) for g in session.scalars(query)]


def create_vmgroup(session, owner_id, name, roles, rules=None):
    name = checked_name("VM group", name)
    roles = checked_roles(session, roles)
    rules = checked_rules(rules, roles)
    if session.scalar(select(VmGroup.id).where(VmGroup.owner_id == owner_id,
                                               VmGroup.name == name)) is not None:
        raise AlreadyExists(f"VM group {name!r} already exists")
    group = VmGroup(name=name, owner_id=owner_id, roles=roles, rules=rules)
    session.add(group)
    session.flush()
    return group


def delete_vmgroup(session, group_id):
    group = get_vmgroup(session, group_id, lock=True)
    out = vmgroup_to_dict(session, group)
    in_use = [vm for role in out["roles"] for vm in role["vms"]]
    if in_use:
        raise FailedPrecondition(f"VM group {group.name} still has VMs (e.g. VM {in_use[0]}); "
                                 "terminate them first")
    session.execute(update(VirtualMachine)
                    .where(VirtualMachine.vmgroup_id == group.id).values(vmgroup_id=None))
    session.delete(group)
    return out


def check_scheduling(template):
    """Refuse, when a VM is created, a SCHED_REQUIREMENTS or SCHED_RANK that
    does not compile (the error names the position and what was expected),
    and a CLUSTER_ID that is not a list of cluster ids."""
    template = template or {}
    try:
        compile_requirements(template.get("SCHED_REQUIREMENTS"), template)
        compile_rank(template.get("SCHED_RANK"), template)
    except ExpressionError as exc:
        # as InvalidArgument: every process knows that class by name
        raise InvalidArgument(str(exc)) from None
    value = template.get("CLUSTER_ID")
    if value not in (None, "") and not re.match(r"^\s*\d+(\s*,\s*\d+)*\s*$", str(value)):
        raise InvalidArgument(f"CLUSTER_ID: must be a cluster id or ids separated by commas, "
                              f"got {value!r}")


def join_vmgroup(session, vm, owner_id, template):
    """Set ``vm``'s group and role from its template's VMGROUP vector, if any."""
    spec = (template or {}).get("VMGROUP")
    if not spec:
        return
    if not isinstance(spec, dict):
        raise InvalidArgument("VMGROUP: must be one vector [VMGROUP_NAME = ..., ROLE = ...]")
    role = str(spec.get("ROLE") or "").strip()
    if spec.get("VMGROUP_ID") not in (None, ""):
        try:
            group = session.get(VmGroup, int(spec["VMGROUP_ID"]))
        except ValueError:
            raise InvalidArgument(f"VMGROUP: VMGROUP_ID must be a number, got "
                                  f"{spec['VMGROUP_ID']!r}") from None
        label = f"VM group {spec['VMGROUP_ID']}"
    elif spec.get("VMGROUP_NAME"):
        group = session.scalar(select(VmGroup).where(VmGroup.owner_id == owner_id,
                                                     VmGroup.name == spec["VMGROUP_NAME"]))
        label = f"VM group {spec['VMGROUP_NAME']!r}"
    else:
        raise InvalidArgument("VMGROUP: give VMGROUP_NAME (or VMGROUP_ID) and ROLE")
    if group is None or group.owner_id != owner_id:
        raise NotFound(f"VMGROUP: {label} does not exist")
    names = [r["name"] for r in group.roles]
    if role not in names:
        raise InvalidArgument(f"VMGROUP: {label} has no role {role!r}; its roles are "
                              f"{', '.join(names)}")
    vm.vmgroup_id, vm.vmgroup_role = group.id, role

