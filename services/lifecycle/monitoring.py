"""What the nodes tell lifecycle about hosts and VMs, and what lifecycle does about hosts.

- ``handle_vm_event``: a domain changed state on its own (libvirt lifecycle
  callback): the VM follows at once.
- ``handle_monitor``: a host's periodic report, also its heartbeat. It stores
  the host's capacity and each VM's metrics; a ``sync`` report also reconciles
  VM states with the domains the host really has.
- ``detect_failed_hosts``: a host silent for too long is fenced: ERROR, its
  RUNNING VMs UNKNOWN, and with ``ha == "reschedule"`` its VMs recreated.

A monitoring action (``monitor_poweroff``...) moves a VM only if the VM is on
the reporting host, has no driver command in flight, has not changed since the
node saw it, and its status allows the action; otherwise it is ignored, as a
report about the past.

Locks: these functions never wait for a VM row while they hold a host row
(VM rows are taken with SKIP LOCKED), since actions lock a VM and then its
host; a VM skipped now is caught by the next event, sync or sweep.
"""
import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, case, func, or_, select, text, update

from cirrus import config, db, messages, outbox, states
from cirrus.db.models import Host, VirtualMachine, utcnow
from cirrus.errors import FailedPrecondition, InvalidArgument
from services.lifecycle import logic

log = logging.getLogger(__name__)

# a domain's state, as nodes report it, and the monitoring action it stands for;
# a domain missing from a sync report is GONE
DOMAIN_ACTIONS = {
    "RUNNING": "monitor_running",
    "PAUSED": "monitor_suspend",
    "POWEROFF": "monitor_poweroff",
    "GONE": "monitor_poweroff",
    "CRASHED": "monitor_poweroff",
}

# what each VM's series keeps of a report
METRICS = ("CPU", "MEMORY", "NETRX", "NETTX", "DISKRDBYTES", "DISKWRBYTES")

HA_POLICIES = ("none", "reschedule")

# statuses (as VmState values) in which a VM holds capacity on its host
ON_HOST_STATES = sorted({states.split(s)[0].value for s in states.ON_HOST})


def lifecycle_setting(key, default):
    return config.get()["lifecycle"].get(key, default)


def report_time(message):
    """When the node saw what it reports ("at", ISO-8601; naive is UTC); now if it did not say."""
    value = message.get("at")
    if not value:
        return utcnow()
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        log.warning("ignoring a bad time %r from %s", value, message.get("host"))
        return utcnow()
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def as_vm_id(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None     # a domain Cirrus did not make


# ---------------------------------------------------------------- VM states

def apply_monitoring(session, vm, host_id, action, at, message):
    """Apply a monitoring ``action`` to a locked ``vm`` if the rules allow it
    (see the module's docstring); returns the VM, or None when ignored."""
    if vm is None or action is None:
        return None
    current = logic.vm_status(vm)
    why_not = (
        "it is not on the reporting host" if host_id is None or vm.host_id != host_id else
        "a driver command is in flight" if vm.command_id is not None else
        "the report is older than its last change" if vm.updated_at and at < vm.updated_at else
        f"{current} does not allow it" if not states.allows(current, action) else None)
    if why_not:
        log.debug("VM %s: %s ignored: %s", vm.id, action, why_not)
        return None
    return logic.apply(session, vm, action, message=message)


def handle_vm_event(session, event):
    """A domain changed state on its own: move its VM at once."""
    action = DOMAIN_ACTIONS.get(event.get("state"))
    vm_id = as_vm_id(event.get("vm_id"))
    if action is None or vm_id is None:
        log.debug("ignoring vm.event %s", event)
        return None
    host_id = session.scalar(select(Host.id).where(Host.name == event.get("host")))
    vm = session.get(VirtualMachine, vm_id, with_for_update=True)
    reason = f" ({event['reason']})" if event.get("reason") else ""
    return apply_monitoring(session, vm, host_id, action, report_time(event),
                            f"domain {event['state']}{reason} on {event.get('host')}")


def reconcile(session, host, domains, at):
    """A sync report lists every domain of the host: bring its VMs in line.
    Returns the VMs moved."""
    seen = {as_vm_id(d.get("VM_ID")): d.get("STATE") for d in domains}
    vms = session.scalars(
        select(VirtualMachine)
        .where(VirtualMachine.host_id == host.id, VirtualMachine.command_id.is_(None),
               VirtualMachine.state.in_(ON_HOST_STATES))
        .order_by(VirtualMachine.id).with_for_update(skip_locked=True)).all()
    moved = []
    for vm in vms:
        domain = seen.get(vm.id, "GONE")
        what = "missing from" if vm.id not in seen else f"{domain} in"
        done = apply_monitoring(session, vm, host.id, DOMAIN_ACTIONS.get(domain), at,
                                f"domain {what} {host.name}'s sync report")
        if done is not None:
            moved.append(done)
    return moved


# ---------------------------------------------------------------- reports

STORE_METRICS = text("""
WITH s AS (
    SELECT * FROM jsonb_to_recordset(CAST(:samples AS jsonb)) AS x(id int, latest jsonb, point jsonb)
), free AS (
    SELECT v.id FROM vms v JOIN s ON s.id = v.id
    WHERE v.host_id = :host_id FOR UPDATE OF v SKIP LOCKED
)
UPDATE vms SET monitoring = s.latest, monitored_at = :at,
    metrics = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)
               FROM jsonb_array_elements(vms.metrics || jsonb_build_array(s.point))
                    WITH ORDINALITY AS t(e, n)
               WHERE n > jsonb_array_length(vms.metrics) + 1 - :keep)
FROM s WHERE vms.id = s.id AND vms.id IN (SELECT id FROM free)
""")


def store_metrics(session, host_id, domains, at, keep):
    """Every VM's latest metrics and one more point of its series (the last
    ``keep`` points are kept), in one statement whatever the number of VMs.
    Only VMs on the reporting host are written; a VM locked by a state change
    right now gets its metrics at the next report."""
    samples = []
    for entry in domains:
        vm_id = as_vm_id(entry.get("VM_ID"))
        if vm_id is None:
            continue
        point = {"at": at.isoformat(), **{k: entry[k] for k in METRICS if k in entry}}
        samples.append({"id": vm_id, "latest": {k: v for k, v in entry.items() if k != "VM_ID"},
                        "point": point})
    if samples:
        session.execute(STORE_METRICS, {"samples": db.to_json(samples), "host_id": host_id,
                                        "at": at, "keep": max(1, int(keep))})


def handle_monitor(session, report, keep=None):
    """Store a node's monitoring report. Returns True when the host just became
    MONITORED, i.e. new capacity the scheduler should look at. An OFFLINE host
    is not monitored: its reports are dropped."""
    host = session.scalar(select(Host).where(Host.name == report.get("host"))
                          .with_for_update())
    if host is None or host.state == "OFFLINE":
        return False
    mon = report.get("monitoring") or {}
    at = report_time(report)
    host.max_cpu = int(mon.get("TOTALCPU", 0))
    host.max_mem = int(mon.get("TOTALMEMORY", 0)) // 1024
    # a new report replaces the whole document, ERROR included
    host.monitoring = mon
    host.last_monitored_at = utcnow()
    # DISABLED (the admin's choice) stays DISABLED when its host comes back
    came_back = host.state in ("INIT", "ERROR")
    if came_back:
        host.state = "MONITORED"
        host_state_event(session, host)
    domains = mon.get("VMS") or []
    if report.get("sync"):
        reconcile(session, host, domains, at)
    store_metrics(session, host.id, domains, at,
                  keep if keep is not None else lifecycle_setting("metrics_samples", 60))
    return came_back


def host_state_event(session, host):
    outbox.add_event(session, messages.LIFECYCLE, messages.HOST_STATE,
                     {"id": host.id, "name": host.name, "state": host.state})


# ---------------------------------------------------------------- host failure

def detect_failed_hosts(session, timeout):
    """Fence the hosts that sent no report for ``timeout`` seconds. One
    conditional UPDATE ... RETURNING marks them, so with several lifecycle
    instances each host is failed by one of them: state ERROR (a DISABLED host
    stays DISABLED) and an ERROR entry in its monitoring, which its next report
    replaces. Then the VMs of every failed host are fenced (``fence_vms``).
    Returns the names of the hosts failed now."""
    silent = (select(Host.id)
              .where(Host.last_monitored_at < utcnow() - timedelta(seconds=timeout),
                     or_(Host.state.in_(("INIT", "MONITORED")),
                         and_(Host.state == "DISABLED", ~Host.monitoring.has_key("ERROR"))))
              .order_by(Host.id).with_for_update(skip_locked=True))
    error = f"no monitoring report for more than {timeout} s"
    failed = session.execute(
        update(Host).where(Host.id.in_(silent))
        .values(state=case((Host.state == "DISABLED", "DISABLED"), else_="ERROR"),
                monitoring=Host.monitoring.op("||")(func.jsonb_build_object("ERROR", error)))
        .returning(Host.id, Host.name, Host.state)
        .execution_options(synchronize_session=False)).all()
    for row in failed:
        log.warning("host %s failed: %s", row.name, error)
        host_state_event(session, row)
    fence_vms(session)
    return [row.name for row in failed]


def failed_hosts():
    return or_(Host.state == "ERROR",
               and_(Host.state == "DISABLED", Host.monitoring.has_key("ERROR")))


def fence_vms(session):
    """VMs of failed hosts: RUNNING ones become UNKNOWN; on an ERROR host with
    ha "reschedule", every VM still on it is recreated (PENDING, elsewhere).
    Safe to repeat: what was done no longer matches. A DISABLED host keeps its
    VMs (UNKNOWN): recreating them would first have to clean up on the host."""
    on_failed = (select(VirtualMachine, Host)
                 .join(Host, Host.id == VirtualMachine.host_id)
                 .where(failed_hosts(), or_(
                     and_(VirtualMachine.state == "ACTIVE", VirtualMachine.lcm_state == "RUNNING"),
                     and_(Host.state == "ERROR", Host.ha == "reschedule",
                          VirtualMachine.state.in_(ON_HOST_STATES))))
                 .order_by(VirtualMachine.id)
                 .with_for_update(of=VirtualMachine, skip_locked=True))
    for vm, host in session.execute(on_failed).all():
        if states.allows(logic.vm_status(vm), "monitor_unknown"):
            logic.apply(session, vm, "monitor_unknown", message=f"host {host.name} is not reporting")
        if host.state == "ERROR" and host.ha == "reschedule":
            logic.recover(session, vm.id, "recreate")


# ---------------------------------------------------------------- hosts

def check_ha(policy):
    if policy not in HA_POLICIES:
        raise InvalidArgument(f"ha: must be one of {', '.join(HA_POLICIES)}, got {policy!r}")
    return policy


def create_host(session, name, ha="none"):
    check_ha(ha)
    host = logic.create_host(session, name)
    host.ha = ha
    return host


def set_host_ha(session, host_id, policy):
    check_ha(policy)
    host = logic.get_host(session, host_id, lock=True)
    host.ha = policy
    return host


def offline_host(session, host_id):
    """Take a host out of service: no new VMs, no monitoring. Refused while a
    VM holds capacity on it or is migrating to it."""
    host = logic.get_host(session, host_id, lock=True)
    on_it = session.scalar(
        select(VirtualMachine.id)
        .where(or_(VirtualMachine.host_id == host.id, VirtualMachine.target_host_id == host.id),
               VirtualMachine.state.in_(ON_HOST_STATES))
        .order_by(VirtualMachine.id).limit(1))
    if on_it is not None:
        raise FailedPrecondition(
            f"host {host.name} still has VMs (e.g. VM {on_it}); flush it or move them first")
    if host.state != "OFFLINE":
        host.state = "OFFLINE"
        host_state_event(session, host)
    return host


def flush_host(session, host_id):
    """Disable a host and ask the scheduler to move every VM running on it
    (resched). VMs are locked before the host, as actions do."""
    logic.get_host(session, host_id)
    running = session.scalars(
        select(VirtualMachine.id)
        .where(VirtualMachine.host_id == host_id, VirtualMachine.state == "ACTIVE",
               VirtualMachine.lcm_state == "RUNNING", VirtualMachine.resched.is_(False))
        .order_by(VirtualMachine.id).with_for_update()).all()
    for vm_id in running:
        logic.vm_action(session, vm_id, "resched")
    return logic.set_host_enabled(session, host_id, False)
