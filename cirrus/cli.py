"""``cirrus``: the command line of Cirrus, over the gRPC API.

Read commands print tables or a human view, or JSON with ``--json``. A failed
call prints ``cirrus: <STATUS>: <details>`` to stderr and exits 1; a usage
error exits 2.
"""
import argparse
import getpass
import json
import os
import sys
from datetime import datetime

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
            ("HOST", host), ("CPU", cores(vm["cpu"])), ("VCPU", vm["vcpu"]),
            ("MEMORY", megabytes(vm["memory"])), ("DEPLOY_ID", vm.get("deploy_id")),
            ("ERROR", vm.get("error")), ("SCHEDULER", vm.get("sched_message")),
            ("CREATED", when(vm.get("created_at"))), ("UPDATED", when(vm.get("updated_at"))),
        ], indent="  "),
    ]
    if vm.get("template"):
        parts += ["", "TEMPLATE", template_text(vm["template"], indent="  ")]
    if vm.get("history"):
        parts += ["", "HISTORY", format_table(
            ["SEQ", "ACTION", "FROM", "TO", "HOST", "AT", "MESSAGE"],
            [[h["seq"], h["action"], h.get("from_status"), h["to_status"], h.get("host"),
              when(h.get("at")), h.get("message")] for h in vm["history"]])]
    return "\n".join(parts)


def host_view(host):
    parts = [
        f"HOST {host['id']}",
        format_fields([
            ("NAME", host["name"]), ("STATE", host["state"]),
            ("RUNNING_VMS", host["running_vms"]),
            ("ALLOC_CPU", f"{host['cpu_usage']} / {host['max_cpu']}"),
            ("ALLOC_MEM", f"{megabytes(host['mem_usage'])} / {megabytes(host['max_mem'])}"),
            ("MONITORED", when(host.get("last_monitored_at")) or "never"),
        ], indent="  "),
    ]
    monitoring = dict(host.get("monitoring") or {})
    domains = monitoring.pop("VMS", None)
    if monitoring:
        parts += ["", "MONITORING", format_fields(sorted(monitoring.items()), indent="  ")]
    if domains:
        parts += ["", "DOMAINS", format_table(
            ["VM_ID", "DEPLOY_ID", "STATE"],
            [[d.get("VM_ID"), d.get("DEPLOY_ID"), d.get("STATE")] for d in domains])]
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
    return Client(address=args.address)


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
    with Client(address=args.address, username=user, password=password) as api:
        session = api.login(user, password)
    path = save_token(session["token"])
    print(f"logged in as {session['user']['name']} ({session['user']['role']}); token saved to "
          f"{path}, valid until {when(session.get('expires_at'))}")
    return 0


def cmd_host_create(args):
    host = client(args).create_host(args.name)
    emit(args, host, lambda h: h["id"])


def cmd_host_list(args):
    emit(args, client(args).list_hosts(), host_table)


def cmd_host_show(args):
    emit(args, client(args).get_host(args.id), host_view)


def host_action(method, verb):
    def run(args):
        host = getattr(client(args), method)(args.id)
        emit(args, host, lambda h: f"host {h['id']} ({h['name']}) {verb}; state {h['state']}")
    return run


def cmd_vm_create(args):
    template = read_file(args.file) if args.file else None
    vm = client(args).create_vm(name=args.name, cpu=args.cpu, vcpu=args.vcpu,
                                memory=args.memory, template=template, hold=args.hold)
    emit(args, vm, lambda v: v["id"])


def cmd_vm_list(args):
    emit(args, client(args).list_vms(include_done=args.all), vm_table)


def cmd_vm_show(args):
    emit(args, client(args).get_vm(args.id), vm_view)


def cmd_vm_terminate(args):
    vm = client(args).terminate_vm(args.id, hard=args.hard)
    emit(args, vm, lambda v: f"VM {v['id']} ({v['name']}) is terminating; now {v['status']}")


def cmd_vm_wait(args):
    vm = client(args).wait_vm(args.id, args.state, timeout=args.timeout)
    emit(args, vm, lambda v: f"VM {v['id']} ({v['name']}) is {v['status']}")


def cmd_vm_watch(args):
    try:
        for change in client(args).watch_vms(args.id):
            if args.json:
                print(json.dumps(change, default=str), flush=True)
            else:
                print(change_line(change), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


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
    vm = client(args).instantiate_template(args.id, name=args.name, hold=args.hold)
    emit(args, vm, lambda v: v["id"])


# ----------------------------------------------------------------- parser

def build_parser():
    parser = argparse.ArgumentParser(prog="cirrus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="the gateway (default: gateway.address:port of the configuration)")
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

    host = groups.add_parser("host", help="hypervisor hosts").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    command(host, "create", cmd_host_create, "register a host; prints its id").add_argument("name")
    command(host, "list", cmd_host_list, "list the hosts")
    for name, func, help in [
            ("show", cmd_host_show, "show a host and its monitoring"),
            ("enable", host_action("enable_host", "enabled"), "let VMs be placed on a host"),
            ("disable", host_action("disable_host", "disabled"), "keep new VMs off a host"),
            ("delete", host_action("delete_host", "deleted"), "forget a host with no VMs")]:
        command(host, name, func, help).add_argument("id", type=resource_id)

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
    command(vm, "list", cmd_vm_list, "list VMs").add_argument(
        "--all", action="store_true", help="include terminated (DONE) VMs")
    command(vm, "show", cmd_vm_show, "show a VM with its history").add_argument(
        "id", type=resource_id)
    terminate = command(vm, "terminate", cmd_vm_terminate, "shut a VM down and remove it")
    terminate.add_argument("id", type=resource_id)
    terminate.add_argument("--hard", action="store_true", help="destroy instead of shut down")
    wait = command(vm, "wait", cmd_vm_wait,
                   "wait until a VM reaches a state; fails if it ends elsewhere or times out")
    wait.add_argument("id", type=resource_id)
    wait.add_argument("--state", type=vm_status, required=True, metavar="STATE",
                      help="e.g. RUNNING or DONE")
    wait.add_argument("--timeout", type=number(float, positive=True), default=60.0,
                      help="seconds (default 60)")
    command(vm, "watch", cmd_vm_watch, "print VM state changes until Ctrl-C").add_argument(
        "id", type=resource_id, nargs="?", help="one VM (default: all you can see)")

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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from cirrus.client import ClientError
    from cirrus.config import ConfigError
    try:
        code = args.func(args)
    except (ClientError, UsageError) as exc:
        details = exc.details
        if exc.code == "UNAVAILABLE" and "failed to connect" in details.lower():
            from cirrus.client import default_address
            details += f" (is cirrus-gateway running at {args.address or default_address()}?)"
        print(f"cirrus: {exc.code}: {details}", file=sys.stderr)
        code = 1
    except ConfigError as exc:
        print(f"cirrus: configuration: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
