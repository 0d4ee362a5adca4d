"""What the gate reads and writes in PostgreSQL, as plain functions over a
connection or a session.

Reads are a few indexed queries in SQL (the gate answers a guest's request
with one connection checkout and no ORM objects). Writes of a VM's user
template go in a transaction of the gate's outbox relay, so the change, its
``vm.updated`` event and the audit row commit together or not at all. ``Writes`` gathers
the writes of concurrent requests into one such transaction, applied
set-wise by ``apply_writes`` (lifecycle's ``user_template`` checks the
names and values; the event is the one its ``update`` sends).
"""
from dataclasses import dataclass

from sqlalchemy import Integer, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY

from cirrus import db, messages, outbox
from cirrus.db.models import utcnow
from cirrus.errors import FailedPrecondition
from services.gate.protocol import Conflict
from services.lifecycle import user_template
from services.requests import audit

_VM = """SELECT v.id, v.name, v.state, v.lcm_state, v.template, d.nics, d.started_at,
       d.token IS NOT NULL AS has_token, n.service_id
FROM vms v LEFT JOIN vm_devices d ON d.vm_id = v.id LEFT JOIN flow_nodes n ON n.vm_id = v.id
WHERE v.id = $1"""
# a service, its roles in order and their nodes (a role without nodes once)
_SERVICE = """SELECT s.id, s.name, s.state, r.id AS role_id, r.name AS role_name,
       r.state AS role_state, r.cardinality, n.vm_id, n.status, v.name AS vm_name
FROM flow_services s JOIN flow_roles r ON r.service_id = s.id
LEFT JOIN flow_nodes n ON n.role_id = r.id LEFT JOIN vms v ON v.id = n.vm_id
WHERE s.id = {id} ORDER BY r.position, n.vm_id"""
# Prepared once per connection (PostgreSQL parses and plans them once) and
# run on the pool's raw connections: a request's reads cost no ORM, no SQL
# compiling and, for GET /service, one round trip with the authentication.
PREPARED = {
    "gate_vm": ("integer", _VM),
    # the VM asking, with the stored secret
    "gate_caller": ("integer", f"""SELECT c.*,
       (SELECT value FROM settings WHERE key = 'gate.secret') AS secret FROM ({_VM}) c"""),
    # the same and its service's rows as JSON, for GET /service
    "gate_caller_service": ("integer", f"""SELECT c.*,
       (SELECT value FROM settings WHERE key = 'gate.secret') AS secret,
       (SELECT json_agg(x) FROM ({_SERVICE.format(id="c.service_id")}) x) AS service_rows
FROM ({_VM}) c"""),
    "gate_service": ("integer", _SERVICE.format(id="$1")),
    "gate_vms": ("integer[]", """SELECT v.id, v.name, v.state, v.lcm_state, v.template, d.nics
FROM vms v LEFT JOIN vm_devices d ON d.vm_id = v.id WHERE v.id = ANY($1)"""),
    "gate_role_names": ("integer",
                        "SELECT name FROM flow_roles WHERE service_id = $1 ORDER BY position"),
}


def prepare(dbapi_connection, _record=None):
    """The ``connect`` hook of the read pool: prepare PREPARED on a new connection."""
    with dbapi_connection.cursor() as cursor:
        for name, (types, sql) in PREPARED.items():
            cursor.execute(f"PREPARE {name}({types}) AS {sql}")
    if not dbapi_connection.autocommit:     # prepared statements outlive the transaction
        dbapi_connection.commit()


def rows(cursor, name, argument):
    """The rows of prepared statement ``name``, as dicts."""
    cursor.execute(f"EXECUTE {name}(%s)", (argument,))
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def first(cursor, name, argument):
    found = rows(cursor, name, argument)
    return found[0] if found else None


def caller(cursor, vm_id, with_service=False):
    """The VM asking, with its start, whether it holds a token, its service
    and the stored secret (and, ``with_service``, its service's rows as
    ``service_rows``); None if there is no such VM."""
    return first(cursor, "gate_caller_service" if with_service else "gate_caller", vm_id)


def vm(cursor, vm_id):
    return first(cursor, "gate_vm", vm_id)


def service(cursor, service_id, extended=False, service_rows=None):
    """(service, roles, {role id: [node...]}, {vm id: vm} or None); None if
    there is no such service (or it has no roles). ``service_rows``: the
    rows already read with the caller."""
    found = rows(cursor, "gate_service", service_id) if service_rows is None else service_rows
    if not found:
        return None
    roles, nodes = {}, {}
    for row in found:
        roles.setdefault(row["role_id"], {"id": row["role_id"], "name": row["role_name"],
                                          "state": row["role_state"],
                                          "cardinality": row["cardinality"]})
        if row["vm_id"] is not None:
            nodes.setdefault(row["role_id"], []).append(
                {"vm_id": row["vm_id"], "status": row["status"], "name": row["vm_name"]})
    vms = None
    if extended:
        ids = [n["vm_id"] for group in nodes.values() for n in group]
        vms = {row["id"]: row for row in rows(cursor, "gate_vms", ids)}
    return found[0], list(roles.values()), nodes, vms


def role_names(cursor, service_id):
    return [row["name"] for row in rows(cursor, "gate_role_names", service_id)]


def actor(caller_id):
    """Who the audit log says did it: the guest of the VM."""
    return {"name": f"vm:{caller_id}", "role": "guest"}


LOCK_VMS = text("""SELECT id, owner_id, seq, state, template -> 'USER_TEMPLATE' AS user_template
FROM vms WHERE id = ANY(:ids) ORDER BY id FOR UPDATE""").bindparams(
    bindparam("ids", type_=ARRAY(Integer)))
SET_USER_TEMPLATES = text("""UPDATE vms SET template = jsonb_set(vms.template, '{USER_TEMPLATE}',
       changed.user_template), updated_at = :at
FROM (SELECT unnest(CAST(:ids AS integer[])) AS id,
             unnest(CAST(:templates AS jsonb[])) AS user_template) AS changed
WHERE vms.id = changed.id""")


@dataclass
class Write:
    """One guest's change of a VM's user template: ``attrs`` merged in, or
    ``names`` erased."""
    caller_id: int
    vm_id: int
    route: str
    attrs: dict = None
    names: list = None


def apply_writes(session, writes):
    """Apply ``writes`` (in order) in the session's transaction with a
    fixed number of statements, whatever their number: the VMs are locked
    in id order, each write is applied to its VM's user template in
    memory, then one UPDATE stores them, one INSERT queues a ``vm.updated``
    event per VM changed (the payload of lifecycle's user_template.update)
    and one INSERT the audit rows, one per write. Returns, for each write,
    its VM's user template after it, or the GateError/CirrusError that
    refused it (the others still apply)."""
    ids = sorted({w.vm_id for w in writes})
    vms = {row["id"]: dict(row) for row in session.execute(LOCK_VMS, {"ids": ids}).mappings()}
    templates, outcomes = {}, []
    for write in writes:
        vm = vms.get(write.vm_id)
        if vm is None:
            outcomes.append(Conflict(f"VM {write.vm_id} no longer exists"))
            continue
        if vm["state"] == "DONE":
            outcomes.append(FailedPrecondition(f"VM {write.vm_id} is DONE: its template can "
                                               "no longer change"))
            continue
        current = templates.setdefault(write.vm_id, dict(vm["user_template"] or {}))
        if write.names is not None:
            erased = {name: current.pop(name) for name in write.names if name in current}
            audit.record(session, actor(write.caller_id), "gate.vm.erase", "vm", write.vm_id,
                         route=write.route, erased=erased)
        else:
            current.update(user_template.checked_attributes(write.attrs))
            audit.record(session, actor(write.caller_id), "gate.vm.update", "vm", write.vm_id,
                         route=write.route, set=write.attrs)
        outcomes.append(dict(current))
    if templates:
        at = utcnow()
        changed = sorted(templates)
        session.execute(SET_USER_TEMPLATES, {
            "ids": changed, "templates": [db.to_json(templates[i]) for i in changed], "at": at})
        outbox.add_many(session, [outbox.event_row(messages.LIFECYCLE, messages.VM_UPDATED, {
            "id": i, "owner_id": vms[i]["owner_id"], "seq": vms[i]["seq"],
            "user_template": templates[i], "at": at.isoformat()}) for i in changed])
    session.flush()
    return outcomes


class Writes:
    """Group commit of user template writes: a request hands its ``Write``
    over and waits; one green thread applies what has gathered with
    ``apply_writes`` in one transaction of the outbox relay. So one commit,
    a handful of statements and one wait for the broker's confirms serve
    many requests."""

    def __init__(self, relay, batch=500):
        self.relay, self.batch = relay, batch
        self.waiting, self.running = [], False

    def run(self, write):
        import eventlet.event
        done = eventlet.event.Event()
        self.waiting.append((write, done))
        if not self.running:
            self.running = True
            eventlet.spawn_n(self.drain)
        return done.wait()

    def drain(self):
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:self.batch], self.waiting[self.batch:]
                self.commit(batch)
        finally:
            self.running = False

    def commit(self, batch):
        try:
            with self.relay.transaction() as session:
                outcomes = apply_writes(session, [write for write, _ in batch])
        except Exception as exc:             # the transaction failed: so did every write
            outcomes = [exc] * len(batch)
        for (_write, done), outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                done.send_exception(outcome)
            else:
                done.send(outcome)


def record(session_factory, caller_id, action, kind, object_id, **details):
    """An audit row for a write made through another service (a scale, a VM action)."""
    with session_factory() as session, session.begin():
        audit.record(session, actor(caller_id), action, kind, object_id, **details)
