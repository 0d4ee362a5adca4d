"""The VM life cycle as plain functions over a database session.

Each function runs inside the caller's transaction. A state change is made
by ``step``, which consults the transition table, keeps hosts' capacity in
step (both hosts while a migration runs) and gives the history row, the
``vm.state`` event and any driver command; ``apply`` writes one VM's step,
``apply_many`` many VMs' (the scheduler's batches, driver results), with one
statement each. User actions come in through ``vm_action`` (and
``recover``); placements and migrations reserve capacity with conditional
UPDATEs (``reserve``, and ``reserve_shares`` for a batch's hosts).
"""
import logging

from sqlalchemy import bindparam, or_, select, text, tuple_, update
from sqlalchemy.orm import aliased

from cirrus import bulk, db, messages, outbox, tracing
from cirrus.db import get_row, iso
from cirrus.db.models import Host, Template, User, VirtualMachine, VmHistory, utcnow
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from cirrus.states import (FAILED_FROM, MIGRATING, ON_HOST, SHORT_NAMES, TRANSIENT,
                           TransitionError, allows, next_transition, result_action, split,
                           status)
from services.lifecycle import accounting, clusters, devices

log = logging.getLogger("cirrus.lifecycle")


def vm_status(vm):
    return status(vm.state, vm.lcm_state)


def cpu_percent(cpu):
    """Host capacity is counted in percent of a core, as in OpenNebula."""
    return int(round(cpu * 100))


# ---------------------------------------------------------------- VMs

def get_vm_locked(session, vm_id):
    return get_row(session, VirtualMachine, vm_id, "VM", lock=True)


def allocate(session, owner_id, name, cpu, vcpu, memory, template, hold=False,
             request_id=None):
    """Write a new VM as PENDING (or HOLD). A request id seen before returns
    the VM that request made, so a retried or redelivered create makes one VM."""
    if request_id:
        existing = session.scalar(select(VirtualMachine).where(
            VirtualMachine.owner_id == owner_id, VirtualMachine.request_id == request_id))
        if existing is not None:
            return existing
    vm = VirtualMachine(**new_vm_row(session, owner_id, name, cpu, vcpu, memory, template,
                                     request_id, tracing.request_id()))
    clusters.join_vmgroup(session, vm, owner_id, template)
    session.add(vm)
    session.flush()
    apply(session, vm, "allocate_hold" if hold else "allocate")
    return vm


def new_vm_row(session, owner_id, name, cpu, vcpu, memory, template, request_id,
               last_request_id=None):
    """The INIT row of a VM to create, or InvalidArgument (NotFound,
    FailedPrecondition for its devices) naming what is wrong. Its
    ``last_request_id`` is the request creating it (the create's own
    ``request_id`` when none is given: a flow's role VM)."""
    if not name or not str(name).strip():
        raise InvalidArgument("name: must not be empty")
    if memory is None or memory <= 0:
        raise InvalidArgument(f"memory: must be a positive number of MB, got {memory}")
    if cpu is None or cpu <= 0:
        raise InvalidArgument(f"cpu: must be greater than 0, got {cpu}")
    if vcpu is None or int(vcpu) != vcpu or vcpu <= 0:
        raise InvalidArgument(f"vcpu: must be a positive integer, got {vcpu}")
    clusters.check_scheduling(template)
    devices.check_template(session, owner_id, template)
    return {"name": str(name).strip(), "owner_id": owner_id, "state": "INIT",
            "lcm_state": "LCM_INIT", "seq": 0, "cpu": float(cpu), "vcpu": int(vcpu),
            "memory": int(memory), "template": template or {}, "request_id": request_id,
            "last_request_id": last_request_id or request_id}


CREATED_COLUMNS = ("name", "owner_id", "state", "lcm_state", "seq", "cpu", "vcpu", "memory",
                   "template", "request_id", "last_request_id", "vmgroup_id", "vmgroup_role")


def allocate_many(session, creates):
    """``allocate`` for many creates at once (concurrent RPCs, see the
    service's Batches): ``creates`` is a list of allocate's keyword arguments.
    Each is checked as allocate checks it (the first bad one raises); the VM
    rows, then their history and outbox, are written with one statement each.
    A request id made before, or earlier in the same list, gives the VM it
    made. Returns the VMs described (``describe``), in the order given.
    Each create may carry ``last_request_id``, the request it serves (many
    requests share one batch, so each VM is logged under its own)."""
    with tracing.detached():
        return _allocate_many(session, creates)


def _allocate_many(session, creates):
    asked = {(c["owner_id"], c["request_id"]) for c in creates if c.get("request_id")}
    known = {}
    if asked:
        rows = session.execute(select(*RECORD_COLUMNS, _vms.c.monitoring).where(
            tuple_(_vms.c.owner_id, _vms.c.request_id).in_(sorted(asked))))
        known = {(row.owner_id, row.request_id): VmRecord(row._mapping) for row in rows}
    new_rows, holds, slots = [], [], []     # a slot: a known VM or the index of a new row
    for create in creates:
        key = (create["owner_id"], create.get("request_id"))
        if key[1] and key in known:
            slots.append(known[key])
            continue
        row = new_vm_row(session, create["owner_id"], create["name"], create["cpu"],
                         create["vcpu"], create["memory"], create["template"],
                         create.get("request_id"), create.get("last_request_id"))
        group = VmRecord({"vmgroup_id": None, "vmgroup_role": None})
        clusters.join_vmgroup(session, group, create["owner_id"], create["template"])
        row.update(vmgroup_id=group.vmgroup_id, vmgroup_role=group.vmgroup_role)
        if key[1]:
            known[key] = len(new_rows)
        slots.append(len(new_rows))
        new_rows.append(row)
        holds.append(create.get("hold", False))
    made = []
    if new_rows:
        # the recordset is scanned in the order given, so the ids follow that order
        made = sorted((VmRecord({**row._mapping, "monitoring": {}})
                       for row in session.execute(_CREATE_VMS, bulk.params(new_rows))),
                      key=lambda vm: vm.id)
        steps = [step(session, vm, "allocate_hold" if hold else "allocate")
                 for vm, hold in zip(made, holds)]
        write_records(session, made)
        write_steps(session, steps)
    return describe_many(session, [made[slot] if isinstance(slot, int) else slot
                                   for slot in slots])


def describe_many(session, vms):
    """``describe`` for many VMs (records or ORM), the owners read at once."""
    owners = dict(session.execute(select(User.id, User.name).where(
        User.id.in_({vm.owner_id for vm in vms}))).all()) if vms else {}
    out = []
    for vm in vms:
        host = session.get(Host, vm.host_id) if vm.host_id else None
        target = session.get(Host, vm.target_host_id) if vm.target_host_id else None
        out.append(vm_summary(vm, host.name if host else None, owners.get(vm.owner_id),
                              target.name if target else None))
    return out


def check_allowed(vm, action):
    """The transition ``action`` takes ``vm`` by, or FailedPrecondition naming
    the VM's status and the statuses the action needs."""
    try:
        return next_transition(vm_status(vm), action)
    except TransitionError as exc:
        raise FailedPrecondition(f"VM {vm.id}: {exc}") from None


def apply(session, vm, action, message=None):
    """Move ``vm`` by ``action`` as the transition table says; raises
    FailedPrecondition if its current status does not allow the action."""
    write_steps(session, [step(session, vm, action, message)])
    return vm


def step(session, vm, action, message=None):
    """The one place a VM changes status: checks the table, moves ``vm`` (an
    ORM VirtualMachine or a ``VmRecord``) in memory, keeps the hosts' usage
    in step, and returns what the move writes besides the VM row: its
    history row, its outbox rows (the driver command, the ``vm.state``
    event) and the hosts' usage changes, for ``write_steps``. The move
    serves the current request (cirrus.tracing), else the VM's last one,
    which its command, event and log line carry."""
    current = vm_status(vm)
    transition = check_allowed(vm, action)
    vm.last_request_id = request_id = tracing.request_id() or vm.last_request_id
    vm.state, vm.lcm_state = (s.value for s in split(transition.target))
    vm.seq += 1
    vm.updated_at = utcnow()
    usage = []
    freed = move_capacity(vm, current, transition, usage)
    if transition.target == "DONE" or transition.fresh:
        devices.release(session, vm)    # leases and images go back (issue 5)
    if transition.fresh:
        start_over(vm)
    if transition.target == "RUNNING":
        vm.resume_from = None
    history = {"vm_id": vm.id, "seq": vm.seq, "action": action, "from_status": current,
               "to_status": transition.target, "host_id": vm.host_id, "message": message}
    vm.command_id = None
    rows, sent = [], ""
    if transition.command:
        cmd = driver_command(session, vm, transition)
        vm.command_id = cmd["id"]
        rows.append(outbox.command_row(cmd))
        sent = f"; {cmd['action']} sent to {cmd['host']}"
    host = host_row(session, vm.host_id)
    event = state_event(vm, host.name if host else None, freed)
    rows.append(outbox.event_row(messages.LIFECYCLE, state_event_key(vm, event), event,
                                 tracing.headers(request_id)))
    tracing.log_after_commit(session, log, "VM %s: %s -> %s (%s)%s", vm.id, current,
                             transition.target, action, sent, request_id=request_id,
                             vm_id=vm.id)
    return history, rows, usage


HISTORY_COLUMNS = ("vm_id", "seq", "action", "from_status", "to_status", "host_id", "message")
_HISTORY_INSERT = bulk.insert(VmHistory.__table__, HISTORY_COLUMNS)


def write_steps(session, steps):
    """The devices the VMs took or gave back (``devices.write``), the history
    and outbox rows of ``steps``, in one INSERT each, and their changes of
    the hosts' usage, summed per host and written in host id
    order: transactions that change several hosts lock them in one order,
    as deploy_many does, and never wait for each other in a cycle."""
    devices.write(session)
    if steps:
        session.execute(_HISTORY_INSERT, bulk.params([history for history, _, _ in steps]))
        outbox.add_many(session, [row for _, rows, _ in steps for row in rows])
        totals = {}
        for _, _, usage in steps:
            for host_id, cpu, memory, vms in usage:
                total = totals.setdefault(host_id, [0, 0, 0])
                total[0], total[1], total[2] = total[0] + cpu, total[1] + memory, total[2] + vms
        for host_id in sorted(totals):
            change_usage(session, host_id, *totals[host_id])


def apply_many(session, moves):
    """``apply`` for many VMs at once: ``moves`` is [(VmRecord, action,
    message)]. Each move is checked and made by ``step``, as one ``apply``;
    then the VM rows, the history and the outbox are written with one
    statement each. Raises FailedPrecondition if any VM's status does not
    allow its action (the caller's transaction then rolls back). Each VM
    moves for its own last request (the caller's serves many)."""
    with tracing.detached():
        steps = [step(session, vm, action, message) for vm, action, message in moves]
    write_records(session, [vm for vm, _, _ in moves])
    write_steps(session, steps)


# ---------------------------------------------------------------- VMs as plain records

_vms = VirtualMachine.__table__
# what the bulk path reads of a VM: everything but the monitoring series
RECORD_COLUMNS = [c for c in _vms.c if c.name not in ("monitoring", "metrics")]
# what a transition may change, written back by ``write_records``
WRITTEN_COLUMNS = ("state", "lcm_state", "seq", "updated_at", "host_id", "target_host_id",
                   "resume_from", "command_id", "sched_message", "error", "deploy_id",
                   "runtime", "resched", "last_request_id")


class VmRecord:
    """A VM row as a plain object: ``step`` moves it like an ORM VM, without
    the ORM's per-object bookkeeping; ``write_records`` writes it back."""

    def __init__(self, mapping):
        self.__dict__.update(mapping)


def lock_records(session, vm_ids):
    """{id: VmRecord} of the VMs ``vm_ids``, locked in id order."""
    rows = session.execute(select(*RECORD_COLUMNS).where(_vms.c.id.in_(sorted(vm_ids)))
                           .order_by(_vms.c.id).with_for_update())
    return {row.id: VmRecord(row._mapping) for row in rows}


def write_records(session, vms):
    """Write the WRITTEN_COLUMNS of ``vms`` in one UPDATE."""
    if vms:
        session.execute(_WRITE_RECORDS, bulk.params(
            [{name: getattr(vm, name) for name in ("id", *WRITTEN_COLUMNS)} for vm in vms]))


_WRITE_RECORDS = bulk.update(_vms, WRITTEN_COLUMNS)
_CREATE_VMS = bulk.insert(_vms, CREATED_COLUMNS,
                          returning=", ".join(column.name for column in RECORD_COLUMNS))


def move_capacity(vm, current, transition, usage):
    """Keep the hosts' usage in step with where the VM is, appending the
    changes to ``usage`` (written by ``write_steps``). A migration holds
    both hosts until it ends: arriving frees the old one, anything else
    (failure, terminate, recover) frees the target. True when capacity was
    freed, which the scheduler hears in the event: a waiting VM may fit now."""
    freed = False
    if vm.target_host_id and transition.target not in MIGRATING:
        freed = True
        if transition.arrives:
            usage.append(vm_usage(vm, vm.host_id, -1))
            vm.host_id = vm.target_host_id
        else:
            usage.append(vm_usage(vm, vm.target_host_id, -1))
        vm.target_host_id = None
    was_on, now_on = current in ON_HOST, transition.target in ON_HOST
    if was_on and not now_on:
        usage.append(vm_usage(vm, vm.host_id, -1))
        freed = True
    elif now_on and not was_on and not transition.reserved:
        # the cleanup of a stopped or undeployed VM runs on its last host and
        # holds capacity there until it is done, as any VM in EPILOG
        usage.append(vm_usage(vm, vm.host_id, +1))
    if transition.target in ("PENDING", "HOLD"):
        vm.host_id = None       # waiting for the scheduler: on no host
    return freed


def start_over(vm):
    """A recreated VM keeps its id and template, nothing of where it ran."""
    vm.host_id = vm.target_host_id = vm.deploy_id = vm.resume_from = None
    vm.runtime = {}
    vm.resched = False


def vm_usage(vm, host_id, sign):
    """(host_id, cpu, memory, vms): ``vm`` arriving on (+1) or leaving (-1) a host."""
    return host_id, sign * cpu_percent(vm.cpu), sign * vm.memory, sign


def add_usage(session, vm, host_id, sign):
    change_usage(session, *vm_usage(vm, host_id, sign))


def change_usage(session, host_id, cpu, memory, vms):
    session.execute(
        update(Host).where(Host.id == host_id)
        .values(cpu_usage=Host.cpu_usage + cpu, mem_usage=Host.mem_usage + memory,
                running_vms=Host.running_vms + vms))


def reserve(session, vm, host_id):
    """Take ``vm``'s capacity on a MONITORED host with room for it, in one
    conditional UPDATE so that concurrent placements never overcommit.
    Room is counted as the scheduler counts it: MAX - RESERVED - USAGE.
    False when the host does not fit (``unfit_reason`` says why)."""
    return reserve_capacity(session, host_id, cpu_percent(vm.cpu), vm.memory, 1)


_hosts = Host.__table__.c
# a plain (Core) UPDATE, built once: host objects already in the session keep
# their old usage, so reading a host's name later costs no query
# (``unfit_reason`` reads afresh)
RESERVE = (
    Host.__table__.update()
    .where(_hosts.id == bindparam("host_id"), _hosts.state == "MONITORED",
           _hosts.max_cpu - _hosts.reserved_cpu - _hosts.cpu_usage >= bindparam("cpu"),
           _hosts.max_mem - _hosts.reserved_mem - _hosts.mem_usage >= bindparam("memory"))
    .values(cpu_usage=_hosts.cpu_usage + bindparam("cpu"),
            mem_usage=_hosts.mem_usage + bindparam("memory"),
            running_vms=_hosts.running_vms + bindparam("vms"))
    .returning(_hosts.id))


def reserve_capacity(session, host_id, cpu, memory, vms):
    """``reserve`` for ``vms`` VMs needing ``cpu`` and ``memory`` in all: all or nothing."""
    return session.execute(RESERVE, {"host_id": host_id, "cpu": cpu, "memory": memory,
                                     "vms": vms}).scalar() is not None


def unfit_reason(session, vm, host_id):
    host = session.get(Host, host_id, populate_existing=True)
    if host is None:
        return f"host {host_id} does not exist"
    if host.state != "MONITORED":
        return f"host {host.name} is {host.state}, not MONITORED"
    return (f"host {host.name} lacks capacity: the VM needs {cpu_percent(vm.cpu)}% CPU and "
            f"{vm.memory} MB, it has {host.max_cpu - host.reserved_cpu - host.cpu_usage}% "
            f"and {host.max_mem - host.reserved_mem - host.mem_usage} MB free")


# what a step needs of a host: its name (events, commands) and URI (migrations),
# as plain rows: a batch's 220 Host objects, templates and monitoring decoded,
# took twice the CPU
_HOST_ADDRESS = select(Host.id, Host.name, Host.monitoring["URI"].astext.label("uri"))


def load_hosts(session, host_ids):
    """Read the hosts ``host_ids`` in one query, for ``host_row``."""
    db.read_missing(db.per_transaction(session, "hosts"), host_ids, lambda wanted: (
        (row.id, row) for row in session.execute(_HOST_ADDRESS.where(Host.id.in_(wanted)))))


def host_row(session, host_id):
    """Host ``host_id``'s id, name and URI (a row; None for no host): looked
    up once per transaction, since a batch's steps ask for the same few hosts."""
    if host_id is None:
        return None
    hosts = db.per_transaction(session, "hosts")
    if host_id not in hosts:
        load_hosts(session, [host_id])
    return hosts[host_id]


def driver_command(session, vm, transition):
    """The command entering ``transition.target`` sends, addressed to the VM's
    host or, for the later steps of a migration, to the target host."""
    host = host_row(session, vm.target_host_id if transition.on_target else vm.host_id)
    if host is None:
        raise FailedPrecondition(
            f"VM {vm.id}: no host to send {transition.command} to ({transition.target})")
    args = {"vm": driver_spec(vm, devices.for_driver(session, vm)), **dict(transition.args)}
    if transition.command == "mv" and args["direction"] == "in" and vm.runtime.get("vm_dir"):
        args["from_dir"] = vm.runtime["vm_dir"]     # where save or mv out left the files
    if transition.command == "migrate":
        target = host_row(session, vm.target_host_id)
        args.update(dest_host=target.name, dest_uri=target.uri)
    return messages.command(transition.command, vm.id, host.name, vm.last_request_id, **args)


def driver_spec(vm, held=None):
    """What a driver needs to know of a VM; ``runtime`` is what earlier
    commands reported (checkpoint, vm_dir...); ``held`` (devices.for_driver)
    the disks, NICs, context and token its deploy took."""
    return {"id": vm.id, "name": vm.name, "cpu": vm.cpu, "vcpu": vm.vcpu,
            "memory": vm.memory, "template": vm.template, "deploy_id": vm.deploy_id,
            "runtime": vm.runtime or {}, **(held or devices.NOTHING)}


def state_event(vm, host_name, freed=False):
    return {"key": messages.vm_event_key(vm.state, vm.lcm_state, vm.id), "id": vm.id,
            "name": vm.name, "owner_id": vm.owner_id, "state": vm.state,
            "lcm_state": vm.lcm_state, "status": vm_status(vm), "seq": vm.seq,
            "host": host_name, "host_id": vm.host_id, "resched": bool(vm.resched),
            "error": vm.error, "at": iso(vm.updated_at), "freed": freed}


def state_event_key(vm, event):
    """The routing key of ``vm``'s ``event``; a role VM of a OneFlow service
    has the service's SERVICE_ID in its template."""
    return messages.vm_state_key(event["status"], event["freed"], event["resched"],
                                 "SERVICE_ID" in (vm.template or {}))


# the deploy path brings back what a stop or an undeploy put away
DEPLOY_ACTIONS = {None: "deploy", "STOPPED": "deploy_stopped", "UNDEPLOYED": "deploy_undeployed"}


def deploy(session, vm_id, host_id):
    """Place a PENDING (or HOLD) VM on a host, reserving its capacity atomically.
    Returns {"outcome": "deployed" | "vm_not_pending" | "host_unfit" |
    "vm_waits", "reason"}: a host that no longer fits is a normal answer, not
    an error, so the scheduler can try its next choice; ``vm_waits``: what
    the VM needs besides a host (a lease, a persistent image) cannot be had
    now, it stays PENDING with the reason in sched_message."""
    vm = get_vm_locked(session, vm_id)
    refusal = deploy_refusal(vm)
    if refusal:
        return refusal
    if not reserve(session, vm, host_id):
        return {"outcome": "host_unfit", "reason": unfit_reason(session, vm, host_id)}
    return deployed(session, vm, host_id)


def deploy_refusal(vm):
    """The answer for a VM that is not waiting for a host, or None."""
    action = DEPLOY_ACTIONS[vm.resume_from]
    if not allows(vm_status(vm), action):
        return {"outcome": "vm_not_pending", "reason": str(TransitionError(action, vm_status(vm)))}
    return None


def deployed(session, vm, host_id):
    """Send ``vm`` to ``host_id``, whose capacity is already reserved for it,
    once it has its leases and images (else the reservation is given back)."""
    answer = take_devices(session, vm, host_id)
    if answer["outcome"] == "deployed":
        apply(session, vm, DEPLOY_ACTIONS[vm.resume_from])
    return answer


def take_devices(session, vm, host_id, reserved=True):
    """What a deploy does before its transition: take the VM's leases and
    images; without them the VM waits (``vm_waits``, the reason in
    sched_message), and the capacity ``reserved`` for it on ``host_id`` is
    given back."""
    shortage = devices.take(session, vm)
    if shortage:
        if reserved:
            add_usage(session, vm, host_id, -1)
        vm.sched_message = shortage
        return {"outcome": "vm_waits", "reason": shortage}
    vm.host_id = host_id
    vm.sched_message = None
    vm.error = None
    return {"outcome": "deployed", "reason": None}


def parse_placements(placements):
    """[(vm_id, host_id)] from the wire, each VM once; InvalidArgument names a bad one."""
    parsed, seen = [], set()
    for placement in placements:
        try:
            vm_id, host_id = (int(x) for x in placement)
        except (TypeError, ValueError):
            raise InvalidArgument(f"placements: each must be [vm_id, host_id], "
                                  f"got {placement!r}") from None
        if vm_id in seen:
            raise InvalidArgument(f"placements: VM {vm_id} is placed twice")
        seen.add(vm_id)
        parsed.append((vm_id, host_id))
    return parsed


def deploy_many(session, placements):
    """``deploy`` for a batch of [vm_id, host_id], in one transaction; returns
    each answer with its vm_id, in the order given.

    Set-based, for the scheduler's batches. The VM rows are locked first, in
    id order, as plain records. The batch is first made as if every host had
    room: devices taken, transitions made (``apply_many``: the same table as
    ``apply``, one statement each for the VM rows, history and outbox); only
    then are the hosts locked, in id order, and one conditional UPDATE
    reserves every host's share, checking in SQL that each fits all of it.
    So a host stays locked only from there to commit, and concurrent batches
    sharing a host (several schedulers, or one scheduler's batches in flight)
    hardly wait for each other. If a host no longer takes its whole share
    (another scheduler filled it), all that is undone (a savepoint) and the
    batch is made again reserving first, its hosts' VMs one by one."""
    placements = parse_placements(placements)
    vm_ids = {vm_id for vm_id, _ in placements}
    load_hosts(session, {h for _, h in placements})    # for step() and driver_command()
    with session.no_autoflush:
        attempt, mark = session.begin_nested(), tracing.held(session)
        answers = deploy_batch(session, placements, lock_records(session, vm_ids),
                               reserve_last=True)
        if answers is None:
            attempt.rollback()
            tracing.forget_since(session, mark)
            devices.forget(session)
            answers = deploy_batch(session, placements, lock_records(session, vm_ids),
                                   reserve_last=False)
        else:
            attempt.commit()
    return [{"vm_id": vm_id, **answers[vm_id]} for vm_id, _ in placements]


def deploy_batch(session, placements, vms, reserve_last):
    """The answers of ``deploy_many``, reserving the hosts' shares after the
    rest (None if a host does not take its whole share: the caller undoes
    the batch) or, with ``reserve_last`` false, before it, a host that does
    not take its whole share then taking its VMs one by one."""
    answers, by_host = {}, {}
    for vm_id, host_id in placements:
        vm = vms.get(vm_id)
        refusal = (deploy_refusal(vm) if vm is not None else
                   {"outcome": "vm_not_pending", "reason": f"VM {vm_id} does not exist"})
        if refusal:
            answers[vm_id] = refusal
        else:
            by_host.setdefault(host_id, []).append(vm)
    if reserve_last:
        fitting = by_host
    else:
        lock_hosts(session, by_host)
        whole = reserve_shares(session, shares(by_host))
        fitting = {host_id: group if host_id in whole else
                   [vm for vm in group if reserve(session, vm, host_id)]
                   for host_id, group in by_host.items()}
    moves, waiting, placed = [], [], {}
    for host_id, group in sorted(by_host.items()):
        for vm in group:
            if vm not in fitting[host_id]:
                answers[vm.id] = {"outcome": "host_unfit",
                                  "reason": unfit_reason(session, vm, host_id)}
                continue
            answers[vm.id] = take_devices(session, vm, host_id, reserved=not reserve_last)
            if answers[vm.id]["outcome"] == "deployed":
                moves.append((vm, DEPLOY_ACTIONS[vm.resume_from], None))
                placed.setdefault(host_id, []).append(vm)
            else:
                waiting.append(vm)
    apply_many(session, moves)
    write_records(session, waiting)     # their sched_message
    if reserve_last:
        session.flush()     # the devices' rows too: from here to commit the hosts are locked
        lock_hosts(session, placed)
        if reserve_shares(session, shares(placed)) != set(placed):
            return None
    return answers


def shares(by_host):
    """[(host_id, cpu, memory, vms)] of {host_id: [VMs]}, in host order."""
    return [(host_id, sum(cpu_percent(vm.cpu) for vm in group), sum(vm.memory for vm in group),
             len(group)) for host_id, group in sorted(by_host.items())]


def lock_hosts(session, host_ids):
    """Lock the hosts' rows in id order, so that two transactions reserving on
    several hosts never wait for each other in a cycle. FOR NO KEY UPDATE,
    the lock the reservation's UPDATE takes: it does not wait for the key
    share locks that writing rows pointing at a host (history, VMs) takes."""
    session.execute(select(Host.id).where(Host.id.in_(sorted(host_ids))).order_by(Host.id)
                    .with_for_update(key_share=True))


def reserve_shares(session, shares):
    """Reserve [(host_id, cpu, memory, vms)] (each host once) in one
    conditional UPDATE over the shares as arrays: a host takes its whole
    share or nothing, room counted as ``reserve`` counts it. Returns the
    hosts that took it."""
    if not shares:
        return set()
    host_ids, cpus, memories, counts = (list(column) for column in zip(*shares))
    return set(session.execute(_RESERVE_SHARES, {"host_ids": host_ids, "cpus": cpus,
                                                 "memories": memories,
                                                 "counts": counts}).scalars())


_RESERVE_SHARES = text(
    "UPDATE hosts SET cpu_usage = cpu_usage + need.cpu, mem_usage = mem_usage + need.memory, "
    "running_vms = running_vms + need.vms "
    "FROM unnest(CAST(:host_ids AS integer[]), CAST(:cpus AS integer[]), "
    "CAST(:memories AS integer[]), CAST(:counts AS integer[])) AS need(host_id, cpu, memory, vms) "
    "WHERE hosts.id = need.host_id AND hosts.state = 'MONITORED' "
    "AND hosts.max_cpu - hosts.reserved_cpu - hosts.cpu_usage >= need.cpu "
    "AND hosts.max_mem - hosts.reserved_mem - hosts.mem_usage >= need.memory "
    "RETURNING hosts.id")


def migrate(session, vm, host_id, live=False):
    """Start moving a RUNNING VM to another host; its capacity there is taken
    now, atomically, as a deploy takes it."""
    action = "migrate_live" if live else "migrate"
    check_allowed(vm, action)
    target = get_host(session, host_id)
    if host_id == vm.host_id:
        raise FailedPrecondition(f"VM {vm.id} is already on host {target.name}; "
                                 "migrate it to another host")
    if not reserve(session, vm, host_id):
        raise FailedPrecondition(f"VM {vm.id}: {unfit_reason(session, vm, host_id)}")
    vm.target_host_id = host_id
    vm.sched_message = None
    # asked and answered: a migration that fails does not start again by itself
    vm.resched = False
    return apply(session, vm, action)


# user actions and the options each takes
ACTION_OPTIONS = {
    "terminate": {"hard"}, "poweroff": {"hard"}, "undeploy": {"hard"}, "reboot": {"hard"},
    "suspend": set(), "stop": set(), "resume": set(), "hold": set(), "release": set(),
    "resched": set(), "unresched": set(), "migrate": {"host_id", "live"},
    "deploy": {"host_id"}, "recover": {"operation", "hard"},
}
OPTION_TYPES = {"hard": bool, "live": bool, "host_id": int, "operation": str}
RECOVER_OPERATIONS = ("success", "failure", "retry", "delete", "recreate")


def check_options(action, options):
    """The options that are set, after checking each one exists, has the
    right type and applies to ``action``. False and None mean "not set", so a
    caller may pass every flag it has."""
    if action not in ACTION_OPTIONS:
        raise InvalidArgument(f"action: unknown action {action!r}; choose from "
                              f"{', '.join(sorted(ACTION_OPTIONS))}")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgument(f"options: must be a mapping of option to value, got {options!r}")
    chosen = {}
    for key, value in options.items():
        if key not in OPTION_TYPES:
            raise InvalidArgument(f"options: unknown option {key!r}; known options: "
                                  f"{', '.join(sorted(OPTION_TYPES))}")
        if value is None or value is False:
            continue
        kind = OPTION_TYPES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidArgument(f"{key}: must be {kind.__name__}, got {value!r}")
        if key not in ACTION_OPTIONS[action]:
            takes = ", ".join(sorted(ACTION_OPTIONS[action])) or "no options"
            raise InvalidArgument(f"{key}: does not apply to {action}; {action} takes {takes}")
        chosen[key] = value
    return chosen


def needed_host(action, options):
    if "host_id" not in options:
        raise InvalidArgument(f"host_id: {action} needs the host to go to")
    return options["host_id"]


def vm_action(session, vm_id, action, options=None):
    """Take a user action on a VM (the contract's table); returns the VM."""
    options = check_options(action, options)
    hard = options.get("hard", False)
    if action == "recover":
        if "operation" not in options:
            raise InvalidArgument(
                f"operation: recover needs one of {', '.join(RECOVER_OPERATIONS)}")
        return recover(session, vm_id, options["operation"], hard)
    if action == "deploy":
        host_id = needed_host(action, options)
        answer = deploy(session, vm_id, host_id)
        if answer["outcome"] != "deployed":
            raise FailedPrecondition(f"VM {vm_id}: {answer['reason']}")
        return get_vm_locked(session, vm_id)
    vm = get_vm_locked(session, vm_id)
    if action == "migrate":
        return migrate(session, vm, needed_host(action, options), options.get("live", False))
    current = vm_status(vm)
    if replayed(vm, current, f"{action}_hard" if hard else action):
        return vm
    if action in ("resched", "unresched") and allows(current, action):
        vm.resched = action == "resched"
    if action == "resume" and current in ("STOPPED", "UNDEPLOYED"):
        vm.resume_from = current        # the next deploy brings the VM back from there
    return apply(session, vm, f"{action}_hard" if hard else action)


def replayed(vm, current, action):
    """True when this very request already moved ``vm`` and ``action`` no
    longer applies: the call came again because the instance that made the
    move died before answering (RPC messages are acked late), so it answers
    as the first did instead of refusing what it already did."""
    request_id = tracing.request_id()
    return bool(request_id) and request_id == vm.last_request_id and not allows(current, action)


FENCED_HOST_STATES = ("ERROR", "OFFLINE")


def recover(session, vm_id, operation, hard=False):
    """Settle a VM stuck in a transient or failure status: answer for the
    driver (success / failure), send its command again (retry), or drop it
    (delete) or start it over as PENDING (recreate), cleaning its host first
    unless that host is fenced (ERROR or OFFLINE)."""
    if operation not in RECOVER_OPERATIONS:
        raise InvalidArgument(f"operation: unknown recover operation {operation!r}; choose "
                              f"from {', '.join(RECOVER_OPERATIONS)}")
    if hard and operation != "retry":
        raise InvalidArgument(f"hard: only recover retry has a hard form, not {operation}")
    vm = get_vm_locked(session, vm_id)
    current = vm_status(vm)
    message = f"recover {operation}"
    if operation in ("success", "failure"):
        failed = FAILED_FROM.get(current, current)
        if failed not in TRANSIENT:
            recoverable = sorted(TRANSIENT | {f for f, s in FAILED_FROM.items() if s in TRANSIENT})
            raise FailedPrecondition(
                f"VM {vm.id}: cannot recover {operation} a VM in {current}; it must be in "
                f"one of: {', '.join(recoverable)}")
        return apply(session, vm, result_action(failed, operation == "success"), message)
    if operation == "retry":
        return apply(session, vm, "retry_hard" if hard else "retry", message)
    action = f"recover_{operation}"
    host = session.get(Host, vm.host_id) if vm.host_id else None
    fenced = host is not None and host.state in FENCED_HOST_STATES
    if fenced and allows(current, action + "_fenced"):
        action += "_fenced"     # nothing answers from that host: do not wait for a cleanup
    return apply(session, vm, action, message)


def handle_result(session, result):
    """Apply a driver's answer. A result for a command that is not the one in
    flight (a redelivery, or an answer that arrives after a recovery) is
    ignored, so each command moves the VM at most once. What the driver
    reports (checkpoint, vm_dir, deploy_id...) is kept in ``runtime`` for the
    commands that follow."""
    vm = session.get(VirtualMachine, result["vm_id"], with_for_update=True)
    move = result_move(vm, result)
    return apply(session, vm, *move) if move else None


def result_move(vm, result):
    """(action, message) a driver result moves ``vm`` by, after keeping what
    it reported; None for a result that is not the VM's command in flight."""
    if vm is None or vm.command_id != result["command_id"]:
        return None
    info = result.get("info") or {}
    if info:
        vm.runtime = {**(vm.runtime or {}), **info}
        if info.get("deploy_id"):
            vm.deploy_id = info["deploy_id"]
    if not result["success"]:
        vm.error = f"{result['action']} failed: {result['error']}"
    return (result_action(vm_status(vm), result["success"]),
            None if result["success"] else vm.error)


def handle_results(session, results):
    """``handle_result`` for many driver answers in one transaction: the VMs
    are locked in id order as records, each result is checked and moves its
    VM by ``step`` in the order given (so a repeat of a result finds the
    command it answered no longer in flight), then the VM rows, history and
    outbox are written with one statement each."""
    vms = lock_records(session, {result["vm_id"] for result in results})
    # for step() and driver_command(): the VMs' devices, their hosts' names
    devices.load(session, vms)
    load_hosts(session, {h for vm in vms.values() for h in (vm.host_id, vm.target_host_id)})
    steps, moved = [], {}
    with tracing.detached():    # the results of many requests: each VM its own
        for result in results:
            vm = vms.get(result["vm_id"])
            move = result_move(vm, result)
            if move:
                steps.append(step(session, vm, *move))
                moved[vm.id] = vm
    write_records(session, list(moved.values()))
    write_steps(session, steps)
    return len(steps)


def set_sched_message(session, vm_id, message):
    session.execute(update(VirtualMachine).where(VirtualMachine.id == vm_id)
                    .values(sched_message=message))


def set_sched_messages(session, messages_by_vm):
    """Why each VM of {vm_id: message} is not placed, in one statement; only
    VMs still waiting (PENDING, or RUNNING asked to move) take the message."""
    if not messages_by_vm:
        return
    vms = VirtualMachine.__table__
    rows = [{"vm_id": int(vm_id), "message": message}
            for vm_id, message in messages_by_vm.items()]
    session.execute(
        vms.update().where(vms.c.id == bindparam("vm_id"),
                           or_(vms.c.state == "PENDING", vms.c.resched.is_(True)))
        .values(sched_message=bindparam("message")), rows)


def vm_summary(vm, host_name, owner_name, target_host_name=None):
    current = vm_status(vm)
    return {"id": vm.id, "name": vm.name, "owner": owner_name, "owner_id": vm.owner_id,
            "state": vm.state, "lcm_state": vm.lcm_state, "status": current,
            "short": SHORT_NAMES[current], "host": host_name, "host_id": vm.host_id,
            "cpu": vm.cpu, "vcpu": vm.vcpu, "memory": vm.memory, "deploy_id": vm.deploy_id,
            "error": vm.error, "sched_message": vm.sched_message, "seq": vm.seq,
            "resched": bool(vm.resched), "target_host_id": vm.target_host_id,
            "target_host": target_host_name, "resume_from": vm.resume_from,
            "monitoring": vm.monitoring or {},
            "created_at": iso(vm.created_at), "updated_at": iso(vm.updated_at)}


def describe(session, vm):
    """vm_summary, looking up the host and owner names."""
    host = session.get(Host, vm.host_id) if vm.host_id else None
    target = session.get(Host, vm.target_host_id) if vm.target_host_id else None
    owner = session.get(User, vm.owner_id)
    return vm_summary(vm, host.name if host else None, owner.name if owner else None,
                      target.name if target else None)


def get_vm(session, vm_id):
    """A VM with its template, history, and the devices it holds."""
    vm = get_row(session, VirtualMachine, vm_id, "VM")
    out = describe(session, vm)
    rows = session.execute(
        select(VmHistory, Host.name).outerjoin(Host, Host.id == VmHistory.host_id)
        .where(VmHistory.vm_id == vm.id).order_by(VmHistory.seq)).all()
    out["template"] = vm.template
    out["history"] = [{"seq": h.seq, "action": h.action, "from": h.from_status,
                       "to": h.to_status, "host": name, "message": h.message,
                       "at": iso(h.at)} for h, name in rows]
    out["metrics"] = vm.metrics or []
    out["stays"] = [accounting.stay_to_dict(stay) for stay in accounting.stays(
        [{"seq": h.seq, "action": h.action, "to_status": h.to_status, "host_id": h.host_id,
          "host": name, "at": h.at} for h, name in rows], utcnow())]
    out.update(devices.shown(session, vm))
    return out


def list_vms(session, owner_id=None, include_done=False):
    target = aliased(Host)
    query = (select(VirtualMachine, Host.name, User.name, target.name)
             .outerjoin(Host, Host.id == VirtualMachine.host_id)
             .outerjoin(target, target.id == VirtualMachine.target_host_id)
             .join(User, User.id == VirtualMachine.owner_id)
             .order_by(VirtualMachine.id))
    if owner_id is not None:
        query = query.where(VirtualMachine.owner_id == owner_id)
    if not include_done:
        query = query.where(VirtualMachine.state != "DONE")
    return [vm_summary(vm, host, owner, target_name)
            for vm, host, owner, target_name in session.execute(query)]


# ---------------------------------------------------------------- hosts

def host_to_dict(host):
    return {"id": host.id, "name": host.name, "state": host.state, "max_cpu": host.max_cpu,
            "max_mem": host.max_mem, "cpu_usage": host.cpu_usage, "mem_usage": host.mem_usage,
            "running_vms": host.running_vms, "monitoring": host.monitoring or {}, "ha": host.ha,
            "cluster_id": host.cluster_id, "template": host.template or {},
            "reserved_cpu": host.reserved_cpu, "reserved_mem": host.reserved_mem,
            "last_monitored_at": iso(host.last_monitored_at)}


def get_host(session, host_id, lock=False):
    return get_row(session, Host, host_id, "host", lock)


def list_hosts(session):
    return [host_to_dict(h) for h in session.scalars(select(Host).order_by(Host.id))]


def create_host(session, name):
    name = (name or "").strip()
    if not name:
        raise InvalidArgument("name: must not be empty")
    if session.scalar(select(Host.id).where(Host.name == name)) is not None:
        raise AlreadyExists(f"host {name!r} already exists")
    host = Host(name=name, state="INIT", monitoring={})
    session.add(host)
    session.flush()
    return host


def set_host_enabled(session, host_id, enabled):
    host = get_host(session, host_id, lock=True)
    if enabled and host.state in ("DISABLED", "OFFLINE"):
        # monitored again at its next report
        host.state = "INIT"
    elif not enabled:
        host.state = "DISABLED"
    return host


def delete_host(session, host_id):
    host = get_host(session, host_id, lock=True)
    on_it = session.scalar(select(VirtualMachine.id).where(
        VirtualMachine.host_id == host_id, VirtualMachine.state != "DONE").limit(1))
    if on_it is not None:
        raise FailedPrecondition(f"host {host.name} still has VMs (e.g. VM {on_it}); terminate them first")
    # DONE VMs keep their history, but no longer point at the host
    session.execute(update(VirtualMachine).where(VirtualMachine.host_id == host_id)
                    .values(host_id=None))
    session.execute(update(VmHistory).where(VmHistory.host_id == host_id).values(host_id=None))
    out = host_to_dict(host)
    session.delete(host)
    return out


# ---------------------------------------------------------------- templates

def template_to_dict(session, template, owner_name=None):
    from cirrus.template import dumps
    if owner_name is None:
        owner_name = session.get(User, template.owner_id).name
    return {"id": template.id, "name": template.name, "owner": owner_name,
            "owner_id": template.owner_id, "body": template.body, "text": dumps(template.body),
            "created_at": iso(template.created_at)}


def get_template(session, template_id):
    return get_row(session, Template, template_id, "template")


def create_template(session, owner_id, name, body):
    name = (name or body.get("NAME") or "").strip()
    if not name:
        raise InvalidArgument("name: give --name or a NAME in the template")
    template = Template(name=name, owner_id=owner_id, body=body)
    session.add(template)
    session.flush()
    return template


def list_templates(session, owner_id=None):
    query = select(Template, User.name).join(User, User.id == Template.owner_id).order_by(Template.id)
    if owner_id is not None:
        query = query.where(Template.owner_id == owner_id)
    return [template_to_dict(session, t, owner) for t, owner in session.execute(query)]
