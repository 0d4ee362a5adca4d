"""``cirrus``: the command line of Cirrus, over the gRPC API.

Read commands print tables or a human view, or JSON with ``--json``. A failed
call prints ``cirrus: <STATUS>: <details>`` to stderr and exits 1; a usage
error exits 2.
"""
import argparse
import getpass
import json
import os
import queue
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from cirrus import states

INT32_MAX = 2 ** 31 - 1


# ----------------------------------------------------------------- argument types

def resource_id(text):
    """A host, VM or template id: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: must be a whole number") from None
    if not 0 < value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: must be between 1 and {INT32_MAX}")
    return value


def named_ref(kind):
    """An argparse type: a resource by id (digits) or by name; the client looks names up."""
    def parse(text):
        from cirrus.template import is_digits
        if is_digits(text):
            return resource_id(text)
        if not text.strip():
            raise argparse.ArgumentTypeError(f"invalid {kind}: give its name or id")
        return text
    return parse


host_ref = named_ref("host")


def key_value(text):
    """KEY=VALUE for a host's or a cluster's template; an empty VALUE removes KEY."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"invalid {text!r}: give KEY=VALUE (an empty VALUE removes KEY)")
    return key.strip().upper(), value


def role_spec(text):
    """A VM group role: NAME or NAME:POLICY."""
    name, _, policy = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"invalid role {text!r}: give NAME or NAME:POLICY")
    return {"name": name.strip(), "policy": policy.strip().upper() or None}


def role_hosts(text):
    """ROLE:HOST_ID,HOST_ID for --host-affined and --host-anti-affined."""
    role, _, ids = text.partition(":")
    try:
        hosts = [int(i) for i in ids.split(",") if i.strip()]
    except ValueError:
        hosts = []
    if not role.strip() or not hosts:
        raise argparse.ArgumentTypeError(f"invalid {text!r}: give ROLE:HOST_ID[,HOST_ID...]")
    return role.strip(), hosts


def role_list(text):
    """ROLE,ROLE[,...] for --affined and --anti-affined."""
    roles = [r.strip() for r in text.split(",") if r.strip()]
    if len(roles) < 2:
        raise argparse.ArgumentTypeError(f"invalid {text!r}: give two roles or more, ROLE,ROLE")
    return roles


def moment(text):
    """An ISO-8601 date or date-time; without a zone it is UTC, a date is its 00:00."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected an ISO date or date-time such as 2026-01-31 "
            "or 2026-01-31T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def vm_status(text):
    value = text.upper()
    if value not in states.ALL_STATUSES:
        raise argparse.ArgumentTypeError(
            f"unknown VM state {text!r}; choose from {', '.join(states.ALL_STATUSES)}")
    return value


def number(kind, positive=False):
    """An argparse type. VM sizes are checked only for their type here: the
    server judges their values, so every client gets the same answer."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        if kind is int and abs(value) > INT32_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {INT32_MAX}, got {text}")
        return value
    return parse


# ----------------------------------------------------------------- formatting

def format_table(headers, rows):
    """Left-aligned columns, as wide as their widest cell; None shows as '-'."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [headers] + cells
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


def format_fields(pairs, indent=""):
    """KEY value lines with the values aligned; pairs with a None value are left out."""
    pairs = [(k, v) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{indent}{k.ljust(width)}  {v}" for k, v in pairs)


def megabytes(mb):
    """Memory in MB, as onevm shows it: 512M, 1.5G."""
    if mb is None:
        return None
    mb = int(mb)
    if mb < 1024:
        return f"{mb}M"
    return f"{mb / 1024:.1f}".removesuffix(".0") + "G"


def cores(cpu):
    return None if cpu is None else f"{float(cpu):g}"


def when(stamp):
    """An API timestamp (RFC 3339, UTC) as 'YYYY-MM-DD HH:MM:SS'."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def duration(seconds):
    """Seconds for reading: 4.2s, 3m04s, 2h03m."""
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def vm_table(vms):
    return format_table(
        ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM"],
        [[vm["id"], vm["name"], vm["owner"], vm.get("short_status") or vm["status"].lower(),
          vm.get("host"), cores(vm["cpu"]), megabytes(vm["memory"])] for vm in vms])


def host_table(hosts):
    return format_table(
        ["ID", "NAME", "STATE", "VMS", "ALLOC_CPU", "ALLOC_MEM"],
        [[h["id"], h["name"], h["state"], h["running_vms"],
          f"{h['cpu_usage']} / {h['max_cpu']}",
          f"{megabytes(h['mem_usage'])} / {megabytes(h['max_mem'])}"] for h in hosts])


def template_table(templates):
    return format_table(["ID", "NAME", "OWNER", "CREATED"],
                        [[t["id"], t["name"], t["owner"], when(t.get("created_at"))]
                         for t in templates])


def template_text(body, indent=""):
    """A template dict in OpenNebula's syntax, for reading."""
    lines = []
    for key, value in (body or {}).items():
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, dict):
                inner = ",\n".join(f"{indent}  {k} = {json.dumps(str(v))}" for k, v in item.items())
                lines.append(f"{indent}{key} = [\n{inner} ]")
            else:
                lines.append(f"{indent}{key} = {json.dumps(str(item))}")
    return "\n".join(lines)


def vm_view(vm):
    host = vm.get("host")
    if host is not None and vm.get("host_id") is not None:
        host = f"{host} (id {vm['host_id']})"
    parts = [
        f"VIRTUAL MACHINE {vm['id']}",
        format_fields([
            ("NAME", vm["name"]), ("OWNER", vm["owner"]), ("STATE", vm["state"]),
            ("LCM_STATE", vm["lcm_state"]), ("STATUS", f"{vm['status']} ({vm['short_status']})"),
            ("HOST", host), ("MIGRATING_TO", vm.get("target_host")),
            ("RESCHED", "yes" if vm.get("resched") else None),
            ("RESUME_FROM", vm.get("resume_from")),
            ("CPU", cores(vm["cpu"])), ("VCPU", vm["vcpu"]),
            ("MEMORY", megabytes(vm["memory"])), ("DEPLOY_ID", vm.get("deploy_id")),
            ("ERROR", vm.get("error")), ("SCHEDULER", vm.get("sched_message")),
            ("CREATED", when(vm.get("created_at"))), ("UPDATED", when(vm.get("updated_at"))),
        ], indent="  "),
    ]
    if vm.get("template"):
        parts += ["", "TEMPLATE", template_text(vm["template"], indent="  ")]
    parts += vm_devices_view(vm)
    if vm.get("monitoring"):
        parts += ["", "MONITORING", format_fields(sorted(vm["monitoring"].items()), indent="  ")]
    if vm.get("stays"):
        parts += ["", "STAYS", format_table(
            ["HOST", "START", "END", "REASON", "PROLOG", "BOOT", "RUNNING", "EPILOG"],
            [[s.get("host"), when(s.get("start")), when(s.get("end")), s.get("reason"),
              duration(s["prolog_seconds"]), duration(s["boot_seconds"]),
              duration(s["running_seconds"]), duration(s["epilog_seconds"])]
             for s in vm["stays"]])]
    if vm.get("history"):
        parts += ["", "HISTORY", format_table(
            ["SEQ", "ACTION", "FROM", "TO", "HOST", "AT", "MESSAGE"],
            [[h["seq"], h["action"], h.get("from_status"), h["to_status"], h.get("host"),
              when(h.get("at")), h.get("message")] for h in vm["history"]])]
    return "\n".join(parts)


def vm_devices_view(vm):
    """The DISKS, NICS and CONTEXT sections of `vm show`: what the VM holds
    while placed."""
    parts = []
    if vm.get("disks"):
        parts += ["", "DISKS", format_table(
            ["ID", "TARGET", "IMAGE", "TYPE", "CLONE", "SIZE", "PATH"],
            [[d["id"], d["target"], d.get("image"), d["type"], d.get("clone"),
              megabytes(d.get("size_mb")), d.get("path") or d.get("source")]
             for d in vm["disks"]])]
    if vm.get("nics"):
        parts += ["", "NICS", format_table(
            ["ID", "NETWORK", "IP", "MAC", "GATEWAY", "IP6"],
            [[n["id"], n["network"], n.get("ip"), n.get("mac"), n.get("gateway"), n.get("ip6")]
             for n in vm["nics"]])]
    context = vm.get("context")
    if context:
        parts += ["", "CONTEXT", format_fields(
            [("CD", context.get("path")), ("TOKEN", "yes" if context.get("token") else "no")],
            indent="  "), template_text(context.get("values") or {}, indent="  ")]
    return parts


def host_view(host):
    parts = [
        f"HOST {host['id']}",
        format_fields([
            ("NAME", host["name"]), ("STATE", host["state"]), ("HA", host.get("ha")),
            ("RUNNING_VMS", host["running_vms"]),
            ("ALLOC_CPU", f"{host['cpu_usage']} / {host['max_cpu']}"),
            ("ALLOC_MEM", f"{megabytes(host['mem_usage'])} / {megabytes(host['max_mem'])}"),
            ("MONITORED", when(host.get("last_monitored_at")) or "never"),
            ("CLUSTER", host.get("cluster_id")),
            ("RESERVED", f"{host.get('reserved_cpu') or 0} CPU, "
                         f"{megabytes(host.get('reserved_mem') or 0)}"
             if host.get("reserved_cpu") or host.get("reserved_mem") else None),
        ], indent="  "),
    ]
    if host.get("template"):
        parts += ["", "TEMPLATE", template_text(host["template"], indent="  ")]
    monitoring = dict(host.get("monitoring") or {})
    domains = monitoring.pop("VMS", None)
    if monitoring:
        parts += ["", "MONITORING", format_fields(sorted(monitoring.items()), indent="  ")]
    if domains:
        parts += ["", "DOMAINS", format_table(
            ["VM_ID", "DEPLOY_ID", "STATE"],
            [[d.get("VM_ID"), d.get("DEPLOY_ID"), d.get("STATE")] for d in domains])]
    return "\n".join(parts)


def cluster_table(clusters):
    return format_table(["ID", "NAME", "HOSTS"],
                        [[c["id"], c["name"], len(c.get("hosts") or [])] for c in clusters])


def cluster_view(cluster):
    hosts = ", ".join(f"{h['name']} ({h['id']})" for h in cluster.get("hosts") or []) or "none"
    parts = [f"CLUSTER {cluster['id']}",
             format_fields([("NAME", cluster["name"]), ("HOSTS", hosts)], indent="  ")]
    if cluster.get("template"):
        parts += ["", "TEMPLATE", template_text(cluster["template"], indent="  ")]
    return "\n".join(parts)


def vmgroup_table(groups):
    return format_table(["ID", "NAME", "ROLES", "VMS"],
                        [[g["id"], g["name"], ",".join(r["name"] for r in g.get("roles") or []),
                          sum(len(r.get("vms") or []) for r in g.get("roles") or [])]
                         for g in groups])


def ids(values):
    return ",".join(str(v) for v in values or []) or None


def vmgroup_view(group):
    parts = [f"VM GROUP {group['id']}", format_fields([("NAME", group["name"])], indent="  "),
             "", "ROLES", format_table(
                 ["NAME", "POLICY", "HOST_AFFINED", "HOST_ANTI_AFFINED", "VMS"],
                 [[r["name"], r.get("policy") or "NONE", ids(r.get("host_affined")),
                   ids(r.get("host_anti_affined")), ids(r.get("vms"))]
                  for r in group.get("roles") or []])]
    if group.get("rules"):
        parts += ["", "RULES", format_fields(
            [(r["policy"], ",".join(r["roles"])) for r in group["rules"]], indent="  ")]
    return "\n".join(parts)


def template_view(template):
    return "\n".join([
        f"TEMPLATE {template['id']}",
        format_fields([("NAME", template["name"]), ("OWNER", template["owner"]),
                       ("CREATED", when(template.get("created_at")))], indent="  "),
        "",
        (template.get("text") or template_text(template.get("body"))).rstrip(),
    ])


def change_line(change):
    """One line per VM state change, for ``vm watch``."""
    line = (f"{when(change.get('at')) or '-'}  VM {change['id']} {change['name']}  "
            f"{change['status']}  host={change.get('host') or '-'}  seq={change['seq']}")
    if change.get("error"):
        line += f"  error={change['error']}"
    if change.get("current"):
        line += "  (current)"
    return line


def top_table(vms):
    """`vm top`'s table: the listing's columns and what the VMs use now
    (their latest monitoring: CPU in % of one core, memory)."""
    return format_table(
        ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM", "UCPU", "UMEM"],
        [[vm["id"], vm["name"], vm.get("owner"), vm.get("short_status") or vm["status"].lower(),
          vm.get("host"), cores(vm.get("cpu")), megabytes(vm.get("memory")),
          usage_cpu(vm.get("monitoring")), usage_memory(vm.get("monitoring"))] for vm in vms])


def usage_cpu(monitoring):
    cpu = (monitoring or {}).get("CPU")
    return None if cpu is None else f"{float(cpu):.0f}%"


def usage_memory(monitoring):
    kb = (monitoring or {}).get("MEMORY")
    return None if kb is None else megabytes(float(kb) / 1024)


def accounting_view(report):
    window = (f"from {when(report.get('start')) or 'the beginning'} "
              f"to {when(report.get('end')) or 'now'} (UTC)")
    hours = "{:.2f}".format
    return "\n".join([
        f"VM usage {window}",
        format_table(["ID", "NAME", "OWNER", "HOURS", "CPU_HOURS", "MEM_GB_HOURS"],
                     [[v["id"], v["name"], v["owner"], hours(v["hours"]), hours(v["cpu_hours"]),
                       hours(v["memory_gb_hours"])] for v in report["vms"]]),
        "",
        format_table(["USER", "VMS", "CPU_HOURS", "MEM_GB_HOURS"],
                     [[u["owner"], u["vms"], hours(u["cpu_hours"]), hours(u["memory_gb_hours"])]
                      for u in report["users"]]),
    ])


class VmTop:
    """The rows of `vm top`: a listing kept current by Watch changes. DONE VMs
    leave the table; ``status`` (a status or state word) and ``user`` narrow it."""

    def __init__(self, status=None, user=None):
        self.status = status.upper() if status else None
        self.user = user
        self.vms = {}

    def load(self, vms):
        self.vms = {vm["id"]: vm for vm in vms}

    def knows(self, vm_id):
        return vm_id in self.vms

    def apply(self, change):
        """Take a Watch change; True if the table changed."""
        vm = self.vms.get(change["id"])
        if change["status"] == "DONE":
            return self.vms.pop(change["id"], None) is not None
        if vm is None:
            vm = self.vms[change["id"]] = {"id": change["id"], "name": change["name"], "seq": -1}
        if change["seq"] <= vm.get("seq", -1):
            return False
        vm.update({key: change.get(key) for key in
                   ("state", "status", "short_status", "host", "seq", "error")})
        return True

    def wanted(self, vm):
        return ((self.status is None or self.status in (vm.get("status"), vm.get("state")))
                and (self.user is None or vm.get("owner") == self.user))

    def render(self):
        shown = [vm for _, vm in sorted(self.vms.items()) if self.wanted(vm)]
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        return f"{stamp} UTC  {len(shown)} VMs\n{top_table(shown)}"


# (issue 5) datastores, images and virtual networks

def datastore_table(datastores):
    return format_table(["ID", "NAME", "TYPE", "PATH", "HOST", "IMAGES"],
                        [[d["id"], d["name"], d["type"], d["path"], d.get("host"), d["images"]]
                         for d in datastores])


def datastore_view(ds):
    return "\n".join([f"DATASTORE {ds['id']}", format_fields([
        ("NAME", ds["name"]), ("TYPE", ds["type"]), ("PATH", ds["path"]),
        ("HOST", ds.get("host")), ("IMAGES", ds["images"]),
        ("CREATED", when(ds.get("created_at")))], indent="  ")])


def yes_no(flag):
    return "yes" if flag else "no"


def image_table(images):
    return format_table(
        ["ID", "NAME", "OWNER", "DATASTORE", "SIZE", "FORMAT", "PERSISTENT", "STATE", "VMS"],
        [[i["id"], i["name"], i["owner"], i["datastore"], megabytes(i["size_mb"]), i["format"],
          yes_no(i["persistent"]), i["state"], i["running_vms"]] for i in images])


def image_view(image):
    return "\n".join([f"IMAGE {image['id']}", format_fields([
        ("NAME", image["name"]), ("OWNER", image["owner"]),
        ("DATASTORE", f"{image['datastore']} (id {image['datastore_id']})"),
        ("PATH", image["path"]), ("FORMAT", image["format"]),
        ("SIZE", megabytes(image["size_mb"])), ("STATE", image["state"]),
        ("PERSISTENT", yes_no(image["persistent"])),
        ("VMS", ", ".join(map(str, image.get("vms") or ())) or None),
        ("ERROR", image.get("error")), ("CREATED", when(image.get("created_at")))],
        indent="  ")])


def vnet_table(vnets):
    return format_table(["ID", "NAME", "OWNER", "RANGES", "LEASES"],
                        [[v["id"], v["name"], v.get("owner"), len(v.get("ranges") or ()),
                          f"{v['used']} / {v['size']}"] for v in vnets])


def range_first(ar):
    """A range's first address(es), as onevnet shows them."""
    first = [ar.get("ip"), ar.get("ip6")]
    if ar.get("global_prefix"):
        first.append(f"{ar['global_prefix']}/64")
    return " ".join(a for a in first if a) or None


def vnet_view(vnet):
    parts = [f"VIRTUAL NETWORK {vnet['id']}", format_fields([
        ("NAME", vnet["name"]), ("OWNER", vnet.get("owner")),
        ("LEASES", f"{vnet['used']} / {vnet['size']}"),
        ("CREATED", when(vnet.get("created_at")))], indent="  ")]
    if vnet.get("template"):
        parts += ["", "TEMPLATE", template_text(vnet["template"], indent="  ")]
    ranges = vnet.get("ranges") or []
    parts += ["", "ADDRESS RANGES", format_table(
        ["AR", "TYPE", "SIZE", "USED", "FIRST_MAC", "FIRST_IP"],
        [[ar["id"], ar["type"], ar["size"], ar["used"], ar["mac"], range_first(ar)]
         for ar in ranges])]
    leases = [(ar["id"], lease) for ar in ranges for lease in ar.get("leases") or ()]
    if leases:
        parts += ["", "LEASES", format_table(
            ["AR", "IP", "IP6", "MAC", "VM", "NIC"],
            [[ar_id, lease.get("ip"), lease.get("ip6"), lease["mac"],
              "hold" if lease.get("hold") else lease.get("vm_id"), lease.get("nic_id")]
             for ar_id, lease in leases])]
    return "\n".join(parts)


def emit(args, data, human):
    """Print ``data`` as JSON with --json, else ``human(data)``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(human(data))


# ----------------------------------------------------------------- commands

class UsageError(Exception):
    """Wrong input found after parsing; printed like any other error."""

    def __init__(self, details):
        super().__init__(details)
        self.code = "INVALID_ARGUMENT"
        self.details = details


def client(args):
    from cirrus.client import Client
    return Client(address=args.address, request_id=getattr(args, "request_id", None),
                  tls_ca=args.tls_ca)


def read_file(path):
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as src:
            return src.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read template file {path!r}: {reason}") from None


def cmd_db_upgrade(args):
    from cirrus import db
    try:
        db.upgrade()
    except Exception as exc:
        print(f"cirrus: database: {exc}", file=sys.stderr)
        return 1
    print("database is at the latest schema")
    return 0


def cmd_login(args):
    from cirrus import config
    from cirrus.client import Client, save_token
    user = args.user or os.environ.get("CIRRUS_USER") or str(config.get()["auth"]["admin_user"])
    password = args.password
    if password is None:
        password = os.environ.get("CIRRUS_PASSWORD")
    if password is None:
        password = getpass.getpass(f"password for {user}: ")
    with Client(address=args.address, username=user, password=password,
                tls_ca=args.tls_ca) as api:
        session = api.login(user, password)
    path = save_token(session["token"])
    print(f"logged in as {session['user']['name']} ({session['user']['role']}); token saved to "
          f"{path}, valid until {when(session.get('expires_at'))}")
    return 0


def cmd_logout(args):
    """Forget the saved token on the server, then delete the file; a token
    the server no longer knows (expired and dropped) is deleted all the same."""
    from cirrus.client import Client, ClientError, read_token, token_path
    path = token_path()
    token = read_token(path)
    if token is None:
        print(f"not logged in: no token at {path}")
        return 0
    with Client(address=args.address, token=token, tls_ca=args.tls_ca) as api:
        try:
            api.logout()
            said = "the server forgot the token"
        except ClientError as exc:
            if exc.code != "UNAUTHENTICATED":
                raise
            said = "the server no longer knew the token"
    path.unlink(missing_ok=True)
    print(f"logged out: {said}; {path} deleted")
    return 0


def cmd_host_create(args):
    host = client(args).create_host(args.name, ha=args.ha)
    emit(args, host, lambda h: h["id"])


def cmd_host_list(args):
    emit(args, client(args).list_hosts(), host_table)


def cmd_host_show(args):
    api = client(args)
    emit(args, api.get_host(api.host_id(args.id)), host_view)


def host_action(method, verb):
    def run(args):
        api = client(args)
        host = getattr(api, method)(api.host_id(args.id))
        emit(args, host, lambda h: f"host {h['id']} ({h['name']}) {verb}; state {h['state']}")
    return run


def cmd_host_update(args):
    if args.ha is None and not args.pairs:
        raise UsageError("host update: give --ha or KEY=VALUE pairs")
    api = client(args)
    host = api.update_host(api.host_id(args.id), ha=args.ha, template=dict(args.pairs))
    emit(args, host, lambda h: f"host {h['id']} ({h['name']}) updated; ha {h['ha']}")


def cmd_cluster_create(args):
    cluster = client(args).create_cluster(args.name, dict(args.pairs))
    emit(args, cluster, lambda c: c["id"])


def cluster_host_action(method, verb):
    def run(args):
        api = client(args)
        cluster = getattr(api, method)(api.cluster_id(args.id), api.host_id(args.host))
        emit(args, cluster, lambda c: f"host {args.host} {verb} cluster {c['name']}")
    return run


def cmd_vmgroup_create(args):
    roles = {r["name"]: {**r, "host_affined": [], "host_anti_affined": []} for r in args.role}
    for key, given in (("host_affined", args.host_affined),
                       ("host_anti_affined", args.host_anti_affined)):
        for role, hosts in given or []:
            if role not in roles:
                raise UsageError(f"--{key.replace('_', '-')}: no role {role!r}; "
                                 f"the roles are {', '.join(roles)}")
            roles[role][key] = hosts
    rules = ([{"policy": "AFFINED", "roles": r} for r in args.affined or []]
             + [{"policy": "ANTI_AFFINED", "roles": r} for r in args.anti_affined or []])
    group = client(args).create_vmgroup(args.name, list(roles.values()), rules)
    emit(args, group, lambda g: g["id"])


def cmd_vm_create(args):
    """Through a provisioning request: the VM's id when it is made at once,
    else the request that waits for an approval (exit 0 either way)."""
    template = read_file(args.file) if args.file else None
    request = client(args).submit_vm(name=args.name, cpu=args.cpu, vcpu=args.vcpu,
                                     memory=args.memory, template=template, hold=args.hold,
                                     requirements=args.requirements, rank=args.rank,
                                     vmgroup=args.vmgroup)
    emit_vm_or_request(args, request)


def cmd_vm_list(args):
    emit(args, client(args).list_vms(include_done=args.all), vm_table)


def cmd_vm_show(args):
    emit(args, client(args).get_vm(args.id), vm_view)


def vm_action(action):
    """The command of one VM action; the options are the args it has (--hard,
    --live, HOST, a recover flag)."""
    def run(args):
        api = client(args)
        host = getattr(args, "host", None)
        vm = api.vm_action(args.id, action, hard=getattr(args, "hard", False),
                           live=getattr(args, "live", False),
                           host_id=None if host is None else api.host_id(host),
                           operation=getattr(args, "operation", None))
        emit(args, vm, lambda v: f"VM {v['id']} ({v['name']}): {action} accepted; "
                                 f"now {v['status']}")
    return run


def cmd_vm_wait(args):
    vm = client(args).wait_vm(args.id, args.state, timeout=args.timeout)
    emit(args, vm, lambda v: f"VM {v['id']} ({v['name']}) is {v['status']}")


def cmd_vm_watch(args):
    try:
        for change in client(args).watch_vms(args.id, status=args.status, user=args.user):
            if args.json:
                print(json.dumps(change, default=str), flush=True)
            else:
                print(change_line(change), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


# how often `vm top` lists the VMs again, for their usage (Watch carries states only)
TOP_USAGE_REFRESH = 10.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_vm_top(args):
    """A table of VMs, drawn again as Watch reports changes. On a terminal it
    is redrawn in place every --delay seconds; otherwise (or with --once or
    --iterations) each frame is printed after the last, when something changed."""
    api = client(args)
    frames = 1 if args.once else args.iterations
    live = sys.stdout.isatty() and frames is None
    top = VmTop(args.status, args.user)
    changes = queue.Queue()

    def read():
        try:
            for change in api.watch_vms(user=args.user):
                changes.put(change)
        except Exception as exc:     # handed to the main thread, which reports it
            changes.put(exc)

    def draw():
        print((CLEAR_SCREEN if live else "") + top.render() + ("" if live else "\n"),
              flush=True)

    try:
        top.load(api.list_vms())
        listed = time.monotonic()
        if frames != 1:
            threading.Thread(target=read, name="top-watch", daemon=True).start()
        draw()
        drawn = 1
        while frames is None or drawn < frames:
            changed = take_changes(api, top, changes, args.delay)
            if time.monotonic() - listed >= TOP_USAGE_REFRESH:
                top.load(api.list_vms())
                listed, changed = time.monotonic(), True
            if changed or live:
                draw()
                drawn += 1
    except KeyboardInterrupt:
        pass
    return 0


def take_changes(api, top, changes, delay):
    """Apply the Watch changes that arrive within ``delay`` seconds; True if any
    changed the table. A VM not in the table yet is looked up for its details."""
    from cirrus.client import ClientError
    deadline = time.monotonic() + delay
    changed = False
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            change = changes.get(timeout=remaining)
        except queue.Empty:
            break
        if isinstance(change, Exception):
            raise change
        if not top.knows(change["id"]) and change["status"] != "DONE":
            try:
                top.vms[change["id"]] = api.get_vm(change["id"])
                changed = True
            except ClientError as exc:
                if exc.code != "NOT_FOUND":
                    raise
        changed = top.apply(change) or changed
    return changed


def cmd_accounting(args):
    report = client(args).accounting(user=args.user, start=args.start, end=args.end)
    emit(args, report, accounting_view)


def cmd_template_create(args):
    template = client(args).create_template(read_file(args.file), name=args.name or "")
    emit(args, template, lambda t: t["id"])


def cmd_template_list(args):
    emit(args, client(args).list_templates(), template_table)


def cmd_template_show(args):
    emit(args, client(args).get_template(args.id), template_view)


def cmd_template_delete(args):
    template = client(args).delete_template(args.id)
    emit(args, template, lambda t: f"template {t['id']} ({t['name']}) deleted")


def cmd_template_instantiate(args):
    request = client(args).submit_vm(template_id=args.id, name=args.name, hold=args.hold)
    emit_vm_or_request(args, request)


# (issue 5) datastores, images and virtual networks

def front_end_path(path):
    """A path on the front end, made absolute here so a relative one means
    where the command runs (the front end, in the embedded setup)."""
    return None if path is None else os.path.abspath(path)


def listing_commands(kind, label, table, view):
    """The list, show and delete commands of a resource the SDK calls ``kind``
    (list_<kind>s, get_<kind>, delete_<kind>, and <kind>_id for a name or id)."""
    def list_(args):
        emit(args, getattr(client(args), f"list_{kind}s")(), table)

    def show(args):
        api = client(args)
        emit(args, getattr(api, f"get_{kind}")(getattr(api, f"{kind}_id")(args.id)), view)

    def delete(args):
        api = client(args)
        gone = getattr(api, f"delete_{kind}")(getattr(api, f"{kind}_id")(args.id))
        emit(args, gone, lambda r: f"{label} {r['id']} ({r['name']}) deleted")
    return list_, show, delete


def cmd_datastore_create(args):
    api = client(args)
    ds = api.create_datastore(args.name, args.type, front_end_path(args.path),
                              host_id=None if args.host is None else api.host_id(args.host))
    emit(args, ds, lambda d: d["id"])


def cmd_image_create(args):
    image = client(args).create_image(args.name, front_end_path(args.path),
                                      datastore=args.datastore, persistent=args.persistent)
    emit(args, image, lambda i: i["id"])


def image_persistency(persistent):
    def run(args):
        api = client(args)
        image = api.set_image_persistent(api.image_id(args.id), persistent)
        emit(args, image, lambda i: f"image {i['id']} ({i['name']}) is "
                                    f"{'' if i['persistent'] else 'non-'}persistent")
    return run


def cmd_vnet_create(args):
    vnet = client(args).create_vnet(read_file(args.file), name=args.name or "")
    emit(args, vnet, lambda v: v["id"])


def vnet_address_action(method, verb):
    def run(args):
        api = client(args)
        vnet = getattr(api, method)(api.vnet_id(args.id), args.lease)
        emit(args, vnet, lambda v: f"{args.lease} of virtual network {v['name']} {verb}")
    return run


def cmd_vnet_addar(args):
    api = client(args)
    vnet = api.vnet_addar(api.vnet_id(args.id), read_file(args.file))
    emit(args, vnet, lambda v: f"virtual network {v['name']}: address range "
                               f"{v['ranges'][-1]['id']} added")


def cmd_vnet_rmar(args):
    api = client(args)
    vnet = api.vnet_rmar(api.vnet_id(args.id), args.ar_id)
    emit(args, vnet, lambda v: f"virtual network {v['name']}: address range {args.ar_id} "
                               "removed")


# ----------------------------------------------------------------- parser

HA_POLICIES = ("none", "reschedule")
# VM actions that take only an id, and the help of --hard where they have one
VM_ACTIONS = [
    ("terminate", "shut a VM down and remove it", "destroy instead of shut down"),
    ("poweroff", "power a running VM off; it keeps its host", "pull the plug instead"),
    ("suspend", "pause a running VM and save its memory, on its host", None),
    ("stop", "save a running VM and move it off its host", None),
    ("undeploy", "power a VM off and move it off its host", "pull the plug instead"),
    ("resume", "bring back a powered-off, suspended, stopped or undeployed VM", None),
    ("reboot", "reboot a running VM", "reset instead of a clean reboot"),
    ("hold", "keep a PENDING VM from being scheduled", None),
    ("release", "let a held VM be scheduled", None),
    ("resched", "ask the scheduler to move a running VM to a better host", None),
    ("unresched", "cancel a resched", None),
]
RECOVER_OPERATIONS = [
    ("success", "as if the pending driver command had succeeded"),
    ("failure", "as if it had failed"),
    ("retry", "send the command again"),
    ("delete", "remove the VM from its host and end it (DONE)"),
    ("recreate", "remove the VM from its host and make it PENDING again"),
]


def build_parser():
    parser = argparse.ArgumentParser(prog="cirrus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="the gateway (default: gateway.address:port of the configuration)")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="reach the gateway over TLS, trusting the CAs in this file, or "
                             "'system' for the system's (default: gateway.tls_ca of the "
                             "configuration; unset: plaintext)")
    parser.add_argument("--request-id", metavar="ID", type=request_id_text,
                        help="the request id this command's calls carry, which `cirrus trace "
                             "ID` follows across the services (default: a new one)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say the request id on stderr")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    def command(sub, name, func, help, json_output=True):
        cmd = sub.add_parser(name, help=help, description=help,
                             parents=[as_json] if json_output else [])
        cmd.set_defaults(func=func)
        return cmd

    db = groups.add_parser("db", help="the database").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    command(db, "upgrade", cmd_db_upgrade, "migrate the database to the latest schema",
            json_output=False)

    login = groups.add_parser("login", help="log in and save a token to ~/.config/cirrus/token",
                              description="Log in and save a token, readable only by you, "
                                          "to ~/.config/cirrus/token.")
    login.add_argument("--user", help="user name (default: CIRRUS_USER, else the bootstrap admin)")
    login.add_argument("--password", help="password (default: CIRRUS_PASSWORD, else asked for)")
    login.set_defaults(func=cmd_login)
    logout = groups.add_parser("logout", help="end the saved token's session and delete it",
                               description="Forget the token saved by `cirrus login` on the "
                                           "server (it stops working at once) and delete "
                                           "~/.config/cirrus/token.")
    logout.set_defaults(func=cmd_logout)

    host = groups.add_parser("host", help="hypervisor hosts").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    ha_help = ("when the host fails: none (its VMs wait for it) or reschedule "
               "(they are recreated elsewhere)")
    create = command(host, "create", cmd_host_create, "register a host; prints its id")
    create.add_argument("name")
    create.add_argument("--ha", choices=HA_POLICIES, help=ha_help + "; default none")
    command(host, "list", cmd_host_list, "list the hosts")
    for name, func, help in [
            ("show", cmd_host_show, "show a host and its monitoring"),
            ("enable", host_action("enable_host", "enabled"), "let VMs be placed on a host"),
            ("disable", host_action("disable_host", "disabled"), "keep new VMs off a host"),
            ("offline", host_action("offline_host", "offline"),
             "take a host with no VMs out of service: no VMs, no monitoring"),
            ("flush", host_action("flush_host", "flushed"),
             "disable a host and have the scheduler move its running VMs elsewhere"),
            ("delete", host_action("delete_host", "deleted"), "forget a host with no VMs")]:
        command(host, name, func, help).add_argument("id", type=host_ref, metavar="HOST",
                                                     help="host name or id")
    update = command(host, "update", cmd_host_update,
                     "change a host's HA policy or its template (KEY=VALUE)")
    update.add_argument("id", type=host_ref, metavar="HOST", help="host name or id")
    update.add_argument("pairs", type=key_value, nargs="*", metavar="KEY=VALUE",
                        help="set in the host's template for the scheduler (PRIORITY, "
                             "RESERVED_CPU, RESERVED_MEM, any attribute); KEY= removes KEY")
    update.add_argument("--ha", choices=HA_POLICIES, help=ha_help)

    cluster = groups.add_parser("cluster", help="clusters of hosts").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    create = command(cluster, "create", cmd_cluster_create, "create a cluster; prints its id")
    create.add_argument("name")
    create.add_argument("pairs", type=key_value, nargs="*", metavar="KEY=VALUE",
                        help="the cluster's template: attributes of its hosts, RESERVED_CPU...")
    listing, show, delete = listing_commands("cluster", "cluster", cluster_table, cluster_view)
    command(cluster, "list", listing, "list the clusters")
    for name, func, help in [("show", show, "show a cluster and its hosts"),
                             ("delete", delete, "delete a cluster with no hosts")]:
        command(cluster, name, func, help).add_argument("id", metavar="CLUSTER",
                                                        help="cluster name or id")
    for name, method, verb, help in [
            ("addhost", "cluster_add_host", "added to", "put a host in a cluster"),
            ("delhost", "cluster_del_host", "removed from", "take a host out of a cluster")]:
        action = command(cluster, name, cluster_host_action(method, verb), help)
        action.add_argument("id", metavar="CLUSTER", help="cluster name or id")
        action.add_argument("host", type=host_ref, metavar="HOST", help="host name or id")

    vmgroup = groups.add_parser("vmgroup", help="VM groups: placement rules between roles"
                                ).add_subparsers(dest="action", metavar="ACTION", required=True)
    create = command(vmgroup, "create", cmd_vmgroup_create, "create a VM group; prints its id")
    create.add_argument("name")
    create.add_argument("--role", type=role_spec, action="append", required=True,
                        metavar="NAME[:POLICY]",
                        help="a role; POLICY is NONE, AFFINED (its VMs on one host) or "
                             "ANTI_AFFINED (on different hosts); repeat for each role")
    create.add_argument("--affined", type=role_list, action="append", metavar="ROLE,ROLE",
                        help="these roles' VMs share one host")
    create.add_argument("--anti-affined", type=role_list, action="append", metavar="ROLE,ROLE",
                        help="no host runs VMs of two of these roles")
    create.add_argument("--host-affined", type=role_hosts, action="append",
                        metavar="ROLE:HOST_ID,...", help="the role's VMs only on these hosts")
    create.add_argument("--host-anti-affined", type=role_hosts, action="append",
                        metavar="ROLE:HOST_ID,...", help="the role's VMs never on these hosts")
    listing, show, delete = listing_commands("vmgroup", "VM group", vmgroup_table, vmgroup_view)
    command(vmgroup, "list", listing, "list VM groups")
    for name, func, help in [("show", show, "show a VM group, its roles and VMs"),
                             ("delete", delete, "delete a VM group with no VMs")]:
        command(vmgroup, name, func, help).add_argument("id", metavar="VMGROUP",
                                                        help="VM group name or id")

    vm = groups.add_parser("vm", help="virtual machines").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    create = command(vm, "create", cmd_vm_create, "create a VM; prints its id")
    create.add_argument("--name", help="default: the template's NAME")
    create.add_argument("--cpu", type=number(float),
                        help="physical CPU share, e.g. 1 or 0.5 (overrides the template)")
    create.add_argument("--vcpu", type=number(int),
                        help="virtual CPUs (overrides the template)")
    create.add_argument("--memory", type=number(int),
                        help="memory in MB, e.g. 512 (overrides the template)")
    create.add_argument("--file", metavar="F",
                        help="template file: OpenNebula syntax, YAML or JSON ('-' for stdin)")
    create.add_argument("--hold", action="store_true", help="create on hold: not scheduled")
    create.add_argument("--requirements", metavar="EXPR",
                        help='SCHED_REQUIREMENTS, e.g. \'SSD = "yes" & FREE_CPU > 100\'')
    create.add_argument("--rank", metavar="EXPR",
                        help="SCHED_RANK, e.g. FREE_CPU (write --rank=-RUNNING_VMS for one "
                             "that starts with -)")
    create.add_argument("--vmgroup", metavar="NAME:ROLE", help="join a VM group in a role")
    command(vm, "list", cmd_vm_list, "list VMs").add_argument(
        "--all", action="store_true", help="include terminated (DONE) VMs")
    command(vm, "show", cmd_vm_show, "show a VM with its history").add_argument(
        "id", type=resource_id)
    for action, help, hard in VM_ACTIONS:
        cmd = command(vm, action, vm_action(action), help)
        cmd.add_argument("id", type=resource_id)
        if hard:
            cmd.add_argument("--hard", action="store_true", help=hard)
    migrate = command(vm, "migrate", vm_action("migrate"),
                      "move a running VM to another host (administrators)")
    migrate.add_argument("id", type=resource_id)
    migrate.add_argument("host", type=host_ref, metavar="HOST", help="host name or id")
    migrate.add_argument("--live", action="store_true",
                         help="move the running domain instead of saving and restoring it")
    deploy = command(vm, "deploy", vm_action("deploy"),
                     "place a PENDING or HOLD VM on a host now (administrators)")
    deploy.add_argument("id", type=resource_id)
    deploy.add_argument("host", type=host_ref, metavar="HOST", help="host name or id")
    recover = command(vm, "recover", vm_action("recover"),
                      "settle a VM stuck in a transient or failure state")
    recover.add_argument("id", type=resource_id)
    operations = recover.add_mutually_exclusive_group(required=True)
    for operation, help in RECOVER_OPERATIONS:
        operations.add_argument(f"--{operation}", dest="operation", action="store_const",
                                const=operation, help=help)
    recover.add_argument("--hard", action="store_true",
                         help="with --retry: send the hard form of the command (cancel, reset)")
    wait = command(vm, "wait", cmd_vm_wait,
                   "wait until a VM reaches a state; fails if it ends elsewhere or times out")
    wait.add_argument("id", type=resource_id)
    wait.add_argument("--state", type=vm_status, required=True, metavar="STATE",
                      help="e.g. RUNNING or DONE")
    wait.add_argument("--timeout", type=number(float, positive=True), default=60.0,
                      help="seconds (default 60)")
    watch = command(vm, "watch", cmd_vm_watch, "print VM state changes until Ctrl-C")
    watch.add_argument("id", type=resource_id, nargs="?", help="one VM (default: all you can see)")
    watch.add_argument("--status", help="only changes into this status (RUNNING...) or state "
                                        "(ACTIVE...)")
    watch.add_argument("--user", help="only this user's VMs")
    top = command(vm, "top", cmd_vm_top, "a live table of VMs, refreshed as they change",
                  json_output=False)
    top.add_argument("--status", help="only VMs in this status (RUNNING...) or state (ACTIVE...)")
    top.add_argument("--user", help="only this user's VMs")
    frames = top.add_mutually_exclusive_group()
    frames.add_argument("--once", action="store_true", help="print the table once and exit")
    frames.add_argument("--iterations", type=number(int, positive=True), metavar="N",
                        help="exit after N tables")
    top.add_argument("--delay", type=number(float, positive=True), default=1.0,
                     help="seconds between refreshes (default 1)")

    accounting = command(groups, "accounting", cmd_accounting,
                         "CPU-hours and memory-GB-hours per VM and per user")
    accounting.add_argument("--user", help="this user's VMs (default: yours; an administrator's: "
                                           "everyone's)")
    for name in ("start", "end"):
        accounting.add_argument(f"--{name}", type=moment, metavar="TIME",
                                help="ISO date or date-time, UTC unless it has a zone "
                                     "(a date is its 00:00); default: open")

    template = groups.add_parser("template", help="VM templates").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    create = command(template, "create", cmd_template_create, "save a template; prints its id")
    create.add_argument("--file", metavar="F", required=True,
                        help="OpenNebula syntax, YAML or JSON ('-' for stdin)")
    create.add_argument("--name", help="default: the template's NAME")
    command(template, "list", cmd_template_list, "list templates")
    command(template, "show", cmd_template_show, "show a template").add_argument(
        "id", type=resource_id)
    command(template, "delete", cmd_template_delete, "delete a template").add_argument(
        "id", type=resource_id)
    instantiate = command(template, "instantiate", cmd_template_instantiate,
                          "create a VM from a template; prints the VM id")
    instantiate.add_argument("id", type=resource_id)
    instantiate.add_argument("--name", help="default: the template's name")
    instantiate.add_argument("--hold", action="store_true", help="create the VM on hold")
    add_storage_and_network_commands(groups, command)
    add_trace_command(groups)
    add_flow_commands(groups, command)
    add_request_management_commands(groups, command)
    add_gate_commands(groups, command)
    add_status_command(groups, command)
    return parser


def request_id_text(text):
    """An ``x-request-id`` as the gateway takes it."""
    if not text or len(text) > 64 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 to 64 printable characters")
    return text


def cmd_trace(args):
    from cirrus import logs
    try:
        return logs.trace(args.traced, args.files, as_json=args.json)
    except logs.TraceError as exc:
        print(f"cirrus trace: {exc}", file=sys.stderr)
        return 1


def add_trace_command(groups):
    """Issue 9: one request's path through the services, from their log files."""
    trace = groups.add_parser(
        "trace", help="one request's timeline across the services, from their logs",
        description="Print, in time order, every log line of request REQUEST_ID (the "
                    "x-request-id of a call; `cirrus -v ...` says it): the gateway, requests, "
                    "lifecycle, scheduler and driver workers, each with its instance and "
                    "its offset from the first line.")
    trace.add_argument("traced", metavar="REQUEST_ID")   # not --request-id, this call's own
    trace.add_argument("files", nargs="*", metavar="FILE",
                       help="JSON log files or directories of them, '-' for stdin (e.g. "
                            "journalctl -o cat ... | cirrus trace ID -); default: the files "
                            "in logging.dir, else /var/tmp/cirrus/logs")
    trace.add_argument("--json", action="store_true",
                       help="print the lines as JSON, each with its offset in seconds")
    trace.set_defaults(func=cmd_trace)


def add_gate_commands(groups, command):
    """OneGate (issue 7): the platform side of the guests' HTTP API."""
    gate = groups.add_parser("gate", help="OneGate, the HTTP API of the guests") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    command(gate, "rotate-secret",
            lambda a: emit(a, client(a).rotate_gate_secret(),
                           lambda r: f"OneGate secret rotated at {r['rotated_at']}: tokens of "
                                     "VMs deployed before no longer work; new deploys get "
                                     "new ones"),
            "a new OneGate secret (administrators): old tokens stop working at once")


def queued(instance):
    """Messages waiting in an instance's queues; a driver worker of many hosts
    reports a sample of them, which this says."""
    if not instance["queues"]:
        return None
    total = str(sum(q["messages"] or 0 for q in instance["queues"] if not q["missing"]))
    if instance["queue_count"] > len(instance["queues"]):
        total += f" (in {len(instance['queues'])} of {instance['queue_count']} queues)"
    return total


def queue_table(instances):
    """Each queue once (instances of a service share theirs), with who consumes it."""
    queues, users = {}, {}
    for instance in instances:
        for queue in instance["queues"]:
            queues[queue["name"]] = queue
            users.setdefault(queue["name"], []).append(instance["name"])
    return format_table(["QUEUE", "MESSAGES", "CONSUMERS", "INSTANCES"],
                        [[name, "missing" if q["missing"] else q["messages"],
                          None if q["missing"] else q["consumers"], ",".join(users[name])]
                         for name, q in sorted(queues.items())])


def status_view(status):
    instances = status["instances"]
    if not instances:
        return "no process has sent a heartbeat (is the requests service running?)"
    table = format_table(
        ["NAME", "SERVICE", "STATE", "HOST", "PID", "VERSION", "UPTIME", "LAST HEARD", "QUEUED"],
        [[i["name"], i["service"], i["state"], i["host"], i["pid"], i["version"],
          duration(i["uptime_seconds"]), duration(i["last_seen_seconds"]) + " ago", queued(i)]
         for i in instances])
    parts = [table]
    if any(i["queues"] for i in instances):
        parts.append(queue_table(instances))
    parts.append(f"heartbeats every {status['heartbeat_interval']:g} s; DOWN after "
                 f"{status['down_after']:g} s without one")
    return "\n\n".join(parts)


def add_status_command(groups, command):
    """Issue 9: the platform's processes, as their heartbeats tell."""
    status = command(groups, "status", lambda a: emit(a, client(a).status(a.service),
                                                      status_view),
                     "every process (services, gateway, gate, driver workers): UP, DOWN or "
                     "STOPPED, version, uptime, last heard, queue depths (administrators and "
                     "cloud administrators)")
    status.add_argument("--service", metavar="NAME",
                        help="only this kind: requests, scheduler, lifecycle, flow, gateway, "
                             "gate or node")


DATASTORE_TYPES = ("IMAGE", "SYSTEM")


def add_storage_and_network_commands(groups, command):
    """(issue 5) ``datastore``, ``image`` and ``vnet``; every ID takes a name too."""
    datastore_ref, image_ref, vnet_ref = (named_ref(kind) for kind in
                                          ("datastore", "image", "virtual network"))
    datastore = groups.add_parser("datastore", help="datastores (administrators change them)") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    create = command(datastore, "create", cmd_datastore_create,
                     "register a datastore; prints its id")
    create.add_argument("name")
    create.add_argument("--type", type=str.upper, choices=DATASTORE_TYPES, default="IMAGE",
                        help="IMAGE (a directory of images on the front end, the default) or "
                             "SYSTEM (a node's directory of running VMs)")
    create.add_argument("--path", required=True, help="its directory")
    create.add_argument("--host", type=host_ref, help="SYSTEM: the host it is on (name or id)")
    listing, show, delete = listing_commands("datastore", "datastore", datastore_table,
                                             datastore_view)
    command(datastore, "list", listing, "list the datastores")
    for name, func, help in [("show", show, "show a datastore"),
                             ("delete", delete, "forget a datastore with no images")]:
        command(datastore, name, func, help).add_argument(
            "id", type=datastore_ref, metavar="DATASTORE", help="datastore name or id")

    image = groups.add_parser("image", help="disk images").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    create = command(image, "create", cmd_image_create,
                     "register a qcow2 or raw file as an image; prints its id")
    create.add_argument("name")
    create.add_argument("--path", required=True,
                        help="the file on the front end (checked with qemu-img)")
    create.add_argument("--datastore", type=datastore_ref,
                        help="IMAGE datastore name or id (default: the only one)")
    create.add_argument("--persistent", action="store_true",
                        help="one VM at a time uses the file itself, not a copy")
    listing, show, delete = listing_commands("image", "image", image_table, image_view)
    command(image, "list", listing, "list images")
    for name, func, help in [
            ("show", show, "show an image"),
            ("delete", delete, "forget an image no VM uses; the file stays"),
            ("persistent", image_persistency(True),
             "make an image persistent: its VM writes to the file itself"),
            ("nonpersistent", image_persistency(False),
             "make an image non-persistent: each VM gets a copy")]:
        command(image, name, func, help).add_argument("id", type=image_ref, metavar="IMAGE",
                                                      help="image name or id")

    vnet = groups.add_parser("vnet", help="virtual networks (administrators change them)") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    create = command(vnet, "create", cmd_vnet_create, "create a virtual network; prints its id")
    create.add_argument("--file", metavar="F", required=True,
                        help="template: NAME, NETWORK_MASK, GATEWAY, DNS and "
                             "AR = [TYPE=IP4, IP=..., SIZE=...] ('-' for stdin)")
    create.add_argument("--name", help="default: the template's NAME")
    listing, show, delete = listing_commands("vnet", "virtual network", vnet_table, vnet_view)
    command(vnet, "list", listing, "list virtual networks")
    for name, func, help in [("show", show, "show a network, its ranges and leases"),
                             ("delete", delete, "delete a network no VM uses")]:
        command(vnet, name, func, help).add_argument("id", type=vnet_ref, metavar="VNET",
                                                     help="network name or id")
    for name, func, help in [
            ("hold", vnet_address_action("vnet_hold", "is on hold"),
             "keep a free address from being leased"),
            ("release", vnet_address_action("vnet_release", "is released"),
             "give back an address on hold")]:
        cmd = command(vnet, name, func, help)
        cmd.add_argument("id", type=vnet_ref, metavar="VNET", help="network name or id")
        # not "address": that is the gateway's (--address)
        cmd.add_argument("lease", metavar="ADDR", help="IPv4, IPv6 or MAC address")
    addar = command(vnet, "addar", cmd_vnet_addar, "add an address range")
    addar.add_argument("id", type=vnet_ref, metavar="VNET", help="network name or id")
    addar.add_argument("--file", metavar="F", required=True,
                       help="AR = [TYPE=IP4, IP=..., SIZE=...] ('-' for stdin)")
    rmar = command(vnet, "rmar", cmd_vnet_rmar, "remove an address range none of whose "
                                                "addresses is in use")
    rmar.add_argument("id", type=vnet_ref, metavar="VNET", help="network name or id")
    rmar.add_argument("ar_id", type=resource_id, metavar="AR_ID",
                      help="the range's id (vnet show)")


# ----------------------------------------------------------------- request management (issue 8)

def emit_vm_or_request(args, request):
    emit_made_or_request(args, request, "vm")


def emit_made_or_request(args, request, made):
    """A VM or service (``made``: its key in the request) made at once prints
    as before (its id, or itself with --json); a request that waits prints
    where it waits."""
    if request.get(made):
        emit(args, request[made], lambda v: v["id"])
    else:
        emit(args, request, lambda r: f"request {r['id']} waits for approval by "
                                      f"{r['waiting_for']} ({r['step']}); follow it with "
                                      f"`cirrus request show {r['id']}`")


def new_password(args, who):
    if args.password is not None:
        return args.password
    if os.environ.get("CIRRUS_NEW_PASSWORD"):
        return os.environ["CIRRUS_NEW_PASSWORD"]
    first = getpass.getpass(f"new password for {who}: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passwords differ")
    return first


def quota_text(quota):
    def cell(resource):
        limit = quota["limits"].get(resource)
        used = quota["used"].get(resource) or 0
        shown = megabytes(used) if resource == "memory" else used
        if limit is None:
            return f"{shown} / -"
        return f"{shown} / {megabytes(limit) if resource == 'memory' else limit}"
    return format_fields([(r.upper(), cell(r)) for r in ("vms", "cpu", "memory", "images")],
                         indent="  ")


def user_table(users):
    return format_table(["ID", "NAME", "ROLE", "GROUPS"],
                        [[u["id"], u["name"], u["role"], ",".join(u.get("groups") or []) or None]
                         for u in users])


def user_view(user):
    lines = [format_fields([("ID", user["id"]), ("NAME", user["name"]), ("ROLE", user["role"]),
                            ("GROUPS", ", ".join(user.get("groups") or []) or "-"),
                            ("CREATED", when(user.get("created_at")))])]
    if user.get("quota"):
        lines += ["QUOTA (used / limit)", quota_text(user["quota"])]
    return "\n".join(lines)


def group_table(groups):
    return format_table(["ID", "NAME", "USERS"],
                        [[g["id"], g["name"], len(g.get("users") or [])] for g in groups])


def group_view(group):
    lines = [format_fields([("ID", group["id"]), ("NAME", group["name"]),
                            ("USERS", ", ".join(group.get("users") or []) or "-")])]
    if group.get("quota"):
        lines += ["QUOTA (used / limit)", quota_text(group["quota"])]
    return "\n".join(lines)


def request_table(requests):
    return format_table(
        ["ID", "KIND", "OWNER", "STATE", "WAITING FOR", "VCPU", "MEM", "MADE"],
        [[r["id"], r["kind"], r["owner"], r["state"], r.get("waiting_for"), r.get("vcpu"),
          megabytes(r.get("memory")),
          ",".join(f"vm {i}" for i in r.get("vm_ids") or []) or
          (f"service {r['service_id']}" if r.get("service_id") is not None else None)]
         for r in requests])


def request_view(request):
    made = ", ".join(f"VM {i}" for i in request.get("vm_ids") or []) or \
        (f"service {request['service_id']}" if request.get("service_id") is not None else None)
    lines = [format_fields([
        ("ID", request["id"]), ("KIND", request["kind"]), ("NAME", request.get("name")),
        ("OWNER", request["owner"]), ("STATE", request["state"]),
        ("STEP", request.get("step")), ("WAITING FOR", request.get("waiting_for")),
        ("REASON", request.get("reason")), ("VCPU", request.get("vcpu")),
        ("MEMORY", megabytes(request.get("memory"))), ("MADE", made),
        ("PROCESS", f"version {request['process_version']}"),
        ("CREATED", when(request.get("created_at")))])]
    if request.get("decisions"):
        lines += ["DECISIONS", "  " + format_table(
            ["STEP", "ROLE", "DECISION", "BY", "WAITED", "REASON"],
            [[d["step"], d["role"], d.get("decision") or "waiting", d.get("decided_by"),
              duration(_seconds_between(d.get("entered_at"), d.get("left_at"))),
              d.get("reason")] for d in request["decisions"]]).replace("\n", "\n  ")]
    if request.get("history"):
        lines += ["HISTORY", "  " + audit_table(request["history"]).replace("\n", "\n  ")]
    return "\n".join(lines)


def _seconds_between(start, end):
    def parse(stamp):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if not start:
        return 0
    finish = parse(end) if end else datetime.now(timezone.utc)
    return (finish - parse(start)).total_seconds()


def stats_view(stats):
    states_line = "  ".join(f"{k} {v}" for k, v in sorted((stats.get("states") or {}).items()))
    steps = format_table(["STEP", "ROLE", "WAITING", "DECIDED", "MEDIAN WAIT"],
                         [[s["step"], s["role"], s["waiting"], s["decided"],
                           duration(s["median_wait_seconds"])] for s in stats.get("steps") or []])
    return f"REQUESTS  {states_line}\n{steps}"


def process_view(process):
    return format_fields([("VERSION", process["id"]), ("PROCESS", process["process_id"]),
                          ("SHA256", process["sha256"]),
                          ("LOADED BY", process.get("loaded_by") or "(the shipped file)"),
                          ("LOADED AT", when(process.get("loaded_at")))])


def audit_table(entries):
    return format_table(["ID", "AT", "ACTOR", "ROLE", "ACTION", "OBJECT", "REASON"],
                        [[e["id"], when(e["at"]), e["actor"], e.get("actor_role"), e["action"],
                          f"{e['object_kind']} {e.get('object_id') or ''}".strip(),
                          e.get("reason")] for e in entries])


def cmd_user_create(args):
    user = client(args).create_user(args.name, new_password(args, args.name), role=args.role,
                                    groups=args.group or ())
    emit(args, user, lambda u: u["id"])


def cmd_user_passwd(args):
    user = client(args).set_password(args.name, new_password(args, args.name))
    emit(args, user, lambda u: f"password of {u['name']} changed; their tokens no longer work")


def cmd_user_chrole(args):
    user = client(args).set_user_role(args.name, args.role)
    emit(args, user, lambda u: f"{u['name']} is now {u['role']}")


def cmd_group_member(method, verb):
    def run(args):
        group = getattr(client(args), method)(args.group, args.user)
        emit(args, group, lambda g: f"{args.user} {verb} group {g['name']}")
    return run


def cmd_quota_set(args):
    limits = {r: getattr(args, r) for r in ("vms", "cpu", "memory", "images")
              if getattr(args, r) is not None}
    if not limits:
        raise UsageError("quota set: give --vms, --cpu, --memory or --images (-1: no limit)")
    quota = client(args).set_quota(args.scope, args.name, **limits)
    emit(args, quota, lambda q: f"quota of {q['scope']} {q['name']} (used / limit)\n"
                                f"{quota_text(q)}")


def cmd_quota_show(args):
    quota = client(args).get_quota(args.scope, args.name)
    emit(args, quota, lambda q: f"quota of {q['scope']} {q['name']} (used / limit)\n"
                                f"{quota_text(q)}")


def cmd_request_list(args):
    emit(args, client(args).list_requests(waiting_for=args.waiting_for, state=args.state,
                                          mine=args.mine), request_table)


def cmd_request_decide(method, verb):
    def run(args):
        request = getattr(client(args), method)(args.id, args.reason)
        emit(args, request, lambda r: f"request {r['id']} {verb}; now {r['state']}"
                                      + (f", waiting for {r['waiting_for']}"
                                         if r.get("waiting_for") else ""))
    return run


def cmd_process_load(args):
    process = client(args).load_process(read_file(args.file))
    emit(args, process, lambda p: f"process {p['process_id']} version {p['id']} in force "
                                  "for new requests")


def cmd_process_show(args):
    process = client(args).get_process()
    if args.bpmn:
        print(process["bpmn"], end="")
        return
    emit(args, process, process_view)


def cmd_audit_list(args):
    api = client(args)
    filters = {"object_kind": args.kind, "object_id": args.object_id, "actor": args.actor}
    if args.request is not None:
        filters.update(object_kind="request", object_id=args.request)
    if args.jsonl:
        for entry in api.audit_entries(**filters):
            print(json.dumps(entry, sort_keys=True))
        return
    emit(args, list(api.audit_entries(**filters)), audit_table)


def add_request_management_commands(groups, command):
    as_ref = {"metavar": "NAME"}
    user = groups.add_parser("user", help="users and their roles (admin, cloud-admin, "
                                          "finance, user)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    create = command(user, "create", cmd_user_create, "create a user (administrators)")
    create.add_argument("name")
    create.add_argument("--role", default="user", choices=("admin", "cloud-admin", "finance",
                                                            "user"))
    create.add_argument("--group", action="append", help="a group to join (repeatable)")
    create.add_argument("--password", help="default: CIRRUS_NEW_PASSWORD, else asked for")
    command(user, "list", lambda a: emit(a, client(a).list_users(), user_table),
            "list users (yourself, unless you are an administrator)")
    show = command(user, "show", lambda a: emit(a, client(a).get_user(a.name), user_view),
                   "show a user, with their quota")
    show.add_argument("name", **as_ref)
    delete = command(user, "delete", lambda a: emit(
        a, client(a).delete_user(a.name), lambda u: f"user {u['name']} deleted"),
        "delete a user who owns nothing any more")
    delete.add_argument("name", **as_ref)
    passwd = command(user, "passwd", cmd_user_passwd,
                     "change a password (yours, or anyone's as an administrator)")
    passwd.add_argument("name", **as_ref)
    passwd.add_argument("--password", help="default: CIRRUS_NEW_PASSWORD, else asked for")
    chrole = command(user, "chrole", cmd_user_chrole, "change a user's role")
    chrole.add_argument("name", **as_ref)
    chrole.add_argument("role", choices=("admin", "cloud-admin", "finance", "user"))

    group = groups.add_parser("group", help="groups of users (quotas apply to them too)") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    create = command(group, "create", lambda a: emit(
        a, client(a).create_group(a.name), lambda g: g["id"]), "create a group")
    create.add_argument("name")
    command(group, "list", lambda a: emit(a, client(a).list_groups(), group_table),
            "list groups")
    for name, method, help in (("show", "get_group", "show a group, its users and quota"),
                               ("delete", "delete_group", "delete a group (not its users)")):
        cmd = command(group, name, lambda a, m=method, n=name: emit(
            a, getattr(client(a), m)(a.name),
            group_view if n == "show" else (lambda g: f"group {g['name']} deleted")), help)
        cmd.add_argument("name", **as_ref)
    for name, method, verb in (("adduser", "group_add_user", "joined"),
                               ("deluser", "group_del_user", "left")):
        cmd = command(group, name, cmd_group_member(method, verb),
                      f"{'add a user to' if name == 'adduser' else 'remove a user from'} a group")
        cmd.add_argument("group")
        cmd.add_argument("user")

    quota = groups.add_parser("quota", help="quotas of users and groups: VMs, vCPUs, memory, "
                                            "images").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    qset = command(quota, "set", cmd_quota_set, "set limits (-1: no limit; others unchanged)")
    qset.add_argument("scope", choices=("user", "group"))
    qset.add_argument("name", **as_ref)
    for resource, help in (("vms", "VMs"), ("cpu", "virtual CPUs"), ("memory", "MB of memory"),
                           ("images", "images")):
        qset.add_argument(f"--{resource}", type=number(int), help=help)
    qshow = command(quota, "show", cmd_quota_show, "show a quota: used / limit")
    qshow.add_argument("scope", choices=("user", "group"))
    qshow.add_argument("name", **as_ref)

    request = groups.add_parser("request", help="provisioning requests and their approvals") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    rlist = command(request, "list", cmd_request_list, "list requests")
    rlist.add_argument("--waiting-for", metavar="ROLE", help="only those waiting for ROLE")
    rlist.add_argument("--state", help="WAITING, APPROVED, PROVISIONED, REJECTED or FAILED")
    rlist.add_argument("--mine", action="store_true", help="only your own")
    rshow = command(request, "show", lambda a: emit(a, client(a).get_request(a.id),
                                                    request_view),
                    "show a request: its step, who must act, decisions and history")
    rshow.add_argument("id", type=resource_id)
    for name, method, verb in (("approve", "approve_request", "approved"),
                               ("reject", "reject_request", "rejected")):
        cmd = command(request, name, cmd_request_decide(method, verb),
                      f"{name} the step waiting for your role")
        cmd.add_argument("id", type=resource_id)
        cmd.add_argument("--reason", required=True, help="why (kept in the audit log)")
    command(request, "stats", lambda a: emit(a, client(a).request_stats(), stats_view),
            "requests per state and step, with the median wait at each step")
    process = request.add_parser("process", help="the approval process (BPMN)") \
        .add_subparsers(dest="process_action", metavar="ACTION", required=True)
    load = command(process, "load", cmd_process_load,
                   "put a BPMN file in force for new requests (administrators)")
    load.add_argument("file", help="a BPMN 2.0 file, or - for standard input")
    pshow = command(process, "show", cmd_process_show, "the process in force")
    pshow.add_argument("--bpmn", action="store_true", help="print its BPMN file")

    audit = groups.add_parser("audit", help="the audit log (administrators and approvers)") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    alist = command(audit, "list", cmd_audit_list, "list audit entries, oldest first")
    alist.add_argument("--request", type=resource_id, help="only the entries of one request")
    alist.add_argument("--kind", help="only entries about this kind of object")
    alist.add_argument("--object-id", help="only entries about this object (with --kind)")
    alist.add_argument("--actor", help="only entries by this user")
    alist.add_argument("--jsonl", action="store_true", help="export: one JSON object a line")


# ----------------------------------------------------------------- OneFlow (issue 6)

def name_value(text):
    """NAME=VALUE for --attr and --network; the name keeps its case."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"invalid {text!r}: give NAME=VALUE")
    return name.strip(), value


def network_value(text):
    """NETWORK=VNET for --network: the template's network name and a
    virtual network by name or id."""
    name, vnet = name_value(text)
    return name, named_ref("virtual network")(vnet)


def read_json_file(path):
    """A file's text, once it is known to be JSON; the error names the file."""
    text = read_file(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        where = "stdin" if path == "-" else repr(path)
        raise UsageError(f"{where} is not JSON: {exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}") from None
    return text


def template_roles(template):
    roles = (template.get("body") or {}).get("roles")
    return [r for r in roles if isinstance(r, dict)] if isinstance(roles, list) else []


def flow_template_table(templates):
    return format_table(["ID", "NAME", "OWNER", "ROLES", "CREATED"],
                        [[t["id"], t["name"], t.get("owner"),
                          ",".join(str(r.get("name")) for r in template_roles(t)) or None,
                          when(t.get("created_at"))] for t in templates])


def flow_template_view(template):
    return "\n".join([
        f"SERVICE TEMPLATE {template['id']}",
        format_fields([("NAME", template["name"]), ("OWNER", template.get("owner")),
                       ("CREATED", when(template.get("created_at")))], indent="  "),
        "", json.dumps(template.get("body"), indent=2)])


def running_nodes(flow, role):
    """How many of a role's VMs count as running: RUNNING, and READY too
    when the service has the ready_status_gate."""
    gate = flow.get("ready_status_gate")
    return sum(1 for node in role.get("nodes") or ()
               if node["status"] == "RUNNING" and (node.get("ready") or not gate))


def flow_table(flows):
    return format_table(["ID", "NAME", "OWNER", "STATE", "ROLES", "VMS"],
                        [[f["id"], f["name"], f.get("owner"), f["state"],
                          ",".join(r["name"] for r in f.get("roles") or ()) or None,
                          sum(len(r.get("nodes") or ()) for r in f.get("roles") or ())]
                         for f in flows])


def flow_view(flow):
    parts = [f"SERVICE {flow['id']}", format_fields([
        ("NAME", flow["name"]), ("OWNER", flow.get("owner")), ("STATE", flow["state"]),
        ("TEMPLATE", flow.get("template_id")), ("DEPLOYMENT", flow.get("deployment") or None),
        ("READY_GATE", yes_no(flow.get("ready_status_gate"))),
        ("MESSAGE", flow.get("message") or None), ("CREATED", when(flow.get("created_at"))),
        ("UPDATED", when(flow.get("updated_at")))], indent="  ")]
    for title, values in (("CUSTOM ATTRIBUTES", flow.get("custom_attrs")),
                          ("NETWORKS", flow.get("networks"))):
        if values:
            parts += ["", title, format_fields(
                [(k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                 for k, v in sorted(values.items())], indent="  ")]
    roles = flow.get("roles") or []
    parts += ["", "ROLES", format_table(
        ["NAME", "STATE", "RUNNING", "MIN", "MAX", "PARENTS", "COOLDOWN_UNTIL", "MESSAGE"],
        [[r["name"], r["state"], f"{running_nodes(flow, r)}/{r['cardinality']}",
          r.get("min_vms"), r.get("max_vms"), ",".join(r.get("parents") or ()) or None,
          when(r.get("cooldown_until")), r.get("message") or None] for r in roles])]
    nodes = [[r["name"], n["vm_id"], n["status"], yes_no(n.get("ready"))]
             for r in roles for n in r.get("nodes") or ()]
    if nodes:
        parts += ["", "NODES", format_table(["ROLE", "VM", "STATUS", "READY"], nodes)]
    if flow.get("log"):
        parts += ["", "LOG", format_table(
            ["AT", "SEV", "MESSAGE"],
            [[when(e.get("at")), e.get("severity"), e.get("message")] for e in flow["log"]])]
    return "\n".join(parts)


PROGRESS_WIDTH = 20


def flow_progress(flow):
    """`flow deploy-wait`'s view: each role's running VMs as a bar, and what
    the others are doing."""
    rows = []
    for role in flow.get("roles") or ():
        running, wanted = running_nodes(flow, role), role["cardinality"]
        filled = PROGRESS_WIDTH * min(running, wanted) // wanted if wanted else PROGRESS_WIDTH
        waiting = {}
        for node in role.get("nodes") or ():
            if node["status"] == "RUNNING" and not node.get("ready") and \
                    flow.get("ready_status_gate"):
                waiting["not READY"] = waiting.get("not READY", 0) + 1
            elif node["status"] != "RUNNING":
                waiting[node["status"]] = waiting.get(node["status"], 0) + 1
        rows.append([role["name"], role["state"],
                     "[" + "#" * filled + "." * (PROGRESS_WIDTH - filled) + "]",
                     f"{running}/{wanted}",
                     ", ".join(f"{count} {status}" for status, count in waiting.items()) or None])
    head = f"SERVICE {flow['id']} ({flow['name']}): {flow['state']}"
    if flow.get("message"):
        head += f"  {flow['message']}"
    return "\n".join([head, format_table(["ROLE", "STATE", "PROGRESS", "RUNNING", "WAITING"],
                                         rows)])


def cmd_flow_template_create(args):
    template = client(args).create_flow_template(read_json_file(args.file))
    emit(args, template, lambda t: t["id"])


def cmd_flow_template_update(args):
    body = read_json_file(args.file)
    api = client(args)
    template = api.update_flow_template(api.flow_template_id(args.id), body)
    emit(args, template, lambda t: f"service template {t['id']} ({t['name']}) updated")


def cmd_flow_template_clone(args):
    api = client(args)
    template = api.clone_flow_template(api.flow_template_id(args.id), args.name)
    emit(args, template, lambda t: t["id"])


def cmd_flow_template_instantiate(args):
    """Through a provisioning request, like vm create: the service's id when
    it is made at once, else the request that waits for an approval."""
    api = client(args)
    networks = {name: api.vnet_id(vnet) for name, vnet in args.network or ()}
    request = api.submit_flow(api.flow_template_id(args.id), name=args.name,
                              custom_attrs=dict(args.attr or ()), networks=networks)
    emit_made_or_request(args, request, "service")


def flow_action(method, verb, **options):
    """The command of a service action: the SDK's ``method`` with the service
    and ``options`` (SDK argument: args attribute); ``verb`` may name args."""
    def run(args):
        api = client(args)
        service = getattr(api, method)(api.flow_id(args.id), **{
            name: getattr(args, attr) for name, attr in options.items()})
        emit(args, service, lambda s: f"service {s['id']} ({s['name']}): "
                                      f"{verb.format(**vars(args))} accepted; now {s['state']}")
    return run


def cmd_flow_add_role(args):
    body = read_json_file(args.file)
    api = client(args)
    service = api.add_flow_role(api.flow_id(args.id), body)
    emit(args, service, lambda s: f"service {s['id']} ({s['name']}): role "
                                  f"{json.loads(body).get('name')} added; now {s['state']}")


def cmd_flow_deploy_wait(args):
    """Follow a service until it is RUNNING, drawing its roles at each change
    (in place on a terminal); exits 1 when it fails or ends instead."""
    from cirrus.client import deployed
    api = client(args)
    live = sys.stdout.isatty() and not args.json
    started, drawn = time.monotonic(), None
    for service in api.follow_flow(api.flow_id(args.id), timeout=args.timeout):
        if args.json:
            print(json.dumps(service, default=str), flush=True)
        else:
            frame = flow_progress(service)
            if frame != drawn:
                print((CLEAR_SCREEN if live else "") + frame + ("" if live else "\n"),
                      flush=True)
                drawn = frame
        if deployed(service):
            if not args.json:
                print(f"service {service['id']} ({service['name']}) is RUNNING after "
                      f"{duration(time.monotonic() - started)}")
            return 0


def add_flow_commands(groups, command):
    """(issue 6) ``flow-template`` and ``flow``; every ID takes a name too."""
    template_ref, service_ref = named_ref("service template"), named_ref("service")
    template_id = {"type": template_ref, "metavar": "TEMPLATE", "help": "template name or id"}
    service_id = {"type": service_ref, "metavar": "SERVICE", "help": "service name or id"}
    json_file = {"metavar": "FILE", "help": "OneFlow JSON ('-' for stdin)"}

    template = groups.add_parser("flow-template", help="OneFlow service templates (JSON)") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    command(template, "create", cmd_flow_template_create,
            "save a service template; prints its id").add_argument("file", **json_file)
    listing, show, delete = listing_commands("flow_template", "service template",
                                             flow_template_table, flow_template_view)
    command(template, "list", listing, "list service templates")
    for name, func, help in [("show", show, "show a service template"),
                             ("delete", delete, "delete a service template")]:
        command(template, name, func, help).add_argument("id", **template_id)
    update = command(template, "update", cmd_flow_template_update,
                     "replace a service template's JSON")
    update.add_argument("id", **template_id)
    update.add_argument("file", **json_file)
    instantiate = command(template, "instantiate", cmd_flow_template_instantiate,
                          "request a service from a template; prints its id, or the "
                          "request when it waits for an approval")
    instantiate.add_argument("id", **template_id)
    instantiate.add_argument("--name", help="default: the template's name")
    instantiate.add_argument("--attr", type=name_value, action="append", metavar="NAME=VALUE",
                             help="a value of the template's custom_attrs; repeat for each")
    instantiate.add_argument("--network", type=network_value, action="append",
                             metavar="NETWORK=VNET",
                             help="the virtual network (name or id) for one of the template's "
                                  "networks; repeat for each")
    clone = command(template, "clone", cmd_flow_template_clone,
                    "copy a service template under a new name; prints the copy's id")
    clone.add_argument("id", **template_id)
    clone.add_argument("name", help="the copy's name")

    flow = groups.add_parser("flow", help="OneFlow services: VMs in roles") \
        .add_subparsers(dest="action", metavar="ACTION", required=True)
    listing, show, _ = listing_commands("flow", "service", flow_table, flow_view)
    command(flow, "list", listing, "list services")
    command(flow, "show", show, "show a service, its roles and their VMs").add_argument(
        "id", **service_id)
    for name, func, help in [
            ("delete", flow_action("delete_flow", "undeploy"),
             "undeploy a service: its roles shut down in reverse order, then it is DONE"),
            ("release", flow_action("release_flow", "release"),
             "deploy a service instantiated on hold")]:
        command(flow, name, func, help).add_argument("id", **service_id)
    recover = command(flow, "recover", flow_action("recover_flow", "recover", delete="delete"),
                      "retry what failed in a FAILED_* service")
    recover.add_argument("id", **service_id)
    recover.add_argument("--delete", action="store_true",
                         help="remove the service instead, with the VMs it still has")
    scale = command(flow, "scale", flow_action("scale_flow", "scale {role} to {cardinality}",
                                               role="role", cardinality="cardinality",
                                               force="force"),
                    "set how many VMs a role has")
    scale.add_argument("id", **service_id)
    scale.add_argument("role", metavar="ROLE")
    scale.add_argument("cardinality", type=number(int), metavar="N", help="0 or more")
    scale.add_argument("--force", action="store_true", help="even past the role's min_vms or "
                                                            "max_vms")
    action = command(flow, "action", flow_action(
        "flow_role_action", "{role_action} on role {role}", role="role", action="role_action",
        period="period", number="number"),
        "run a VM action (poweroff, terminate, reboot...) on every VM of a role")
    action.add_argument("id", **service_id)
    action.add_argument("role", metavar="ROLE")
    action.add_argument("role_action", metavar="ACTION")
    action.add_argument("--period", type=number(int), default=0, metavar="S",
                        help="seconds between batches (with --number)")
    action.add_argument("--number", type=number(int), default=0, metavar="N",
                        help="VMs per batch (default: all at once)")
    add_role = command(flow, "add-role", cmd_flow_add_role,
                       "add a role (OneFlow JSON of one role) to a running service")
    add_role.add_argument("id", **service_id)
    add_role.add_argument("file", metavar="FILE", help="the role's JSON ('-' for stdin)")
    remove_role = command(flow, "remove-role", flow_action(
        "remove_flow_role", "remove role {role}", role="role"),
        "remove a role: its VMs end first; refused while other roles have it as a parent")
    remove_role.add_argument("id", **service_id)
    remove_role.add_argument("role", metavar="ROLE")
    wait = command(flow, "deploy-wait", cmd_flow_deploy_wait,
                   "a live view of a service's roles until it is RUNNING; fails if it reaches "
                   "a FAILED state")
    wait.add_argument("id", **service_id)
    wait.add_argument("--timeout", type=number(float, positive=True), default=600.0,
                      help="seconds (default 600)")


def unreachable_hint(args, details):
    """What to check when the gateway could not be reached, from gRPC's words."""
    from cirrus import config
    from cirrus.client import default_address
    address, said = args.address or default_address(), details.lower()
    if "certificate_verify_failed" in said:
        return (f"the certificate of the gateway at {address} is not signed by a CA of "
                "--tls-ca or gateway.tls_ca")
    if "wrong_version_number" in said:
        return (f"the gateway at {address} does not serve TLS: leave out --tls-ca and "
                "gateway.tls_ca")
    if "socket closed" in said and not (args.tls_ca or config.get()["gateway"].get("tls_ca")):
        return f"does the gateway at {address} serve TLS? then give its CA with --tls-ca"
    return f"is cirrus-gateway running at {address}?"


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.request_id = args.request_id or uuid.uuid4().hex    # every call of this command
    if args.verbose:
        print(f"cirrus: request id {args.request_id}", file=sys.stderr)
    from cirrus.client import ClientError
    from cirrus.config import ConfigError
    try:
        code = args.func(args)
    except (ClientError, UsageError) as exc:
        details = exc.details
        if exc.code == "UNAVAILABLE" and "failed to connect" in details.lower():
            details += f" ({unreachable_hint(args, details)})"
        print(f"cirrus: {exc.code}: {details}", file=sys.stderr)
        code = 1
    except ConfigError as exc:
        print(f"cirrus: configuration: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
