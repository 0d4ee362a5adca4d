"""Virtual networks: address ranges, MACs and leases (REFERENCE.md section 6).

The first part is pure address arithmetic: reading an address range (AR) as
a template gives it, the address at an index of a range, and overlap checks.
The second part keeps networks in the database.

Leases: every address of a range has its row in ``leases``, so taking one
is an UPDATE of a free row picked with ``FOR UPDATE SKIP LOCKED``: two
deploys never take the same address and never wait for each other (no
deadlock between batches that take leases in different orders). The search
starts at the range's cursor (``next_index``) and wraps around, so addresses
are handed out round-robin; the cursor is only advanced when nobody else
holds its row, since it is a hint, not what keeps leases apart.
"""
import ipaddress
import secrets

from sqlalchemy import func, select, text

from cirrus.db import get_row, iso
from cirrus.db.models import AddressRange, Lease, VirtualNetwork
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.lifecycle.images import find_named

AR_TYPES = ("IP4", "IP6", "IP6_STATIC", "IP4_6", "ETHER")
WITH_IP4 = ("IP4", "IP4_6")
WITH_SLAAC = ("IP6", "IP4_6")
DEFAULT_MAC_PREFIX = "02:00"
# every address of a range is a row: a bound keeps one range from filling the database
MAX_RANGE_SIZE = 1 << 20
MAC_SPACE = 1 << 48


class NoLease(Exception):
    """A NIC cannot get its address now; the VM waits (PENDING) with this reason."""


# ---------------------------------------------------------------- addresses (pure)

def mac_to_int(mac):
    return int(mac.replace(":", ""), 16)


def int_to_mac(value):
    digits = f"{value:012x}"
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def mac_of_ip4(ip, prefix=DEFAULT_MAC_PREFIX):
    """OpenNebula's MAC for an IPv4 address: the 2-byte prefix, then the 4 octets."""
    return int_to_mac((mac_to_int(prefix) << 32) | int(ipaddress.IPv4Address(ip)))


def eui64(mac):
    """The 64-bit interface id of a MAC (RFC 4291): ff:fe in the middle and
    the universal/local bit flipped."""
    octets = bytes.fromhex(mac.replace(":", ""))
    return int.from_bytes(bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:],
                          "big")


def slaac(prefix, mac):
    """The SLAAC address of ``mac`` in the /64 ``prefix`` (e.g. "2001:db8::")."""
    network = ipaddress.IPv6Network(f"{ipaddress.IPv6Address(prefix)}/64", strict=False)
    return str(ipaddress.IPv6Address(int(network.network_address) | eui64(mac)))


def _field(where, name):
    return f"{where} {name}" if where else name


def _size_of(ar, where):
    raw = ar.get("SIZE")
    if raw in (None, ""):
        raise InvalidArgument(f"{_field(where, 'SIZE')}: is required")
    try:
        size = int(str(raw))
    except ValueError:
        raise InvalidArgument(f"{_field(where, 'SIZE')}: must be a whole number, got {raw!r}") \
            from None
    if size <= 0:
        raise InvalidArgument(f"{_field(where, 'SIZE')}: must be at least 1, got {size}")
    if size > MAX_RANGE_SIZE:
        raise InvalidArgument(f"{_field(where, 'SIZE')}: at most {MAX_RANGE_SIZE} addresses "
                              f"per range, got {size}")
    return size


def _address_of(ar, key, where, kind=ipaddress.IPv6Address):
    """The IPv4Address or IPv6Address (``kind``) an AR gives under ``key``."""
    raw = ar.get(key)
    if not raw:
        raise InvalidArgument(f"{_field(where, key)}: is required for {ar.get('TYPE')} ranges")
    try:
        return kind(str(raw))
    except ValueError:
        family = "IPv4" if kind is ipaddress.IPv4Address else "IPv6"
        raise InvalidArgument(f"{_field(where, key)}: not an {family} address: {raw!r}") from None


def _mac_of(raw, name, where):
    digits = str(raw).replace(":", "").replace("-", "")
    if len(digits) != 12 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise InvalidArgument(f"{_field(where, name)}: not a MAC address: {raw!r}")
    return int(digits, 16)


def parse_range(ar, where="", mac_prefix=DEFAULT_MAC_PREFIX):
    """Check an AR as a template gives it (TYPE, SIZE, IP, MAC, IP6,
    GLOBAL_PREFIX, PREFIX_LENGTH) and return its normalised form: a dict of
    the AddressRange columns. Errors name the field (``where`` says which AR)."""
    if not isinstance(ar, dict):
        raise InvalidArgument(f"{where or 'AR'}: must be a vector like "
                              "[TYPE=IP4, IP=..., SIZE=...]")
    kind = str(ar.get("TYPE") or "").upper()
    if kind not in AR_TYPES:
        raise InvalidArgument(f"{_field(where, 'TYPE')}: must be one of {', '.join(AR_TYPES)}, "
                              f"got {ar.get('TYPE')!r}")
    size = _size_of(ar, where)
    out = {"type": kind, "size": size, "ip": None, "ip6": None, "ip6_prefix": None,
           "prefix_length": None}
    known = {"TYPE", "SIZE", "IP", "MAC", "IP6", "GLOBAL_PREFIX", "PREFIX_LENGTH"}
    out["attributes"] = {k: v for k, v in ar.items() if k not in known}
    if kind in WITH_IP4:
        start = _address_of(ar, "IP", where, ipaddress.IPv4Address)
        if int(start) + size > 1 << 32:
            raise InvalidArgument(f"{_field(where, 'SIZE')}: {size} addresses from {start} "
                                  "go past 255.255.255.255")
        out["ip"] = str(start)
    if kind in WITH_SLAAC:
        prefix = _address_of(ar, "GLOBAL_PREFIX", where)
        if int(prefix) & ((1 << 64) - 1):
            raise InvalidArgument(f"{_field(where, 'GLOBAL_PREFIX')}: must be a /64 prefix "
                                  f"(its last 64 bits zero), got {prefix}")
        out["ip6_prefix"] = str(prefix)
    if kind == "IP6_STATIC":
        start = _address_of(ar, "IP6", where)
        if int(start) + size > 1 << 128:
            raise InvalidArgument(f"{_field(where, 'SIZE')}: {size} addresses from {start} "
                                  "go past the end of the IPv6 space")
        out["ip6"] = str(start)
        raw_length = ar.get("PREFIX_LENGTH") or "64"
        try:
            length = int(str(raw_length))
        except ValueError:
            length = -1
        if not 1 <= length <= 128:
            raise InvalidArgument(f"{_field(where, 'PREFIX_LENGTH')}: must be 1 to 128, "
                                  f"got {raw_length!r}")
        out["prefix_length"] = length
    if ar.get("MAC"):
        first_mac = _mac_of(ar["MAC"], "MAC", where)
    elif kind in WITH_IP4:
        first_mac = mac_to_int(mac_of_ip4(out["ip"], mac_prefix))
    else:
        # no IPv4 to build it from: a random start under the prefix, as OpenNebula does
        first_mac = (mac_to_int(mac_prefix) << 32) | secrets.randbelow((1 << 32) - size)
    if first_mac + size > MAC_SPACE:
        raise InvalidArgument(f"{_field(where, 'MAC')}: {size} MACs from "
                              f"{int_to_mac(first_mac)} go past ff:ff:ff:ff:ff:ff")
    out["mac"] = int_to_mac(first_mac)
    return out


def address_at(ar, idx):
    """The addresses of lease ``idx`` of a range (a parse_range dict or an
    AddressRange): {"mac", "ip", "ip6"}, ip/ip6 None where the type has none."""
    ar = range_values(ar)
    mac = int_to_mac(mac_to_int(ar["mac"]) + idx)
    ip = str(ipaddress.IPv4Address(ar["ip"]) + idx) if ar["ip"] else None
    if ar["ip6_prefix"]:
        ip6 = slaac(ar["ip6_prefix"], mac)
    elif ar["ip6"]:
        ip6 = str(ipaddress.IPv6Address(ar["ip6"]) + idx)
    else:
        ip6 = None
    return {"mac": mac, "ip": ip, "ip6": ip6}


def index_of(ar, address):
    """The lease index of an IPv4, IPv6 or MAC address in a range, or None
    when the address is not in it."""
    ar = range_values(ar)
    address = str(address).strip()
    candidates = []
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        parsed = None
    if isinstance(parsed, ipaddress.IPv4Address) and ar["ip"]:
        candidates.append(int(parsed) - int(ipaddress.IPv4Address(ar["ip"])))
    elif isinstance(parsed, ipaddress.IPv6Address) and ar["ip6"]:
        candidates.append(int(parsed) - int(ipaddress.IPv6Address(ar["ip6"])))
    elif isinstance(parsed, ipaddress.IPv6Address) and ar["ip6_prefix"]:
        candidates.extend(_slaac_index(ar, parsed))
    elif parsed is None and len(address.replace(":", "").replace("-", "")) == 12:
        try:
            candidates.append(_mac_of(address, "MAC", "") - mac_to_int(ar["mac"]))
        except InvalidArgument:
            pass
    for idx in candidates:
        if 0 <= idx < ar["size"]:
            return idx
    return None


def _slaac_index(ar, address):
    """The index whose SLAAC address is ``address``: undo the EUI-64."""
    network = ipaddress.IPv6Network(f"{ar['ip6_prefix']}/64", strict=False)
    if address not in network:
        return []
    interface = int(address) & ((1 << 64) - 1)
    raw = interface.to_bytes(8, "big")
    if raw[3:5] != b"\xff\xfe":
        return []
    mac = bytes([raw[0] ^ 0x02]) + raw[1:3] + raw[5:]
    return [int.from_bytes(mac, "big") - mac_to_int(ar["mac"])]


def range_values(ar):
    if isinstance(ar, dict):
        return ar
    return {"type": ar.type, "size": ar.size, "mac": ar.mac, "ip": ar.ip, "ip6": ar.ip6,
            "ip6_prefix": ar.ip6_prefix, "prefix_length": ar.prefix_length}


def spans(ar):
    """The address spans a range occupies: (field, first, last) for its MACs,
    IPv4 and static IPv6 addresses (SLAAC addresses follow the MACs)."""
    ar = range_values(ar)
    size = ar["size"]
    out = []
    if ar["ip"]:
        first = int(ipaddress.IPv4Address(ar["ip"]))
        out.append(("IP", first, first + size - 1))
    if ar["ip6"]:
        first = int(ipaddress.IPv6Address(ar["ip6"]))
        out.append(("IP6", first, first + size - 1))
    # last: the MACs of IPv4 ranges follow their IPs, so an IP clash names IP
    out.append(("MAC", mac_to_int(ar["mac"]), mac_to_int(ar["mac"]) + size - 1))
    return out


def overlap(new, existing):
    """The first clash of range ``new`` with any of ``existing`` as a message
    naming the field, or None."""
    for field, first, last in spans(new):
        for index, other in existing:
            for other_field, other_first, other_last in spans(other):
                if field == other_field and first <= other_last and other_first <= last:
                    return (f"{field}: the range overlaps address range {index} "
                            f"of the network")
    return None


def check_ranges(ranges, mac_prefix=DEFAULT_MAC_PREFIX):
    """parse_range for each of a network's ARs, refusing overlaps between them."""
    parsed = []
    for position, ar in enumerate(ranges):
        where = f"AR[{position}]"
        one = parse_range(ar, where, mac_prefix)
        clash = overlap(one, parsed)
        if clash:
            raise InvalidArgument(f"{where} {clash}")
        parsed.append((position, one))
    return [one for _, one in parsed]


# ---------------------------------------------------------------- networks

def mac_prefix(template):
    prefix = (template or {}).get("MAC_PREFIX") or DEFAULT_MAC_PREFIX
    _mac_of(f"{prefix}:00:00:00:00", "MAC_PREFIX", "")
    return prefix


def ranges_of(template):
    """The AR vectors of a network template, as a list, and the rest of it."""
    rest = dict(template or {})
    ranges = rest.pop("AR", [])
    return ([ranges] if isinstance(ranges, dict) else list(ranges)), rest


def get_vnet(session, vnet_id, lock=False):
    return get_row(session, VirtualNetwork, vnet_id, "virtual network", lock)


def find_vnet(session, ref, where="NETWORK"):
    """A network by id (int or digits) or name; NotFound naming ``where``."""
    return find_named(session, VirtualNetwork, ref, "virtual network", where)


def create_vnet(session, owner_id, name, template):
    """A network from its template (NAME, GATEWAY, DNS, NETWORK_MASK,
    MAC_PREFIX..., and AR vectors). Every range is checked before anything
    is written."""
    ranges, rest = ranges_of(template)
    name = (name or rest.get("NAME") or "").strip()
    if not name:
        raise InvalidArgument("name: give --name or a NAME in the template")
    parsed = check_ranges(ranges, mac_prefix(rest))
    if session.scalar(select(VirtualNetwork.id).where(VirtualNetwork.name == name)) is not None:
        raise AlreadyExists(f"virtual network {name!r} already exists")
    vnet = VirtualNetwork(name=name, owner_id=owner_id, template=rest)
    session.add(vnet)
    session.flush()
    for one in parsed:
        insert_range(session, vnet, one)
    return vnet


def insert_range(session, vnet, parsed):
    ar = AddressRange(vnet_id=vnet.id, next_index=0, **parsed)
    session.add(ar)
    session.flush()
    # one row per address, made by the database in one statement
    session.execute(text("INSERT INTO leases (ar_id, idx) SELECT :ar, generate_series(0, :last)"),
                    {"ar": ar.id, "last": ar.size - 1})
    return ar


def vnet_ranges(session, vnet_id):
    return session.scalars(select(AddressRange).where(AddressRange.vnet_id == vnet_id)
                           .order_by(AddressRange.id)).all()


def add_range(session, vnet_id, ar):
    """addar: one more range, refused if it overlaps one the network has."""
    vnet = get_vnet(session, vnet_id, lock=True)   # one addar/rmar at a time per network
    one = parse_range(ar, "AR", mac_prefix(vnet.template))
    clash = overlap(one, [(r.id, r) for r in vnet_ranges(session, vnet.id)])
    if clash:
        raise InvalidArgument(f"AR {clash}")
    insert_range(session, vnet, one)
    return vnet


def remove_range(session, vnet_id, ar_id):
    """rmar: refused while any address of the range is leased or on hold."""
    vnet = get_vnet(session, vnet_id, lock=True)
    ar = session.get(AddressRange, ar_id)
    if ar is None or ar.vnet_id != vnet.id:
        raise NotFound(f"ar_id: network {vnet.name!r} has no address range {ar_id}")
    # free rows go first; a lease being taken right now is waited for and kept
    session.execute(text("DELETE FROM leases WHERE ar_id = :ar AND vm_id IS NULL AND NOT hold"),
                    {"ar": ar.id})
    left = session.scalar(select(func.count()).select_from(Lease).where(Lease.ar_id == ar.id))
    if left:
        raise FailedPrecondition(f"address range {ar_id} of network {vnet.name!r} has {left} "
                                 "leases in use or on hold; release them first")
    session.delete(ar)
    return vnet


def delete_vnet(session, vnet_id):
    vnet = get_vnet(session, vnet_id, lock=True)
    used = session.execute(
        select(Lease.vm_id).join(AddressRange, AddressRange.id == Lease.ar_id)
        .where(AddressRange.vnet_id == vnet.id, Lease.vm_id.is_not(None))
        .with_for_update(of=Lease)).scalars().all()
    if used:
        raise FailedPrecondition(f"virtual network {vnet.name!r} has {len(used)} leases in use "
                                 f"(VMs {', '.join(map(str, sorted(set(used))))}); "
                                 "terminate them first")
    out = vnet_to_dict(session, vnet)
    session.delete(vnet)
    return out


def locate(session, vnet, address, where="IP"):
    """(range, index) of an address of ``vnet``; InvalidArgument when no range holds it."""
    for ar in vnet_ranges(session, vnet.id):
        idx = index_of(ar, address)
        if idx is not None:
            return ar, idx
    raise InvalidArgument(f"{where}: {address} is not in any address range of network "
                          f"{vnet.name!r}")


def lease_row(session, ar, idx, lock=False):
    query = select(Lease).where(Lease.ar_id == ar.id, Lease.idx == idx)
    return session.scalar(query.with_for_update() if lock else query)


def hold(session, vnet_id, address):
    """Put a free address on hold (OpenNebula's owner -1): no VM gets it."""
    vnet = get_vnet(session, vnet_id)
    ar, idx = locate(session, vnet, address, "address")
    lease = lease_row(session, ar, idx, lock=True)
    if lease.vm_id is not None:
        raise FailedPrecondition(f"{address} of network {vnet.name!r} is leased to VM "
                                 f"{lease.vm_id}")
    if lease.hold:
        raise FailedPrecondition(f"{address} of network {vnet.name!r} is already on hold")
    lease.hold = True
    return vnet


def release(session, vnet_id, address):
    """Give back an address put on hold."""
    vnet = get_vnet(session, vnet_id)
    ar, idx = locate(session, vnet, address, "address")
    lease = lease_row(session, ar, idx, lock=True)
    if not lease.hold:
        raise FailedPrecondition(f"{address} of network {vnet.name!r} is not on hold")
    lease.hold = False
    return vnet


def taken_reason(lease, address, vnet):
    kind = "IP" if is_ip(address) else "MAC"
    if lease.hold:
        return f"{kind} {address} of network {vnet.name!r} is on hold"
    return f"{kind} {address} of network {vnet.name!r} is taken by VM {lease.vm_id}"


def is_ip(address):
    try:
        ipaddress.ip_address(str(address))
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- leases of VMs

FREE_FROM = text("""
    SELECT id, idx FROM leases
    WHERE ar_id = :ar AND vm_id IS NULL AND NOT hold AND idx >= :start AND idx < :stop
    ORDER BY idx LIMIT 1 FOR UPDATE SKIP LOCKED""")
TAKE = text("UPDATE leases SET vm_id = :vm, nic_id = :nic WHERE id = :id")
TAKE_ADDRESS = text("""
    UPDATE leases SET vm_id = :vm, nic_id = :nic
    WHERE ar_id = :ar AND idx = :idx AND vm_id IS NULL AND NOT hold RETURNING id""")
# the cursor is a hint: skip it if another deploy is moving it right now
ADVANCE = text("""
    UPDATE address_ranges SET next_index = :next
    WHERE id = (SELECT id FROM address_ranges WHERE id = :ar FOR UPDATE SKIP LOCKED)""")


def take_lease(session, vnet, vm_id, nic_id, address=None):
    """Lease an address of ``vnet`` to NIC ``nic_id`` of a VM: ``address`` if
    given (refused when out of the ranges: InvalidArgument; taken or on hold:
    NoLease), else the next free one round-robin. Returns (range, index)."""
    if address:
        ar, idx = locate(session, vnet, address)
        if session.execute(TAKE_ADDRESS, {"vm": vm_id, "nic": nic_id, "ar": ar.id,
                                          "idx": idx}).first() is None:
            raise NoLease(taken_reason(lease_row(session, ar, idx), address, vnet))
        return ar, idx
    for ar in vnet_ranges(session, vnet.id):
        cursor = ar.next_index % ar.size
        row = (session.execute(FREE_FROM, {"ar": ar.id, "start": cursor, "stop": ar.size}).first()
               or session.execute(FREE_FROM, {"ar": ar.id, "start": 0, "stop": cursor}).first())
        if row is None:
            continue
        session.execute(TAKE, {"vm": vm_id, "nic": nic_id, "id": row.id})
        session.execute(ADVANCE, {"ar": ar.id, "next": (row.idx + 1) % ar.size})
        return ar, row.idx
    raise NoLease(f"No free lease in network {vnet.name!r}")


def release_leases(session, vm_id):
    """Free every address a VM holds (DONE, recreate)."""
    session.execute(text("UPDATE leases SET vm_id = NULL, nic_id = NULL WHERE vm_id = :vm"),
                    {"vm": vm_id})


def check_requested_address(session, vnet, address, where):
    """At create: an asked-for IP must be in a range and not taken right now."""
    ar, idx = locate(session, vnet, address, where)
    lease = lease_row(session, ar, idx)
    if lease.vm_id is not None or lease.hold:
        raise FailedPrecondition(f"{where}: {taken_reason(lease, address, vnet)}")


# ---------------------------------------------------------------- views

def range_to_dict(session, ar):
    used = session.execute(
        select(Lease.idx, Lease.vm_id, Lease.nic_id, Lease.hold)
        .where(Lease.ar_id == ar.id, (Lease.vm_id.is_not(None)) | Lease.hold)
        .order_by(Lease.idx)).all()
    return {"id": ar.id, "type": ar.type, "size": ar.size, "mac": ar.mac, "ip": ar.ip,
            "ip6": ar.ip6, "global_prefix": ar.ip6_prefix, "prefix_length": ar.prefix_length,
            "next_index": ar.next_index, "attributes": ar.attributes or {},
            "used": len(used),
            "leases": [{**address_at(ar, row.idx), "vm_id": row.vm_id, "nic_id": row.nic_id,
                        "hold": row.hold} for row in used]}


def vnet_to_dict(session, vnet, with_leases=True):
    ranges = [range_to_dict(session, ar) for ar in vnet_ranges(session, vnet.id)]
    if not with_leases:
        for ar in ranges:
            del ar["leases"]
    return {"id": vnet.id, "name": vnet.name, "owner_id": vnet.owner_id,
            "template": vnet.template or {}, "ranges": ranges,
            "size": sum(ar["size"] for ar in ranges), "used": sum(ar["used"] for ar in ranges),
            "created_at": iso(vnet.created_at)}


def list_vnets(session, owner_id=None):
    query = select(VirtualNetwork).order_by(VirtualNetwork.id)
    if owner_id is not None:
        query = query.where(VirtualNetwork.owner_id == owner_id)
    return [vnet_to_dict(session, vnet, with_leases=False) for vnet in session.scalars(query)]


def vm_leases(session, vm_id):
    """{nic_id: (network, addresses)} of the leases a VM holds."""
    rows = session.execute(
        select(Lease.nic_id, Lease.idx, AddressRange, VirtualNetwork)
        .join(AddressRange, AddressRange.id == Lease.ar_id)
        .join(VirtualNetwork, VirtualNetwork.id == AddressRange.vnet_id)
        .where(Lease.vm_id == vm_id)).all()
    return {row.nic_id: (row.VirtualNetwork, address_at(row.AddressRange, row.idx))
            for row in rows}
