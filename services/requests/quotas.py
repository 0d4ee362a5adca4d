"""Quotas per user and per group: VMs, virtual CPUs, memory (MB) and images.

A charge adds to the ``*_used`` counters of every quota it falls under (the
owner's, and each of the owner's groups') with one conditional UPDATE per
quota row: ``used + need <= limit`` is checked by the database as it adds, so
two requests at once cannot both slip under a limit; the loser's transaction
rolls back what it had charged. A ``quota_charges`` row remembers what was
charged where, so a release (a rejection, a failed provisioning, the VM
reaching DONE, the image deleted) gives back exactly that, once. A service's
VMs are charged one by one as flow makes them, out of what its request held.
"""
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert

from cirrus.db.models import Group, GroupMember, Quota, QuotaCharge, User, utcnow
from cirrus.errors import InvalidArgument, NotFound, ResourceExhausted

RESOURCES = ("vms", "cpu", "memory", "images")
UNITS = {"vms": "VMs", "cpu": "vCPUs", "memory": "MB of memory", "images": "images"}
SCOPES = ("user", "group")
_quotas = Quota.__table__


def need_of(vms=0, cpu=0, memory=0, images=0):
    """What a charge takes, as {resource: amount}."""
    return {"vms": int(vms), "cpu": int(cpu), "memory": int(memory), "images": int(images)}


def overruns(limits, used, need):
    """The resources ``need`` would take over their limit: a list of
    (resource, limit, used, need, over) where over = used + need - limit.
    A limit of None is no limit."""
    found = []
    for resource in RESOURCES:
        limit, amount = limits.get(resource), need.get(resource, 0)
        if limit is None or amount <= 0:
            continue
        over = used.get(resource, 0) + amount - limit
        if over > 0:
            found.append((resource, limit, used.get(resource, 0), amount, over))
    return found


def overrun_message(label, overrun):
    resource, limit, used, amount, over = overrun
    unit = UNITS[resource]
    return (f"{label} quota of {resource} exceeded by {over}: {limit} {unit} allowed, "
            f"{used} in use, this request needs {amount}")


def check_limits(limits):
    """Limits as given to set_limits: each a whole number >= 0, or None
    (-1 given by the CLI) for no limit; unknown names refused."""
    unknown = set(limits) - set(RESOURCES)
    if unknown:
        raise InvalidArgument(f"quota: unknown resource {', '.join(sorted(unknown))}; "
                              f"choose from {', '.join(RESOURCES)}")
    out = {}
    for resource, value in limits.items():
        if value is None or value == -1:
            out[resource] = None
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{resource}: a quota is a whole number, 0 or more "
                                  f"(-1: no limit), got {value!r}")
        out[resource] = value
    return out


def scopes_of(session, user_id):
    """The quotas a user's resources count against: theirs, then each of
    their groups' (sorted, so concurrent charges lock rows in one order)."""
    group_ids = session.scalars(select(GroupMember.group_id)
                                .where(GroupMember.user_id == user_id)
                                .order_by(GroupMember.group_id)).all()
    return [["user", user_id]] + [["group", gid] for gid in group_ids]


def _ensure_rows(session, scopes):
    session.execute(insert(_quotas).values([{"scope": s, "subject_id": i} for s, i in scopes])
                    .on_conflict_do_nothing(index_elements=["scope", "subject_id"]))


def label_of(session, scope, subject_id):
    model = User if scope == "user" else Group
    name = session.scalar(select(model.name).where(model.id == subject_id))
    return f"{scope} {name or subject_id}'s"


def charge(session, kind, scopes, need, request_id=None, resource_id=None):
    """Count ``need`` against every quota of ``scopes`` or refuse with
    RESOURCE_EXHAUSTED naming the quota and by how much; returns the
    QuotaCharge row (in ``session``'s transaction)."""
    _take(session, scopes, need)
    row = QuotaCharge(kind=kind, request_id=request_id, resource_id=resource_id,
                      scopes=scopes, **need)
    session.add(row)
    session.flush()
    return row


def _take(session, scopes, need):
    """Add ``need`` to the counters of ``scopes``, each only if it fits
    (RESOURCE_EXHAUSTED otherwise; the caller's transaction, or savepoint,
    drops what was added before the refusal)."""
    _ensure_rows(session, scopes)
    for scope, subject_id in scopes:
        fits = [or_(_quotas.c[r].is_(None), _quotas.c[f"{r}_used"] + need[r] <= _quotas.c[r])
                for r in RESOURCES if need.get(r)]
        done = session.execute(
            update(_quotas)
            .where(_quotas.c.scope == scope, _quotas.c.subject_id == subject_id, and_(*fits))
            .values({f"{r}_used": _quotas.c[f"{r}_used"] + need[r] for r in RESOURCES
                     if need.get(r)})
            .returning(_quotas.c.id)).first()
        if done is None:
            row = session.execute(select(_quotas).where(_quotas.c.scope == scope,
                                                        _quotas.c.subject_id == subject_id)).one()
            found = overruns({r: row._mapping[r] for r in RESOURCES},
                             {r: row._mapping[f"{r}_used"] for r in RESOURCES}, need)
            label = label_of(session, scope, subject_id)
            raise ResourceExhausted("; ".join(overrun_message(label, o) for o in found))


def _give(session, scopes, need):
    """Take ``need`` off the counters of ``scopes`` (never below 0)."""
    if not any(need.get(r) for r in RESOURCES):
        return
    for scope, subject_id in scopes:
        session.execute(
            update(_quotas).where(_quotas.c.scope == scope, _quotas.c.subject_id == subject_id)
            .values({f"{r}_used": func.greatest(_quotas.c[f"{r}_used"] - need[r], 0)
                     for r in RESOURCES if need.get(r)}))


def times(need, count):
    return {r: need.get(r, 0) * count for r in RESOURCES}


# A service's VMs (OneFlow): its request holds a "service" charge for the VMs it
# starts with, attached to the service once flow made it. Flow charges each VM
# as it makes it (kind vm, like any VM, so DONE releases it): taken out of that
# reservation while it lasts (the counters do not move), then against the
# quotas themselves (a scale up). The remainder of a reservation is released
# when the service first runs, or ends.

def charge_service_vms(session, owner_id, service_id, need, count):
    """Count ``count`` VMs of ``need`` each for the service: from its
    reservation first, the rest against the owner's quotas (RESOURCE_EXHAUSTED
    if they do not fit; the caller runs this in a savepoint). Returns the
    scopes charged, for service_vms_made."""
    held = session.scalar(select(QuotaCharge).where(
        QuotaCharge.kind == "service", QuotaCharge.resource_id == service_id,
        QuotaCharge.released_at.is_(None)).with_for_update())
    covered = 0
    if held is not None:
        covered = min([count] + [getattr(held, r) // need[r] for r in RESOURCES if need.get(r)])
        for resource, amount in times(need, covered).items():
            setattr(held, resource, getattr(held, resource) - amount)
    scopes = held.scopes if held is not None else scopes_of(session, owner_id)
    if count > covered:
        _take(session, scopes, times(need, count - covered))
    return scopes


def held_for(session, request_id):
    """The id of the charge a service request holds for its VMs, or None."""
    return session.scalar(select(QuotaCharge.id).where(QuotaCharge.request_id == request_id,
                                                       QuotaCharge.kind == "service"))


def service_vms_made(session, scopes, need, vm_ids, failed=0):
    """One VM charge per VM made (each released at its DONE), and the
    share of the VMs that could not be made given back."""
    if vm_ids:
        session.add_all([QuotaCharge(kind="vm", resource_id=vm_id, scopes=scopes, **need)
                         for vm_id in vm_ids])
    _give(session, scopes, times(need, failed))


def attach(session, charge_id, resource_id):
    """Name the VM, image or service a charge became, for release_resource."""
    session.execute(update(QuotaCharge).where(QuotaCharge.id == charge_id)
                    .values(resource_id=resource_id))


def release(session, charge_id):
    """Give back what a charge took, once; returns whether it did now."""
    charged = session.execute(
        update(QuotaCharge).where(QuotaCharge.id == charge_id, QuotaCharge.released_at.is_(None))
        .values(released_at=utcnow()).returning(QuotaCharge)).scalar_one_or_none()
    if charged is None:
        return False
    _give(session, charged.scopes, {r: getattr(charged, r) for r in RESOURCES})
    return True


def release_resource(session, kind, resource_id):
    """Release the charge of a VM or an image; returns the QuotaCharge
    released now, or None (none, or released before)."""
    charge_id = session.scalar(select(QuotaCharge.id).where(
        QuotaCharge.kind == kind, QuotaCharge.resource_id == resource_id,
        QuotaCharge.released_at.is_(None)))
    if charge_id is not None and release(session, charge_id):
        return session.get(QuotaCharge, charge_id)
    return None


def release_request(session, request_id):
    for charge_id in session.scalars(select(QuotaCharge.id).where(
            QuotaCharge.request_id == request_id, QuotaCharge.released_at.is_(None))).all():
        release(session, charge_id)


def set_limits(session, scope, subject_id, limits):
    """Change some limits of a user's or group's quota; the others stay."""
    limits = check_limits(limits)
    if not limits:
        raise InvalidArgument("quota: give at least one of " + ", ".join(RESOURCES))
    _ensure_rows(session, [[scope, subject_id]])
    session.execute(update(_quotas).where(_quotas.c.scope == scope,
                                          _quotas.c.subject_id == subject_id).values(limits))
    return get(session, scope, subject_id)


def get(session, scope, subject_id):
    """{"scope", "subject_id", "name", "limits": {...}, "used": {...}}."""
    if scope not in SCOPES:
        raise InvalidArgument(f"scope: {scope!r}; choose user or group")
    model = User if scope == "user" else Group
    name = session.scalar(select(model.name).where(model.id == subject_id))
    if name is None:
        raise NotFound(f"{scope} {subject_id} does not exist")
    row = session.execute(select(_quotas).where(_quotas.c.scope == scope,
                                                _quotas.c.subject_id == subject_id)).first()
    values = row._mapping if row is not None else {}
    return {"scope": scope, "subject_id": subject_id, "name": name,
            "limits": {r: values.get(r) for r in RESOURCES},
            "used": {r: values.get(f"{r}_used", 0) for r in RESOURCES}}


def forget(session, scope, subject_id):
    """Remove the quota of a deleted user or group."""
    session.execute(_quotas.delete().where(_quotas.c.scope == scope,
                                           _quotas.c.subject_id == subject_id))
