"""What the gate reads from PostgreSQL and writes through lifecycle's own
functions, as plain functions over a connection or a session.

Reads are a few indexed queries in SQL (the gate answers a guest's request
with one connection checkout and no ORM objects). Writes of a VM's user
template go through ``services.lifecycle.user_template.update`` in a
transaction of the gate's outbox relay, so the change, its ``vm.updated``
event and the audit row commit together or not at all.
"""
from sqlalchemy import Integer, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY

from cirrus.db.models import VirtualMachine
from services.gate.protocol import Conflict
from services.lifecycle import user_template
from services.requests import audit

_VM = """SELECT v.id, v.name, v.state, v.lcm_state, v.template, d.nics, d.started_at,
       d.token IS NOT NULL AS has_token, n.service_id{extra}
FROM vms v LEFT JOIN vm_devices d ON d.vm_id = v.id LEFT JOIN flow_nodes n ON n.vm_id = v.id
WHERE v.id = :id"""
CALLER = text(_VM.format(
    extra=",\n       (SELECT value FROM settings WHERE key = 'gate.secret') AS secret"))
VM = text(_VM.format(extra=""))
SERVICE = text("SELECT id, name, state FROM flow_services WHERE id = :id")
ROLES = text("SELECT id, name, state, cardinality FROM flow_roles WHERE service_id = :id "
             "ORDER BY position")
ROLE_NAMES = text("SELECT name FROM flow_roles WHERE service_id = :id ORDER BY position")
NODES = text("""SELECT n.vm_id, n.role_id, n.status, v.name FROM flow_nodes n
JOIN vms v ON v.id = n.vm_id WHERE n.service_id = :id ORDER BY n.vm_id""")
VMS = text("""SELECT v.id, v.name, v.state, v.lcm_state, v.template, d.nics
FROM vms v LEFT JOIN vm_devices d ON d.vm_id = v.id WHERE v.id = ANY(:ids)""").bindparams(
    bindparam("ids", type_=ARRAY(Integer)))


def caller(conn, vm_id):
    """The VM asking, with its start, whether it holds a token, its service
    and the stored secret; None if there is no such VM."""
    row = conn.execute(CALLER, {"id": vm_id}).mappings().first()
    return dict(row) if row else None


def vm(conn, vm_id):
    row = conn.execute(VM, {"id": vm_id}).mappings().first()
    return dict(row) if row else None


def service(conn, service_id, extended=False):
    """(service, roles, {role id: [node...]}, {vm id: vm} or None)."""
    found = conn.execute(SERVICE, {"id": service_id}).mappings().first()
    if found is None:
        return None
    roles = conn.execute(ROLES, {"id": service_id}).mappings().all()
    nodes = {}
    for node in conn.execute(NODES, {"id": service_id}).mappings():
        nodes.setdefault(node["role_id"], []).append(node)
    vms = None
    if extended:
        ids = [n["vm_id"] for group in nodes.values() for n in group]
        vms = {row["id"]: row for row in conn.execute(VMS, {"ids": ids}).mappings()}
    return found, roles, nodes, vms


def role_names(conn, service_id):
    return list(conn.execute(ROLE_NAMES, {"id": service_id}).scalars())


def actor(caller_id):
    """Who the audit log says did it: the guest of the VM."""
    return {"name": f"vm:{caller_id}", "role": "guest"}


def set_attributes(relay, caller_id, target_id, attrs, route):
    """Merge ``attrs`` into the target VM's user template; audited. Returns
    the user template after."""
    with relay.transaction() as session:
        changed = user_template.update(session, target_id, attrs)
        audit.record(session, actor(caller_id), "gate.vm.update", "vm", target_id,
                     route=route, set=attrs)
        return dict(changed.template[user_template.KEY])


def erase_attributes(relay, caller_id, target_id, names, route):
    """Erase ``names`` from the target VM's user template (those it has);
    audited with what was there. Returns the user template after."""
    with relay.transaction() as session:
        found = session.get(VirtualMachine, target_id, with_for_update=True)
        if found is None:
            raise Conflict(f"VM {target_id} no longer exists")
        current = user_template.user_template(found)
        erased = {name: current[name] for name in names if name in current}
        kept = {key: value for key, value in current.items() if key not in erased}
        changed = user_template.update(session, target_id, kept, replace=True)
        audit.record(session, actor(caller_id), "gate.vm.erase", "vm", target_id,
                     route=route, erased=erased)
        return dict(changed.template[user_template.KEY])


def record(session_factory, caller_id, action, kind, object_id, **details):
    """An audit row for a write made through another service (a scale, a VM action)."""
    with session_factory() as session, session.begin():
        audit.record(session, actor(caller_id), action, kind, object_id, **details)
