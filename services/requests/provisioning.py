"""Provisioning requests: a request's life, written to the database at every step.

    submit ──> (process runs to its first wait) ──> WAITING ──decide──> ... ──> APPROVED
                                                                      └──> REJECTED
    APPROVED ──(requests calls lifecycle or flow)──> PROVISIONED | FAILED

Each function works in the caller's transaction; the requests service calls
lifecycle or flow between two of them. Every change appends to the audit log
and sends a ``request.state`` event (through the outbox); the end of a request
also queues a CMDB record.
"""
import statistics

from sqlalchemy import func, select, text

from cirrus import config, outbox
from cirrus.db import iso
from cirrus.db.models import (ProcessVersion, ProvisionRequest, QuotaCharge, RequestStep, User,
                              utcnow)
from cirrus.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.requests import approvals, audit, cmdb, quotas

SOURCE = "requests"
REQUEST_STATE = "request.state"
STATES = ("WAITING", "APPROVED", "PROVISIONED", "REJECTED", "FAILED")
FINISHED = ("PROVISIONED", "REJECTED", "FAILED")
# roles that see every request (approvers must see what waits for them)
SEE_ALL = ("admin",) + approvals.APPROVER_ROLES
DEFAULT_PROCESS = config.REPO_ROOT / "deploy" / "processes" / "provision.bpmn"
LIST_LIMIT = 1000


# ----------------------------------------------------------------- process versions

def version_dict(version, with_bpmn=False):
    out = {"id": version.id, "process_id": version.process_id, "sha256": version.sha256,
           "loaded_by": version.loaded_by, "loaded_at": version.loaded_at.isoformat()}
    if with_bpmn:
        out["bpmn"] = version.bpmn
    return out


def current_version(session):
    """The process in force: the newest loaded, or the shipped file, loaded
    now if none ever was (under a lock, so concurrent first requests agree)."""
    version = session.scalar(select(ProcessVersion).order_by(ProcessVersion.id.desc()).limit(1))
    if version is not None:
        return version
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext('cirrus.process_versions'))"))
    version = session.scalar(select(ProcessVersion).order_by(ProcessVersion.id.desc()).limit(1))
    if version is None:
        version = add_version(session, DEFAULT_PROCESS.read_text(), None)
    return version


def add_version(session, bpmn, loaded_by):
    process_id, _ = approvals.parse(bpmn)      # refuses what cannot run, before any write
    version = ProcessVersion(process_id=process_id, bpmn=bpmn, sha256=approvals.digest(bpmn),
                             loaded_by=loaded_by, loaded_at=utcnow())
    session.add(version)
    session.flush()
    return version


def load_process(session, bpmn, actor):
    if not isinstance(bpmn, str) or not bpmn.strip():
        raise InvalidArgument("bpmn: the file is empty")
    previous = current_version(session)
    version = add_version(session, bpmn, actor["name"])
    audit.record(session, actor, "process.loaded", "process", version.id,
                 process_id=version.process_id, sha256=version.sha256,
                 replaces=previous.id)
    return version_dict(version)


# ----------------------------------------------------------------- requests

def find(session, request_id, lock=False):
    query = select(ProvisionRequest).where(ProvisionRequest.id == request_id)
    req = session.scalar(query.with_for_update() if lock else query)
    if req is None:
        raise NotFound(f"request {request_id} does not exist")
    return req


def find_by_client_id(session, owner_id, client_request_id):
    if not client_request_id:
        return None
    return session.scalar(select(ProvisionRequest).where(
        ProvisionRequest.owner_id == owner_id,
        ProvisionRequest.client_request_id == client_request_id))


def visible(user, req):
    """Users see their own requests; administrators and approvers all."""
    if user["role"] not in SEE_ALL and req.owner_id != user["id"]:
        raise NotFound(f"request {req.id} does not exist")
    return req


def submit(session, user, kind, spec, data, need=None, client_request_id=None):
    """A new request: charge its quotas (RESOURCE_EXHAUSTED refuses it whole),
    start its process, and write where it stands. Returns the request row."""
    version = current_version(session)
    workflow = approvals.start(version.bpmn, data)
    req = ProvisionRequest(owner_id=user["id"], kind=kind, spec=spec, data=data,
                           process_version_id=version.id, workflow="", state="WAITING",
                           client_request_id=client_request_id, vm_ids=[],
                           created_at=utcnow(), updated_at=utcnow())
    session.add(req)
    session.flush()
    if need is not None:
        # a service's VMs are held as one charge until flow makes them
        quotas.charge(session, "service" if kind == "flow" else "vm",
                      quotas.scopes_of(session, user["id"]), need, request_id=req.id)
    audit.record(session, user, "request.submitted", "request", req.id, kind=kind,
                 process_version=version.id, vcpu=data.get("vcpu"), memory=data.get("memory"))
    advance(session, req, workflow)
    return req


def advance(session, req, workflow):
    """Write where the workflow now stands: the steps it waits at, or its end."""
    now = utcnow()
    req.workflow = approvals.dumps(workflow)
    req.updated_at = now
    waits = approvals.waiting(workflow)
    open_steps = {(s.step, s.role) for s in session.scalars(select(RequestStep).where(
        RequestStep.request_id == req.id, RequestStep.left_at.is_(None)))}
    for _, step, role in waits:
        if (step, role) not in open_steps:
            session.add(RequestStep(request_id=req.id, step=step, role=role, entered_at=now))
            audit.record(session, None, "request.waiting", "request", req.id, step=step,
                         role=role)
    req.step = ", ".join(step for _, step, _ in waits) or None
    req.waiting_for = ", ".join(role for _, _, role in waits) or None
    result = approvals.outcome(workflow)
    if result == "approved":
        req.state = "APPROVED"
        audit.record(session, None, "request.approved", "request", req.id)
    elif result == "rejected":
        req.state = "REJECTED"
        req.reason = workflow.data.get("reason") or "rejected"
        quotas.release_request(session, req.id)
        cmdb.enqueue(session, cmdb_record(session, req))
    elif not waits:
        raise InvalidArgument("the approval process stopped without waiting for an approval "
                              "or reaching an end")
    notify(session, req)


def decide(session, user, request_id, approve, reason):
    """An approval or rejection by ``user``, who must hold the role the
    request waits for. Returns the request row."""
    req = visible(user, find(session, request_id, lock=True))
    if req.state != "WAITING":
        raise FailedPrecondition(f"request {req.id} is {req.state}: it waits for no decision")
    workflow = approvals.loads(req.workflow)
    waits = approvals.waiting(workflow)
    mine = [(task, step, role) for task, step, role in waits if role == user["role"]]
    if not mine:
        roles = ", ".join(role for _, _, role in waits)
        decided = session.scalar(select(RequestStep).where(
            RequestStep.request_id == req.id, RequestStep.role == user["role"],
            RequestStep.decision.is_not(None)))
        if decided is not None:
            raise FailedPrecondition(f"request {req.id}: {user['role']} already "
                                     f"{decided.decision} it; it now waits for {roles}")
        raise PermissionDenied(f"request {req.id} waits for {roles}; you are {user['role']}")
    reason = (reason or "").strip()
    if not approve and not reason:
        raise InvalidArgument("reason: say why the request is rejected")
    task, step, role = mine[0]
    decision = "approved" if approve else "rejected"
    approvals.decide(workflow, task, approve, reason, user["name"])
    opened = session.scalar(select(RequestStep).where(
        RequestStep.request_id == req.id, RequestStep.step == step, RequestStep.role == role,
        RequestStep.left_at.is_(None)))
    if opened is not None:
        opened.left_at, opened.decision = utcnow(), decision
        opened.decided_by, opened.reason = user["name"], reason or None
    audit.record(session, user, f"request.{decision}", "request", req.id, reason or None,
                 step=step, role=role)
    advance(session, req, workflow)
    return req


def provisioned(session, request_id, vm_ids=(), service_id=None):
    """Link what the request made, and count it as the charge's resource."""
    req = find(session, request_id, lock=True)
    if req.state == "PROVISIONED":
        return req
    req.state, req.updated_at = "PROVISIONED", utcnow()
    req.vm_ids, req.service_id = list(vm_ids), service_id
    req.step = req.waiting_for = None
    if vm_ids:
        for charge_id in session.scalars(select(QuotaCharge.id).where(
                QuotaCharge.request_id == req.id)):
            quotas.attach(session, charge_id, vm_ids[0])
    audit.record(session, None, "request.provisioned", "request", req.id,
                 vm_ids=list(vm_ids), service_id=service_id)
    cmdb.enqueue(session, cmdb_record(session, req))
    notify(session, req)
    return req


def failed(session, request_id, reason):
    req = find(session, request_id, lock=True)
    if req.state in FINISHED:
        return req
    req.state, req.reason, req.updated_at = "FAILED", reason, utcnow()
    quotas.release_request(session, req.id)
    audit.record(session, None, "request.failed", "request", req.id, reason)
    cmdb.enqueue(session, cmdb_record(session, req))
    notify(session, req)
    return req


def stuck_approved(session, older_than):
    """Approved requests whose provisioning has not been seen to end (the
    requests service stopped in between): their ids, to provision again."""
    return session.scalars(select(ProvisionRequest.id).where(
        ProvisionRequest.state == "APPROVED", ProvisionRequest.updated_at < older_than)
        .order_by(ProvisionRequest.id).limit(100)).all()


def decisions(session, request_id):
    return [{"step": s.step, "role": s.role, "decision": s.decision,
             "decided_by": s.decided_by, "reason": s.reason,
             "entered_at": s.entered_at.isoformat(),
             "left_at": iso(s.left_at)}
            for s in session.scalars(select(RequestStep).where(
                RequestStep.request_id == request_id).order_by(RequestStep.id))]


def cmdb_record(session, req):
    owner = session.scalar(select(User.name).where(User.id == req.owner_id))
    return {"type": "provision_request", "request_id": req.id, "kind": req.kind,
            "state": req.state, "owner": owner, "vm_ids": list(req.vm_ids or []),
            "service_id": req.service_id, "reason": req.reason,
            "vcpu": req.data.get("vcpu"), "memory": req.data.get("memory"),
            "name": (req.spec.get("allocate") or {}).get("name") or req.spec.get("name"),
            "decisions": decisions(session, req.id), "at": utcnow().isoformat()}


def notify(session, req):
    outbox.add_event(session, SOURCE, REQUEST_STATE, {
        "id": req.id, "owner_id": req.owner_id, "state": req.state, "step": req.step,
        "waiting_for": req.waiting_for, "reason": req.reason, "vm_ids": list(req.vm_ids or []),
        "service_id": req.service_id, "at": utcnow().isoformat()})


# ----------------------------------------------------------------- reading

def request_dict(session, req, history=False):
    owner = session.scalar(select(User.name).where(User.id == req.owner_id))
    data = req.data or {}
    out = {"id": req.id, "kind": req.kind, "owner": owner, "owner_id": req.owner_id,
           "state": req.state, "step": req.step, "waiting_for": req.waiting_for,
           "reason": req.reason, "vm_ids": list(req.vm_ids or []), "service_id": req.service_id,
           "process_version": req.process_version_id, "vcpu": data.get("vcpu"),
           "memory": data.get("memory"),
           "name": (req.spec.get("allocate") or {}).get("name") or req.spec.get("name"),
           "created_at": req.created_at.isoformat(), "updated_at": req.updated_at.isoformat()}
    if history:
        out["decisions"] = decisions(session, req.id)
        out["history"] = audit.entries(session, "request", req.id)
    return out


def list_requests(session, user, waiting_for=None, state=None, mine=False):
    query = select(ProvisionRequest).order_by(ProvisionRequest.id).limit(LIST_LIMIT)
    if user["role"] not in SEE_ALL or mine:
        query = query.where(ProvisionRequest.owner_id == user["id"])
    if waiting_for:
        query = query.where(ProvisionRequest.state == "WAITING",
                            ProvisionRequest.waiting_for.contains(waiting_for))
    if state:
        if state.upper() not in STATES:
            raise InvalidArgument(f"state: unknown request state {state!r}; choose from "
                                  f"{', '.join(STATES)}")
        query = query.where(ProvisionRequest.state == state.upper())
    return [request_dict(session, r) for r in session.scalars(query)]


def median_waits(steps, now):
    """{(step, role): median seconds} over waits, an open one counting up to ``now``."""
    waits = {}
    for step, role, entered, left in steps:
        waits.setdefault((step, role), []).append(((left or now) - entered).total_seconds())
    return {key: statistics.median(values) for key, values in waits.items()}


def stats(session, user):
    """Counts per state and per step waited at now, and the median time
    spent waiting at each step (decided waits, and open ones so far)."""
    owner = None if user["role"] in SEE_ALL else user["id"]
    counted = select(ProvisionRequest.state, func.count()).group_by(ProvisionRequest.state)
    waiting = select(ProvisionRequest.step, ProvisionRequest.waiting_for, func.count()) \
        .where(ProvisionRequest.state == "WAITING") \
        .group_by(ProvisionRequest.step, ProvisionRequest.waiting_for)
    steps = select(RequestStep.step, RequestStep.role, RequestStep.entered_at,
                   RequestStep.left_at).join(ProvisionRequest,
                                             ProvisionRequest.id == RequestStep.request_id)
    if owner is not None:
        counted = counted.where(ProvisionRequest.owner_id == owner)
        waiting = waiting.where(ProvisionRequest.owner_id == owner)
        steps = steps.where(ProvisionRequest.owner_id == owner)
    rows = session.execute(steps).all()
    medians = median_waits(rows, utcnow())
    now_waiting = {(step, role): n for step, role, n in session.execute(waiting).all()}
    decided = {}
    for step, role, _, left in rows:
        decided[(step, role)] = decided.get((step, role), 0) + (left is not None)
    return {"states": {s: 0 for s in STATES} | dict(session.execute(counted).all()),
            "steps": [{"step": step, "role": role, "waiting": now_waiting.get((step, role), 0),
                       "decided": decided.get((step, role), 0),
                       "median_wait_seconds": round(medians[(step, role)], 3)}
                      for step, role in sorted(medians)]}
