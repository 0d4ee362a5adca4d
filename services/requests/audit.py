"""The audit trail: one append-only row per request, decision and
provisioning result (the database refuses UPDATE and DELETE on it)."""
from sqlalchemy import select

from cirrus.db.models import AuditEntry

LIST_LIMIT = 1000


def record(session, actor, action, object_kind, object_id, reason=None, **details):
    """Append an entry; ``actor`` is the caller's dict ({"name", "role"}), or
    None for Cirrus itself."""
    session.add(AuditEntry(actor=actor["name"] if actor else "cirrus",
                           actor_role=actor["role"] if actor else None, action=action,
                           object_kind=object_kind,
                           object_id=None if object_id is None else str(object_id),
                           reason=reason, details=details))


def entry_dict(entry):
    return {"id": entry.id, "at": entry.at.isoformat(), "actor": entry.actor,
            "actor_role": entry.actor_role, "action": entry.action,
            "object_kind": entry.object_kind, "object_id": entry.object_id,
            "reason": entry.reason, "details": entry.details or {}}


def entries(session, object_kind=None, object_id=None, actor=None, after_id=None,
            limit=LIST_LIMIT):
    """Entries in the order they were written, optionally of one object or
    actor, after ``after_id`` (to page through an export)."""
    query = select(AuditEntry).order_by(AuditEntry.id).limit(max(1, min(limit, LIST_LIMIT)))
    if object_kind:
        query = query.where(AuditEntry.object_kind == object_kind)
    if object_id is not None:
        query = query.where(AuditEntry.object_id == str(object_id))
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if after_id:
        query = query.where(AuditEntry.id > after_id)
    return [entry_dict(e) for e in session.scalars(query)]
