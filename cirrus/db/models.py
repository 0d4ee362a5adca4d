"""The database schema: the single source of truth for every service."""
from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
    UniqueConstraint, func, text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow():
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(32), default="user")   # admin | cloud-admin | finance | user
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)   # sha256 of the token
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Cluster(Base):
    """A set of hosts. Its template's keys are attributes of each of its hosts
    for the scheduler; RESERVED_CPU/RESERVED_MEM apply to hosts that set none."""
    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    template: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Host(Base):
    """A hypervisor node. Capacity is in OpenNebula's units: CPU in percent of
    a core (4 cores = 400), memory in MB. *_usage is what VMs have allocated."""
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=True, index=True)
    # KEY=VALUE set by `cirrus host update`: attributes for SCHED_REQUIREMENTS and
    # SCHED_RANK, PRIORITY (the fixed policy), RESERVED_CPU, RESERVED_MEM
    template: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    # RESERVED_CPU/RESERVED_MEM in effect (the host's, else its cluster's), kept
    # here so that the reservation UPDATE compares against MAX - RESERVED in SQL
    reserved_cpu: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reserved_mem: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # INIT (never heard from), MONITORED, ERROR (stopped reporting), DISABLED (no new VMs),
    # OFFLINE (taken out of service: no new VMs, not monitored)
    state: Mapped[str] = mapped_column(String(16), default="INIT")
    # what happens to its VMs when the host fails: none, or reschedule (recreate elsewhere)
    ha: Mapped[str] = mapped_column(String(16), default="none", server_default="none")
    max_cpu: Mapped[int] = mapped_column(Integer, default=0)
    max_mem: Mapped[int] = mapped_column(Integer, default=0)
    cpu_usage: Mapped[int] = mapped_column(Integer, default=0)
    mem_usage: Mapped[int] = mapped_column(Integer, default=0)
    running_vms: Mapped[int] = mapped_column(Integer, default=0)
    monitoring: Mapped[dict] = mapped_column(JSONB, default=dict)
    last_monitored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # bumped by a trigger (migration 0010) when what the scheduler derives the
    # host's attributes from changes, so schedulers re-read only changed hosts
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class VirtualMachine(Base):
    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("owner_id", "request_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    lcm_state: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer, default=0)    # bumped at every transition
    cpu: Mapped[float] = mapped_column(Float)
    vcpu: Mapped[int] = mapped_column(Integer)
    memory: Mapped[int] = mapped_column(Integer)             # MB
    template: Mapped[dict] = mapped_column(JSONB, default=dict)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), nullable=True, index=True)
    # the destination while migrating; its capacity is reserved until the VM arrives
    target_host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    # STOPPED or UNDEPLOYED: a resumed VM, PENDING again, whose next deploy restores it
    resume_from: Mapped[str] = mapped_column(String(16), nullable=True)
    # set by resched: the scheduler should move this RUNNING VM to a better host
    resched: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # what drivers reported that later commands need (vm_dir, checkpoint...)
    runtime: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    # the latest VM metrics (CPU %, MEMORY KB, NETRX...) and a short series of them
    monitoring: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    metrics: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    monitored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    deploy_id: Mapped[str] = mapped_column(String(128), nullable=True)
    command_id: Mapped[str] = mapped_column(String(36), nullable=True)  # driver command in flight
    error: Mapped[str] = mapped_column(Text, nullable=True)            # last driver failure
    sched_message: Mapped[str] = mapped_column(Text, nullable=True)    # why it is not placed
    # the caller's request id: a create that is redelivered or retried finds its VM
    request_id: Mapped[str] = mapped_column(String(64), nullable=True)
    # the request of the last action on it: batched work logs the VM under it (cirrus.tracing)
    last_request_id: Mapped[str] = mapped_column(String(64), nullable=True)
    # the VM group it belongs to, and its role there (placement affinity rules)
    vmgroup_id: Mapped[int] = mapped_column(ForeignKey("vm_groups.id"), nullable=True, index=True)
    vmgroup_role: Mapped[str] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class VmHistory(Base):
    """One row per transition: what was done, from where, to where, on which host."""
    __tablename__ = "vm_history"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str] = mapped_column(String(32), nullable=True)
    to_status: Mapped[str] = mapped_column(String(32))
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    message: Mapped[str] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Template(Base):
    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    body: Mapped[dict] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class VmGroup(Base):
    """OpenNebula's VM group: roles, each with HOST_AFFINED / HOST_ANTI_AFFINED
    host ids and a POLICY among its own VMs, and AFFINED / ANTI_AFFINED rules
    between roles. ``roles``: [{"name", "policy", "host_affined", "host_anti_affined"}];
    ``rules``: [{"policy": "AFFINED" | "ANTI_AFFINED", "roles": [names]}]."""
    __tablename__ = "vm_groups"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    roles: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    rules: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Outbox(Base):
    """Messages written in the transaction that caused them, published after commit."""
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    exchange: Mapped[str] = mapped_column(String(128))
    routing_key: Mapped[str] = mapped_column(String(256))
    # JSON text, not jsonb: written once, read back once as text (migration 0011)
    payload: Mapped[dict] = mapped_column(JSON)
    headers: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# ---------------------------------------------------------------- storage and networks (issue 5)

class Datastore(Base):
    """Where disks live. IMAGE: a directory on the front end holding registered
    images. SYSTEM: a node's directory of running VMs (``host_id``: that node)."""
    __tablename__ = "datastores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    type: Mapped[str] = mapped_column(String(16))           # IMAGE | SYSTEM
    path: Mapped[str] = mapped_column(Text)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Image(Base):
    """A registered disk image. ``state`` is READY, LOCKED while a VM's disk
    is being saved into it (SAVE_AS) or ERROR when that failed; a READY image
    with rows in image_users is shown USED (a persistent one has at most one)."""
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    datastore_id: Mapped[int] = mapped_column(ForeignKey("datastores.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))          # qcow2 | raw
    size_mb: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="READY")
    persistent: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # SAVE_AS: the VM whose disk becomes this image when it terminates
    saved_from_vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"), nullable=True)
    error: Mapped[str] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ImageUser(Base):
    """A VM using an image. Taking one is an INSERT (concurrent deploys of one
    image never wait for each other); ``exclusive`` rows (persistent images)
    are unique per image, so a second VM's INSERT finds the conflict."""
    __tablename__ = "image_users"
    __table_args__ = (Index("image_users_exclusive", "image_id", unique=True,
                            postgresql_where=text("exclusive")),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"), primary_key=True, index=True)
    exclusive: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class VirtualNetwork(Base):
    """A virtual network; ``template`` holds GATEWAY, DNS, NETWORK_MASK... as given."""
    __tablename__ = "vnets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    template: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AddressRange(Base):
    """One address range of a network: ``size`` addresses from ``mac`` (and
    ``ip`` / ``ip6`` / the SLAAC ``ip6_prefix``). ``next_index`` is the
    round-robin cursor: leases are looked for from there on."""
    __tablename__ = "address_ranges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vnet_id: Mapped[int] = mapped_column(ForeignKey("vnets.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(16))   # IP4 | IP6 | IP6_STATIC | IP4_6 | ETHER
    size: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(17))
    ip: Mapped[str] = mapped_column(String(15), nullable=True)
    ip6: Mapped[str] = mapped_column(String(39), nullable=True)          # IP6_STATIC start
    ip6_prefix: Mapped[str] = mapped_column(String(39), nullable=True)   # SLAAC /64
    prefix_length: Mapped[int] = mapped_column(Integer, nullable=True)
    next_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    attributes: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")


class Lease(Base):
    """One address of a range, ``idx`` from its start: free (no vm_id, not
    held), on hold (``hold``, OpenNebula's owner -1), or a VM's NIC. Every
    address has its row, so taking one is an UPDATE of a free row."""
    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("ar_id", "idx"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ar_id: Mapped[int] = mapped_column(ForeignKey("address_ranges.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"), nullable=True, index=True)
    nic_id: Mapped[int] = mapped_column(Integer, nullable=True)
    hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class VmDevices(Base):
    """What a deployed VM holds, computed when it was placed and sent with
    every driver command: the driver spec's disks, nics, context and token.
    Deleted when the VM gives them back (DONE, recreate)."""
    __tablename__ = "vm_devices"
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    disks: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    nics: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    context: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    token: Mapped[str] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Setting(Base):
    """Platform values made once and kept (the OneGate token secret)."""
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# ---------------------------------------------------------------- OneFlow (issue 6)
# Multi-VM services (services/flow/). The flow service owns these tables; VMs
# stay lifecycle's, and a node is only the link from a role to one of them.

class FlowTemplate(Base):
    """A service template: OneFlow's JSON as given (unknown keys kept)."""
    __tablename__ = "flow_templates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    body: Mapped[dict] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FlowService(Base):
    """A service made from a template. ``body`` is the template as it was at
    instantiate; ``custom_attrs`` and ``networks`` the values given then.
    ``request_id``: the caller's, so an instantiate repeated after a crash
    finds the service the first one made."""
    __tablename__ = "flow_services"
    __table_args__ = (UniqueConstraint("owner_id", "request_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    template_id: Mapped[int] = mapped_column(
        ForeignKey("flow_templates.id", ondelete="SET NULL"), nullable=True)
    body: Mapped[dict] = mapped_column(JSONB)
    state: Mapped[str] = mapped_column(String(32), index=True)
    custom_attrs: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    networks: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")
    message: Mapped[str] = mapped_column(Text, default="", server_default="")
    # recover --delete: its VMs are dropped wherever they are, not shut down
    deleting: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    request_id: Mapped[str] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FlowRole(Base):
    """A role of a service: its definition (``body``), state and cardinality.
    ``step_started_at``: when its current wait on VMs began (the step time
    limit); ``policy_state``: elasticity periods counted and scheduled
    policies' next times; ``vm_count``: VMs ever made (names, request ids)."""
    __tablename__ = "flow_roles"
    __table_args__ = (UniqueConstraint("service_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("flow_services.id", ondelete="CASCADE"),
                                            index=True)
    name: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer, default=0)
    body: Mapped[dict] = mapped_column(JSONB)
    state: Mapped[str] = mapped_column(String(32))
    cardinality: Mapped[int] = mapped_column(Integer, default=0)
    vm_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    released: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    message: Mapped[str] = mapped_column(Text, default="", server_default="")
    step_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    cooldown_until: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    policy_state: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")


class FlowNode(Base):
    """A VM of a role. ``disposing``: the service asked it gone (scale down,
    undeploy), ``dispose_seq`` the VM's seq right after that; ``status`` and
    ``ready`` are the VM's as last seen (for listings)."""
    __tablename__ = "flow_nodes"
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True)
    role_id: Mapped[int] = mapped_column(ForeignKey("flow_roles.id", ondelete="CASCADE"),
                                         index=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("flow_services.id", ondelete="CASCADE"),
                                            index=True)
    status: Mapped[str] = mapped_column(String(32), default="PENDING")
    ready: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    disposing: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    dispose_seq: Mapped[int] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FlowLog(Base):
    """What happened to a service, as `flow show` lists it."""
    __tablename__ = "flow_logs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("flow_services.id", ondelete="CASCADE"),
                                            index=True)
    severity: Mapped[str] = mapped_column(String(8))          # I | W | E
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# ---------------------------------------------------------------- Request management (issue 8)
# Users' groups, quotas, provisioning requests run by a BPMN process, the audit
# trail and the CMDB outbox (services/requests/). The requests service owns these.

class Group(Base):
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class GroupMember(Base):
    __tablename__ = "group_members"
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"),
                                          primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         primary_key=True, index=True)


class Quota(Base):
    """The limits of one user or group (None: no limit) and what it holds now.
    ``cpu`` counts virtual CPUs, ``memory`` MB. Charged and released by one
    conditional UPDATE each, so two requests cannot both slip under a limit."""
    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("scope", "subject_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))              # user | group
    subject_id: Mapped[int] = mapped_column(Integer)
    vms: Mapped[int] = mapped_column(Integer, nullable=True)
    cpu: Mapped[int] = mapped_column(Integer, nullable=True)
    memory: Mapped[int] = mapped_column(Integer, nullable=True)
    images: Mapped[int] = mapped_column(Integer, nullable=True)
    vms_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cpu_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    memory_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    images_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class QuotaCharge(Base):
    """What one request or image holds against which quotas (``scopes``:
    [[scope, subject_id]...]), so it is released once, exactly as charged.
    ``resource_id``: the VM (kind vm) or image (kind image) it became."""
    __tablename__ = "quota_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # vm | image | service (a service's VMs held from its request until flow makes them)
    kind: Mapped[str] = mapped_column(String(8))
    request_id: Mapped[int] = mapped_column(
        ForeignKey("provision_requests.id", ondelete="SET NULL"), nullable=True, index=True)
    resource_id: Mapped[int] = mapped_column(Integer, nullable=True)
    scopes: Mapped[list] = mapped_column(JSONB, default=list)
    vms: Mapped[int] = mapped_column(Integer, default=0)
    cpu: Mapped[int] = mapped_column(Integer, default=0)
    memory: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    released_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (Index("ix_quota_charges_kind_resource", "kind", "resource_id"),)


class ProcessVersion(Base):
    """A BPMN file as loaded; the newest is in force for new requests."""
    __tablename__ = "process_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    process_id: Mapped[str] = mapped_column(String(128))
    bpmn: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    loaded_by: Mapped[str] = mapped_column(String(128), nullable=True)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProvisionRequest(Base):
    """A request to make a VM (kind vm, template) or a service (flow). ``spec``:
    what to make once approved; ``data``: the process variables; ``workflow``:
    the SpiffWorkflow state, written at every step. WAITING -> APPROVED ->
    PROVISIONED, or REJECTED, or FAILED (provisioning refused)."""
    __tablename__ = "provision_requests"
    __table_args__ = (UniqueConstraint("owner_id", "client_request_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict] = mapped_column(JSONB)
    data: Mapped[dict] = mapped_column(JSONB)
    process_version_id: Mapped[int] = mapped_column(ForeignKey("process_versions.id"))
    workflow: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str] = mapped_column(String(128), nullable=True)       # the task waiting
    waiting_for: Mapped[str] = mapped_column(String(32), nullable=True, index=True)  # its role
    reason: Mapped[str] = mapped_column(Text, nullable=True)       # why rejected or failed
    vm_ids: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    service_id: Mapped[int] = mapped_column(Integer, nullable=True)
    client_request_id: Mapped[str] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RequestStep(Base):
    """One wait of a request at a user task: when it began and ended, and
    the decision that ended it."""
    __tablename__ = "request_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(
        ForeignKey("provision_requests.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    entered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    left_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    decision: Mapped[str] = mapped_column(String(16), nullable=True)   # approved | rejected
    decided_by: Mapped[str] = mapped_column(String(128), nullable=True)
    reason: Mapped[str] = mapped_column(Text, nullable=True)


class AuditEntry(Base):
    """The audit trail: append-only (a trigger refuses UPDATE and DELETE).
    Names, not foreign keys, so it outlives the users it mentions."""
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                         index=True)
    actor: Mapped[str] = mapped_column(String(128), nullable=True)
    actor_role: Mapped[str] = mapped_column(String(32), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    object_kind: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, nullable=True)
    details: Mapped[dict] = mapped_column(JSONB, default=dict, server_default="{}")


class CmdbOutbox(Base):
    """CMDB records not yet accepted by the sink; retried with backoff."""
    __tablename__ = "cmdb_outbox"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    record: Mapped[dict] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                      server_default=func.now())
    last_error: Mapped[str] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Instance(Base):
    """A running process as last heard from its heartbeat (`cirrus status`).
    ``beat`` counts a process's heartbeats, so a late one never overwrites a
    newer one; ``queues``/``hosts`` hold at most a sample, the counts are whole."""
    __tablename__ = "instances"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    service: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    beat: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stopped_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics_url: Mapped[str] = mapped_column(String(255), nullable=True)
    queues: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    queue_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    hosts: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")   # node workers
    host_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
