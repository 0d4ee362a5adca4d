"""Stays and accounting, read from a VM's history.

A history row says: at ``at`` the VM entered ``to_status`` while on ``host_id``.
A *stay* is a run of consecutive rows in which the VM holds capacity on one
host (its status is in ``states.ON_HOST``): it starts with the row that put it
there and ends with the first row that takes it off that host (DONE, PENDING,
STOPPED... or the same VM arriving on another host after a migration).

Accounting charges a VM for the time of its stays, since that is when its CPU
and memory are reserved: CPU-hours = cpu * hours, memory-GB-hours =
memory / 1024 * hours, clipped to the window asked for.

Everything here is pure except ``report``, which reads the rows.
"""
from collections import defaultdict
from datetime import datetime, timezone

from sqlalchemy import or_, select

from cirrus.db import iso
from cirrus.db.models import User, VirtualMachine, VmHistory, utcnow
from cirrus.errors import InvalidArgument
from cirrus.states import ON_HOST

# the phases of a stay whose durations are kept; a status counts for the phase
# it is named after (PROLOG_MIGRATE is PROLOG, BOOT_SUSPENDED is BOOT) unless
# it is a failure
PHASES = ("PROLOG", "BOOT", "RUNNING", "EPILOG")


def phase(status):
    if status.endswith("_FAILURE"):
        return None
    for name in PHASES:
        if status == name or status.startswith(name + "_"):
            return name
    return None


def is_driver_result(action):
    return action.endswith("_success") or action.endswith("_failure")


def stays(rows, now):
    """The stays of one VM from its history rows (dicts with seq, action,
    to_status, host_id, at and optionally host), in order. ``reason`` is the
    last action in the stay that was not a driver result (terminate, migrate,
    monitor_unknown...): what made the VM leave; None while it is still there."""
    rows = sorted(rows, key=lambda r: r["seq"])
    out = []
    current = None
    for row, following in zip(rows, rows[1:] + [None]):
        on_host = row["host_id"] is not None and row["to_status"] in ON_HOST
        closed = None
        if current is not None and (not on_host or row["host_id"] != current["host_id"]):
            current["end"] = row["at"]
            current["ended_by"] = row["action"]
            closed, current = current, None
        if on_host and current is None:
            current = {"host_id": row["host_id"], "host": row.get("host"), "start": row["at"],
                       "end": None, "reason": None, "ended_by": None,
                       **{f"{p.lower()}_seconds": 0.0 for p in PHASES}}
            out.append(current)
        if current is not None:
            name = phase(row["to_status"])
            if name:
                until = following["at"] if following else now
                current[f"{name.lower()}_seconds"] += max(0.0, (until - row["at"]).total_seconds())
        # the action that ends a stay is its reason when it is not a driver result
        # (recover, terminate of a POWEROFF VM...)
        if not is_driver_result(row["action"]) and (closed or current) is not None:
            (closed or current)["reason"] = row["action"]
    for stay in out:
        if stay["end"] is None:
            stay["reason"] = None
    return out


def stay_to_dict(stay):
    return {**stay, "start": iso(stay["start"]), "end": iso(stay["end"])}


def overlap_seconds(start, end, window_start, window_end):
    """Seconds of [start, end) inside [window_start, window_end); None bounds are open."""
    if window_start is not None:
        start = max(start, window_start)
    if window_end is not None:
        end = min(end, window_end)
    return max(0.0, (end - start).total_seconds())


def vm_hours(vm_stays, start, end, now):
    """Hours a VM spent on hosts inside the window; a stay not ended counts until now."""
    seconds = sum(overlap_seconds(s["start"], s["end"] or now, start, end) for s in vm_stays)
    return seconds / 3600


def usage(vms, history, start, end, now):
    """Accounting over [start, end): ``vms`` are dicts with id, name, owner,
    owner_id, cpu and memory (MB); ``history`` maps a VM id to its rows. VMs that
    spent no time on a host in the window are left out."""
    per_vm = []
    per_user = defaultdict(lambda: {"vms": 0, "cpu_hours": 0.0, "memory_gb_hours": 0.0})
    for vm in vms:
        hours = vm_hours(stays(history.get(vm["id"], []), now), start, end, now)
        if hours <= 0:
            continue
        line = {"id": vm["id"], "name": vm["name"], "owner": vm["owner"],
                "owner_id": vm["owner_id"], "hours": hours, "cpu_hours": vm["cpu"] * hours,
                "memory_gb_hours": vm["memory"] / 1024 * hours}
        per_vm.append(line)
        user = per_user[(vm["owner_id"], vm["owner"])]
        user["vms"] += 1
        user["cpu_hours"] += line["cpu_hours"]
        user["memory_gb_hours"] += line["memory_gb_hours"]
    users = [{"owner": owner, "owner_id": owner_id, **totals}
             for (owner_id, owner), totals in sorted(per_user.items(), key=lambda kv: kv[0][0])]
    return {"vms": per_vm, "users": users, "start": iso(start), "end": iso(end)}


def parse_time(name, value):
    """An ISO-8601 string (or datetime, or None) as an aware datetime; naive means UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"{name}: not an ISO-8601 time: {value!r}") from None
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{name}: not an ISO-8601 time: {value!r}")
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def report(session, owner_id=None, start=None, end=None, now=None):
    """Accounting of every VM (or one owner's) over [start, end), read from the database."""
    start, end = parse_time("start", start), parse_time("end", end)
    if start is not None and end is not None and end <= start:
        raise InvalidArgument(f"end: must be after start ({iso(start)}), got {iso(end)}")
    now = now or utcnow()
    query = (select(VirtualMachine.id, VirtualMachine.name, User.name.label("owner"),
                    VirtualMachine.owner_id, VirtualMachine.cpu, VirtualMachine.memory)
             .join(User, User.id == VirtualMachine.owner_id).order_by(VirtualMachine.id))
    if owner_id is not None:
        query = query.where(VirtualMachine.owner_id == owner_id)
    if start is not None:
        # a VM that ended before the window has nothing in it
        query = query.where(or_(VirtualMachine.state != "DONE", VirtualMachine.updated_at >= start))
    if end is not None:
        query = query.where(VirtualMachine.created_at < end)
    vms = [row._asdict() for row in session.execute(query)]
    selected = query.with_only_columns(VirtualMachine.id).order_by(None).subquery()
    rows = select(VmHistory.vm_id, VmHistory.seq, VmHistory.action, VmHistory.to_status,
                  VmHistory.host_id, VmHistory.at).where(VmHistory.vm_id.in_(select(selected)))
    if end is not None:
        # later rows only close stays that the window clips anyway
        rows = rows.where(VmHistory.at < end)
    history = defaultdict(list)
    for row in session.execute(rows):
        history[row.vm_id].append(row._asdict())
    return usage(vms, history, start, end, now)
