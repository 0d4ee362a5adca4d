"""The VM life cycle as plain functions over a database session.

Each function runs inside the caller's transaction. A state change goes
through ``apply``, which consults the transition table, writes the history
row, queues the ``vm.state`` event and any driver command in the outbox, and
releases the host's capacity when the VM leaves it.
"""
from sqlalchemy import select, update

from cirrus import messages, outbox
from cirrus.db.models import Host, Template, User, VirtualMachine, VmHistory, utcnow
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cirrus.states import ON_HOST, SHORT_NAMES, TransitionError, next_transition, result_action, split, status
from services.lifecycle import accounting



def iso(value):
    return value.isoformat() if value else None


def vm_status(vm):
    return status(vm.state, vm.lcm_state)


def cpu_percent(cpu):
    """Host capacity is counted in percent of a core, as in OpenNebula."""
    return int(round(cpu * 100))


# ---------------------------------------------------------------- VMs

def get_vm_locked(session, vm_id):
    vm = session.get(VirtualMachine, vm_id, with_for_update=True)
    if vm is None:
        raise NotFound(f"VM {vm_id} does not exist")
    return vm


def allocate(session, owner_id, name, cpu, vcpu, memory, template, hold=False,
             request_id=None):
    """Write a new VM as PENDING (or HOLD). A request id seen before returns
    the VM that request made, so a retried or redelivered create makes one VM."""
    if request_id:
        existing = session.scalar(select(VirtualMachine).where(
            VirtualMachine.owner_id == owner_id, VirtualMachine.request_id == request_id))
        if existing is not None:
            return existing
    if not name or not str(name).strip():
        raise InvalidArgument("name: must not be empty")
    if memory is None or memory <= 0:
        raise InvalidArgument(f"memory: must be a positive number of MB, got {memory}")
    if cpu is None or cpu <= 0:
        raise InvalidArgument(f"cpu: must be greater than 0, got {cpu}")
    if vcpu is None or int(vcpu) != vcpu or vcpu <= 0:
        raise InvalidArgument(f"vcpu: must be a positive integer, got {vcpu}")
    vm = VirtualMachine(name=str(name).strip(), owner_id=owner_id, state="INIT",
                        lcm_state="LCM_INIT", seq=0, cpu=float(cpu), vcpu=int(vcpu),
                        memory=int(memory), template=template or {}, request_id=request_id)
    session.add(vm)
    session.flush()
    apply(session, vm, "allocate_hold" if hold else "allocate")
    return vm


def apply(session, vm, action, message=None):
    """Move ``vm`` by ``action`` as the transition table says; raises
    FailedPrecondition if its current status does not allow the action."""
    current = vm_status(vm)
    try:
        transition = next_transition(current, action)
    except TransitionError as exc:
        raise FailedPrecondition(f"VM {vm.id}: {exc}") from None
    vm.state, vm.lcm_state = (s.value for s in split(transition.target))
    vm.seq += 1
    vm.updated_at = utcnow()
    host = session.get(Host, vm.host_id) if vm.host_id else None
    if current in ON_HOST and transition.target not in ON_HOST:
        release(session, vm)
    session.add(VmHistory(vm_id=vm.id, seq=vm.seq, action=action, from_status=current,
                          to_status=transition.target, host_id=vm.host_id, message=message))
    vm.command_id = None
    if transition.command:
        cmd = messages.command(transition.command, vm.id, host.name, vm=driver_spec(vm))
        vm.command_id = cmd["id"]
        outbox.add_command(session, cmd)
    outbox.add_event(session, messages.LIFECYCLE, messages.VM_STATE,
                     state_event(vm, host.name if host else None))
    return vm


def driver_spec(vm):
    """What a driver needs to know of a VM."""
    return {"id": vm.id, "name": vm.name, "cpu": vm.cpu, "vcpu": vm.vcpu,
            "memory": vm.memory, "template": vm.template, "deploy_id": vm.deploy_id}


def state_event(vm, host_name):
    return {"key": messages.vm_event_key(vm.state, vm.lcm_state, vm.id), "id": vm.id,
            "name": vm.name, "owner_id": vm.owner_id, "state": vm.state,
            "lcm_state": vm.lcm_state, "status": vm_status(vm), "seq": vm.seq,
            "host": host_name, "error": vm.error, "at": iso(vm.updated_at)}


def deploy(session, vm_id, host_id):
    """Place a PENDING (or HOLD) VM on a host, reserving its capacity atomically.
    Returns {"outcome": "deployed" | "vm_not_pending" | "host_unfit", "reason"}:
    a host that no longer fits is a normal answer, not an error, so the
    scheduler can try its next choice."""
    vm = get_vm_locked(session, vm_id)
    current = vm_status(vm)
    if current not in ("PENDING", "HOLD"):
        return {"outcome": "vm_not_pending", "reason": f"VM {vm_id} is {current}, not PENDING"}
    need_cpu = cpu_percent(vm.cpu)
    reserved = session.execute(
        update(Host)
        .where(Host.id == host_id, Host.state == "MONITORED",
               Host.max_cpu - Host.cpu_usage >= need_cpu,
               Host.max_mem - Host.mem_usage >= vm.memory)
        .values(cpu_usage=Host.cpu_usage + need_cpu, mem_usage=Host.mem_usage + vm.memory,
                running_vms=Host.running_vms + 1)
        .returning(Host.id)).scalar()
    if reserved is None:
        return {"outcome": "host_unfit",
                "reason": f"host {host_id} is not monitored or lacks capacity"}
    vm.host_id = host_id
    vm.sched_message = None
    vm.error = None
    apply(session, vm, "deploy")
    return {"outcome": "deployed", "reason": None}


def release(session, vm):
    session.execute(
        update(Host).where(Host.id == vm.host_id)
        .values(cpu_usage=Host.cpu_usage - cpu_percent(vm.cpu),
                mem_usage=Host.mem_usage - vm.memory,
                running_vms=Host.running_vms - 1))


def terminate(session, vm_id, hard=False):
    vm = get_vm_locked(session, vm_id)
    return apply(session, vm, "terminate_hard" if hard else "terminate")


def handle_result(session, result):
    """Apply a driver's answer. A result for a command that is not the one in
    flight (a redelivery, or an answer that arrives after a recovery) is
    ignored, so each command moves the VM at most once."""
    vm = session.get(VirtualMachine, result["vm_id"], with_for_update=True)
    if vm is None or vm.command_id != result["command_id"]:
        return None
    if result["success"]:
        if result["action"] == "deploy":
            vm.deploy_id = result["info"].get("deploy_id")
    else:
        vm.error = f"{result['action']} failed: {result['error']}"
    return apply(session, vm, result_action(vm_status(vm), result["success"]),
                 message=None if result["success"] else vm.error)


def set_sched_message(session, vm_id, message):
    session.execute(update(VirtualMachine).where(VirtualMachine.id == vm_id)
                    .values(sched_message=message))


def vm_summary(vm, host_name, owner_name):
    current = vm_status(vm)
    return {"id": vm.id, "name": vm.name, "owner": owner_name, "owner_id": vm.owner_id,
            "state": vm.state, "lcm_state": vm.lcm_state, "status": current,
            "short": SHORT_NAMES[current], "host": host_name, "host_id": vm.host_id,
            "cpu": vm.cpu, "vcpu": vm.vcpu, "memory": vm.memory, "deploy_id": vm.deploy_id,
            "error": vm.error, "sched_message": vm.sched_message, "seq": vm.seq,
            "created_at": iso(vm.created_at), "updated_at": iso(vm.updated_at)}


def describe(session, vm):
    """vm_summary, looking up the host and owner names."""
    host = session.get(Host, vm.host_id) if vm.host_id else None
    owner = session.get(User, vm.owner_id)
    return vm_summary(vm, host.name if host else None, owner.name if owner else None)


def get_vm(session, vm_id):
    """A VM with its template and history."""
    vm = session.get(VirtualMachine, vm_id)
    if vm is None:
        raise NotFound(f"VM {vm_id} does not exist")
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
    return out


def list_vms(session, owner_id=None, include_done=False):
    query = (select(VirtualMachine, Host.name, User.name)
             .outerjoin(Host, Host.id == VirtualMachine.host_id)
             .join(User, User.id == VirtualMachine.owner_id)
             .order_by(VirtualMachine.id))
    if owner_id is not None:
        query = query.where(VirtualMachine.owner_id == owner_id)
    if not include_done:
        query = query.where(VirtualMachine.state != "DONE")
    return [vm_summary(vm, host, owner) for vm, host, owner in session.execute(query)]


# ---------------------------------------------------------------- hosts

def host_to_dict(host):
    return {"id": host.id, "name": host.name, "state": host.state, "max_cpu": host.max_cpu,
            "max_mem": host.max_mem, "cpu_usage": host.cpu_usage, "mem_usage": host.mem_usage,
            "running_vms": host.running_vms, "monitoring": host.monitoring or {}, "ha": host.ha,
            "last_monitored_at": iso(host.last_monitored_at)}


def get_host(session, host_id, lock=False):
    host = session.get(Host, host_id, with_for_update=lock)
    if host is None:
        raise NotFound(f"host {host_id} does not exist")
    return host


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
    template = session.get(Template, template_id)
    if template is None:
        raise NotFound(f"template {template_id} does not exist")
    return template


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
