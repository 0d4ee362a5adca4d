"""What a VM holds while it is placed: its disks' images, its NICs' leases,
its context and OneGate token (issue 5).

- ``check_template`` (at create): the DISKs' images, the NICs' networks and
  asked-for IPs, the CONTEXT keys are checked, so most mistakes are refused
  before the VM exists.
- ``take`` (at deploy, in lifecycle.deploy's transaction): uses the images,
  leases the addresses, builds the driver spec's "disks", "nics", "context"
  and "token" and keeps them in ``vm_devices``, so that every later command
  carries the same values. What cannot be had now (no free lease, a
  persistent image in use) is a reason to wait, not an error: nothing is
  kept and the VM stays PENDING.
- ``release`` (at DONE and at recreate): gives all of it back.
- ``shown`` (``cirrus vm show``): what the VM holds now, as its owner reads it.

The token is HMAC-SHA256 over "<vm id>:<ISO start time>" with the platform
secret: ``gate.secret`` of the configuration, or else one generated once and
kept in the ``settings`` table. The start time is the deploy that took the
VM's devices; a VM stopped or undeployed and resumed keeps its devices, its
context CD and so its token (nothing rebuilds the CD then).
"""
import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, text

from cirrus import bulk, config, db
from cirrus.db.models import Image, VmDevices, utcnow
from cirrus.errors import CirrusError, FailedPrecondition, InvalidArgument
from cirrus.template import is_digits
from services.drivers.backend import disk_specs, disk_target, sections
from services.lifecycle import images, vnets

NOTHING = {"disks": [], "nics": [], "context": None, "token": None}
VOLATILE = ("swap", "fs")
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DEFAULT_ONEGATE_ENDPOINT = "http://127.0.0.1:5030"
# CONTEXT keys that steer how the context is built rather than go into it
CONTEXT_CONTROLS = ("TOKEN", "NETWORK")
YES = ("YES", "TRUE", "1")


def gate_setting(key, default=None):
    return (config.get().get("gate") or {}).get(key) or default


# ---------------------------------------------------------------- pure parts

def is_yes(value):
    return str(value or "").strip().upper() in YES


def size_mb(disk, where, required):
    raw = disk.get("SIZE")
    if raw in (None, ""):
        if required:
            raise InvalidArgument(f"{where} SIZE: a {disk.get('TYPE')} disk needs its size in MB")
        return None
    if not is_digits(str(raw)) or int(raw) <= 0:
        raise InvalidArgument(f"{where} SIZE: must be a whole number of MB above 0, got {raw!r}")
    return int(raw)


def volatile_disk(index, disk, where):
    """DISK=[TYPE=swap|fs, SIZE=MB]: made empty on the node."""
    kind = str(disk["TYPE"]).lower()
    return {"id": index, "type": kind, "source": None, "format": "raw", "clone": None,
            "size_mb": size_mb(disk, where, True), "target": disk_target(disk, index),
            "readonly": False, "save_as": None}


def image_disk(index, disk, image, where, save_as=None):
    """A DISK of a registered image: persistent images are used in place
    (ln), others cloned, as an overlay for qcow2, a full copy for raw."""
    clone = "ln" if image.persistent else ("overlay" if image.format == "qcow2" else "copy")
    return {"id": index, "type": "file", "source": image.path, "format": image.format,
            "clone": clone, "size_mb": size_mb(disk, where, False),
            "target": disk_target(disk, index), "readonly": is_yes(disk.get("READONLY")),
            "save_as": save_as, "image_id": image.id}


def disk_kind(disk, where):
    """"image", "volatile", or None for a DISK the node reads as it is (SOURCE/PATH)."""
    if not isinstance(disk, dict):
        raise InvalidArgument(f"{where}: must be a vector like [IMAGE=name]")
    if disk.get("IMAGE") not in (None, "") or disk.get("IMAGE_ID") not in (None, ""):
        return "image"
    if disk.get("TYPE") not in (None, ""):
        if str(disk["TYPE"]).lower() not in VOLATILE:
            raise InvalidArgument(f"{where} TYPE: must be swap or fs for a disk without an "
                                  f"image, got {disk['TYPE']!r}")
        return "volatile"
    return None


def nic_spec(index, nic, vnet, addresses, ar_attributes):
    """One entry of the driver spec's "nics"; the range's attributes win
    over the network's (as OpenNebula's AR attributes do)."""
    values = {**(vnet.template or {}), **(ar_attributes or {})}
    return {"id": index, "network": vnet.name, "network_id": vnet.id, "ip": addresses["ip"],
            "ip6": addresses["ip6"], "mac": addresses["mac"],
            "mask": values.get("NETWORK_MASK"), "gateway": values.get("GATEWAY"),
            "dns": values.get("DNS"), "model": nic.get("MODEL") or "virtio"}


def context_section(template):
    section = (template or {}).get("CONTEXT") or {}
    if isinstance(section, list):
        merged = {}
        for part in section:
            merged.update(part)
        section = merged
    return section


def check_context(template):
    """CONTEXT keys become shell variables of context.sh: refuse the ones
    that cannot be (values are the node's to quote)."""
    for key in context_section(template):
        if not SHELL_NAME.match(key):
            raise InvalidArgument(f"CONTEXT {key}: not a valid shell variable name "
                                  "(letters, digits and _, not starting with a digit)")


def context_keys(vm_id, name, template, nics, endpoint):
    """context.sh's values: the template's CONTEXT custom attributes, then
    what Cirrus computes (VMID, NAME, ETH<i>_*, ONEGATE_ENDPOINT), which wins."""
    section = context_section(template)
    out = {key: str(value) for key, value in section.items() if key not in CONTEXT_CONTROLS}
    out["TOKEN"] = "YES" if is_yes(section.get("TOKEN")) else "NO"
    out.update(VMID=str(vm_id), NAME=name, ONEGATE_ENDPOINT=endpoint)
    for nic in nics:
        prefix = f"ETH{nic['id']}_"
        for key, field in (("IP", "ip"), ("MAC", "mac"), ("MASK", "mask"),
                           ("GATEWAY", "gateway"), ("DNS", "dns"), ("IP6", "ip6")):
            if nic.get(field):
                out[prefix + key] = str(nic[field])
    return out


def vm_token(secret, vm_id, started_at):
    """The per-VM OneGate token: HMAC-SHA256 over "<vm id>:<start ISO>"."""
    message = f"{vm_id}:{started_at.isoformat()}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- the platform secret

SECRET = text("SELECT value FROM settings WHERE key = 'gate.secret'")


def platform_secret(session):
    """``gate.secret`` from the configuration, else the one kept in
    ``settings`` (made by whichever process needs it first). Read once per
    transaction of ``session``, never kept longer: after ``cirrus gate
    rotate-secret`` the next deploy makes tokens of the new secret."""
    configured = gate_setting("secret")
    if configured:
        return str(configured)
    transaction = session.get_transaction()
    held = session.info.get("gate.secret")
    if held is not None and held[0] is transaction:
        return held[1]
    secret = session.execute(SECRET).scalar()
    if secret is None:
        # made in a transaction of its own: a deploy that rolls back must not
        # take away a secret other processes may already be using
        with session.get_bind().begin() as conn:
            conn.execute(text("INSERT INTO settings (key, value) VALUES ('gate.secret', :value) "
                              "ON CONFLICT (key) DO NOTHING"), {"value": secrets.token_hex(32)})
            secret = conn.execute(SECRET).scalar_one()
    session.info["gate.secret"] = (transaction, secret)
    return secret


def rotate_platform_secret(session):
    """Replace the kept secret (``cirrus gate rotate-secret``) in the
    session's transaction: every token made with the old one fails at the
    gate from the commit on. FailedPrecondition if the configuration fixes
    it. Returns when the new one took over."""
    if gate_setting("secret"):
        raise FailedPrecondition("gate.secret is set in the configuration: change it there "
                                 "and restart lifecycle and the gate to rotate it")
    at = utcnow()
    session.execute(text("INSERT INTO settings (key, value) VALUES ('gate.secret', :value) "
                         "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"),
                    {"value": secrets.token_hex(32)})
    session.info.pop("gate.secret", None)
    return at


# ---------------------------------------------------------------- at create

def check_template(session, owner_id, template):
    """Refuse at create what can be known wrong now: unknown images or
    networks, a persistent image in use, an IP outside the network or taken,
    a bad volatile disk, a CONTEXT key that is no shell name."""
    for index, disk in enumerate(sections(template, "DISK")):
        where = f"DISK[{index}]"
        kind = disk_kind(disk, where)
        if kind == "volatile":
            volatile_disk(index, disk, where)
        elif kind == "image":
            image = images.find_image(session, owner_id, disk, where)
            size_mb(disk, where, False)
            if image.state in ("LOCKED", "ERROR"):
                raise FailedPrecondition(f"{where}: image {image.name!r} is {image.state}")
            users = images.image_users(session, image.id)
            if image.persistent and users:
                raise FailedPrecondition(f"{where}: persistent image {image.name!r} is used by "
                                         f"VM {users[0]}")
            if disk.get("SAVE_AS"):
                images.check_new_name(session, owner_id, disk["SAVE_AS"], f"{where} SAVE_AS")
        elif disk.get("SAVE_AS"):
            raise InvalidArgument(f"{where} SAVE_AS: only a disk of an image can be saved")
    for index, nic in enumerate(sections(template, "NIC")):
        where = f"NIC[{index}]"
        vnet = nic_network(session, nic, where)
        field, address = requested_address(nic)
        if address:
            vnets.check_requested_address(session, vnet, address, f"{where} {field}")
    check_context(template)


def requested_address(nic):
    """(field, address) a NIC asks for: IP, else IP6, else MAC; (None, None) if none."""
    for field in ("IP", "IP6", "MAC"):
        if nic.get(field):
            return field, str(nic[field])
    return None, None


def nic_network(session, nic, where):
    if not isinstance(nic, dict):
        raise InvalidArgument(f"{where}: must be a vector like [NETWORK=name]")
    if nic.get("NETWORK_ID") not in (None, ""):
        return vnets.find_vnet(session, nic["NETWORK_ID"], f"{where} NETWORK_ID")
    if nic.get("NETWORK") not in (None, ""):
        return vnets.find_vnet(session, nic["NETWORK"], f"{where} NETWORK")
    raise InvalidArgument(f"{where}: give NETWORK (a name) or NETWORK_ID")


# ---------------------------------------------------------------- at deploy and at the end

class Held:
    """A ``vm_devices`` row as a plain record (vm_id, disks, nics, context,
    token, started_at): deploys and driver results handle thousands at once."""

    def __init__(self, mapping):
        self.__dict__.update(mapping)


_held = VmDevices.__table__
HELD_COLUMNS = tuple(column.name for column in _held.c)
_INSERT_HELD = bulk.insert(_held, HELD_COLUMNS)


def known(session):
    """This transaction's view of ``vm_devices``: {vm_id: Held, or None for
    none}, with the rows taken or given back and not written yet (``write``)."""
    return db.per_transaction(session, "vm_devices",
                              lambda: {"rows": {}, "taken": {}, "given_back": set()})


def take(session, vm):
    """Take what ``vm`` needs for its placement; None when done (or already
    held: a stopped or undeployed VM keeps its devices), else the reason it
    must wait, with nothing kept. The row is written by ``write``."""
    if vm.resume_from and held_by(session, vm) is not None:
        return None     # only a resumed VM may still hold them: no query for the others
    try:
        held = build(session, vm)
    except (vnets.NoLease, images.ImageBusy, CirrusError) as why:
        vnets.release_leases(session, vm.id)
        images.forget_vm(session, vm.id)
        return str(why)
    view = known(session)
    view["rows"][vm.id] = view["taken"][vm.id] = held
    return None


def load(session, vm_ids):
    """Read the devices of ``vm_ids`` in one query, for ``held_by``."""
    db.read_missing(known(session)["rows"], vm_ids, lambda wanted: (
        (row.vm_id, Held(row._mapping))
        for row in session.execute(select(_held).where(_held.c.vm_id.in_(wanted)))))


def held_by(session, vm):
    """What ``vm`` holds (a Held), or None."""
    rows = known(session)["rows"]
    if vm.id not in rows:
        load(session, [vm.id])
    return rows[vm.id]


def write(session):
    """Write the devices taken and given back since the last write: one
    INSERT and one DELETE for all of them."""
    view = known(session)
    taken, given_back = view["taken"], view["given_back"]
    if given_back:
        session.execute(_held.delete().where(_held.c.vm_id.in_(sorted(given_back))))
    if taken:
        session.execute(_INSERT_HELD, bulk.params([{name: getattr(held, name)
                                                    for name in HELD_COLUMNS}
                                                   for held in taken.values()]))
    view["taken"], view["given_back"] = {}, set()


def forget(session):
    """Drop this transaction's view: a savepoint that took devices rolled back."""
    db.forget_per_transaction(session, "vm_devices")


def build(session, vm):
    template = vm.template or {}
    disks = []
    for index, disk in enumerate(sections(template, "DISK")):
        where = f"DISK[{index}]"
        kind = disk_kind(disk, where)
        if kind == "volatile":
            disks.append(volatile_disk(index, disk, where))
        elif kind == "image":
            image = images.find_image(session, vm.owner_id, disk, where)
            images.use_image(session, image, vm.id)
            disks.append((index, disk, image, where))
    nics = []
    for index, nic in enumerate(sections(template, "NIC")):
        vnet = nic_network(session, nic, f"NIC[{index}]")
        ar, idx = vnets.take_lease(session, vnet, vm.id, index, requested_address(nic)[1])
        nics.append(nic_spec(index, nic, vnet, vnets.address_at(ar, idx), ar.attributes))
    # SAVE_AS images last: everything that may make the VM wait is taken by now
    for position, entry in enumerate(disks):
        if isinstance(entry, tuple):
            index, disk, image, where = entry
            save_as = (images.save_as_image(session, image, vm, disk["SAVE_AS"], where).path
                       if disk.get("SAVE_AS") else None)
            disks[position] = image_disk(index, disk, image, where, save_as)
    started_at = utcnow()
    context = context_keys(vm.id, vm.name, template, nics,
                           gate_setting("endpoint", DEFAULT_ONEGATE_ENDPOINT))
    token = (vm_token(platform_secret(session), vm.id, started_at)
             if context["TOKEN"] == "YES" else None)
    return Held({"vm_id": vm.id, "disks": disks, "nics": nics, "context": context,
                 "token": token, "started_at": started_at})


def release(session, vm):
    """The VM is done (or starts over): free its leases and images. A VM
    holds some only while it has its vm_devices row (a VM that never left
    PENDING costs one lookup)."""
    held = held_by(session, vm)
    if held is None:
        return
    vnets.release_leases(session, vm.id)
    images.release_images(session, vm.id, set((vm.runtime or {}).get("saved") or ()))
    view = known(session)
    view["rows"][vm.id] = None
    if view["taken"].pop(vm.id, None) is None:     # written before: delete the row
        view["given_back"].add(vm.id)


def for_driver(session, vm):
    """The driver spec's "disks", "nics", "context" and "token" of a VM."""
    held = held_by(session, vm)
    if held is None:
        return dict(NOTHING)
    return {"disks": held.disks, "nics": held.nics, "context": held.context,
            "token": held.token}


def shown(session, vm):
    """What ``vm`` holds, for ``cirrus vm show``: "disks" (image, target, the
    file on the node once cloned, size), "nics" (network, IP, MAC...) and
    "context" (its values, the CD's path, whether it holds a token: never the
    token itself). Empty while it holds nothing (not placed yet, or DONE)."""
    held = held_by(session, vm)
    if held is None:
        return {"disks": [], "nics": [], "context": None}
    try:    # the template's SOURCE/PATH disks too, in the order the node made them
        disks = disk_specs({"id": vm.id, "template": vm.template, "disks": held.disks})
    except ValueError:
        disks = list(held.disks)
    runtime = vm.runtime or {}
    # clone reports each disk's file, in disk_specs order
    paths = runtime.get("disks") or []
    paths = paths if len(paths) == len(disks) else [None] * len(disks)
    image_ids = {disk["image_id"] for disk in disks if disk.get("image_id") is not None}
    images_by_id = {row.id: row for row in session.execute(
        select(Image.id, Image.name, Image.size_mb).where(Image.id.in_(image_ids)))}
    out = []
    for disk, path in zip(disks, paths):
        image = images_by_id.get(disk.get("image_id"))
        out.append({**disk, "image": image.name if image else None, "path": path,
                    "size_mb": disk.get("size_mb") or (image.size_mb if image else None)})
    context = None
    if held.context is not None:
        context = {"values": held.context, "path": runtime.get("context"),
                   "token": held.token is not None}
    return {"disks": out, "nics": list(held.nics), "context": context}
