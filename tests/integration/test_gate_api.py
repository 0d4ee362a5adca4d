"""OneGate as a process (``cirrus-gate``) on the real database and broker:
VMs deployed through lifecycle's logic with CONTEXT TOKEN = YES, two
services and a lone VM written as flow keeps them, and guests' requests
over HTTP. Tokens, reach, restrictions, limits, audit, and 200 concurrent
updates from 20 VMs."""
import concurrent.futures
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from cirrus import db
from cirrus.db.models import (AuditEntry, FlowNode, FlowRole, FlowService, User, VirtualMachine,
                              VmDevices)
from services.lifecycle import logic, monitoring
from tests.procs import Proc, free_port
from tests.vm_devices import answer, deploy_to_running

TOKEN_VM = 'CPU = 0.1\nMEMORY = 32\nCONTEXT = [ TOKEN = "YES" ]\n'


def make_vm(s, owner_id, host_id, name, template=TOKEN_VM, extra=None):
    from cirrus.template import parse
    body = {**parse(template), **(extra or {})}
    vm = logic.allocate(s, owner_id, name, 0.1, 1, 32, body)
    s.flush()
    deploy_to_running(s, vm.id, host_id)
    return vm.id


def make_service(s, owner_id, name, roles):
    """A service as flow keeps it: {role: [vm ids]}; RUNNING."""
    service = FlowService(name=name, owner_id=owner_id, body={"name": name, "roles": []},
                          state="RUNNING")
    s.add(service)
    s.flush()
    for position, (role_name, vm_ids) in enumerate(roles.items()):
        role = FlowRole(service_id=service.id, name=role_name, position=position,
                        body={"name": role_name, "min_vms": 1, "max_vms": 3}, state="RUNNING",
                        cardinality=len(vm_ids))
        s.add(role)
        s.flush()
        for vm_id in vm_ids:
            s.add(FlowNode(vm_id=vm_id, role_id=role.id, service_id=service.id,
                           status="RUNNING"))
            vm = s.get(VirtualMachine, vm_id)
            vm.template = {**vm.template, "SERVICE_ID": str(service.id), "ROLE_NAME": role_name}
    return service.id


@pytest.fixture(scope="module")
def world(cirrus_env):
    """VMs a1 (master) and a2, a3 (slaves) of service A, b1 of service B,
    c1 alone, n1 without a token; plus 20 VMs of one service for the
    concurrency test."""
    factory = db.session_factory()
    with factory() as s, s.begin():
        owner = s.scalar(select(User.id).where(User.name == "admin"))
        host = logic.create_host(s, f"gate-{uuid.uuid4().hex[:8]}")
        monitoring.handle_monitor(s, {"host": host.name, "monitoring": {
            "TOTALCPU": 100 * 100, "TOTALMEMORY": 100 * 1024 * 1024}})
        ids = {name: make_vm(s, owner, host.id, name) for name in ("a1", "a2", "a3", "b1", "c1")}
        ids["n1"] = make_vm(s, owner, host.id, "n1", 'CPU = 0.1\nMEMORY = 32\n')
        many = [make_vm(s, owner, host.id, f"many-{i}") for i in range(20)]
        services = {
            "A": make_service(s, owner, "gate-A", {"master": [ids["a1"]],
                                                   "slave": [ids["a2"], ids["a3"]]}),
            "B": make_service(s, owner, "gate-B", {"solo": [ids["b1"]]}),
            "M": make_service(s, owner, "gate-many", {"worker": many})}
    with factory() as s:
        tokens = {vm_id: token for vm_id, token in s.execute(
            select(VmDevices.vm_id, VmDevices.token))}
    yield {"ids": ids, "many": many, "services": services, "tokens": tokens,
           "factory": factory, "host": host.id}
    with factory() as s, s.begin():     # no flow process should ever pick these up
        s.execute(update(FlowService).where(FlowService.id.in_(services.values()))
                  .values(state="DONE"))


def start_gate(env, tmp_path, **settings):
    port = free_port()
    env = {**env, "CIRRUS_GATE_PORT": str(port), "CIRRUS_GATE_RATE": "0",
           **{f"CIRRUS_GATE_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = Proc(["cirrus-gate"], env, tmp_path / f"gate-{port}.log").start()
    proc.wait_for("gate started", timeout=30)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gate(cirrus_env, world, tmp_path_factory):
    proc, url = start_gate(cirrus_env, tmp_path_factory.mktemp("gate"))
    yield url
    proc.stop()


class Guest:
    """What a guest sends: its VMID and token headers."""

    def __init__(self, base, vm_id, token):
        self.base, self.http = base, requests.Session()
        self.http.headers.update({"X-ONEGATE-VMID": str(vm_id), "X-ONEGATE-TOKEN": token})

    def get(self, path, **kw):
        return self.http.get(self.base + path, timeout=30, **kw)

    def put(self, path, data, **kw):
        return self.http.put(self.base + path, data=data, timeout=30, **kw)

    def post(self, path, data, **kw):
        return self.http.post(self.base + path, data=data, timeout=30, **kw)


@pytest.fixture
def guest(gate, world):
    def make(name, token=None, vm_id=None):
        vm = world["ids"].get(name, name)
        return Guest(gate, vm if vm_id is None else vm_id,
                     world["tokens"][vm] if token is None else token)
    return make


def message(response):
    return response.json()["error"]["message"]


# ---------------------------------------------------------------- tokens

def test_a_guest_reads_its_vm_in_opennebulas_format(guest, world):
    answer = guest("a1").get("/vm")
    assert answer.status_code == 200, answer.text
    vm = answer.json()["VM"]
    assert (vm["ID"], vm["NAME"], vm["STATE"], vm["LCM_STATE"]) == (
        str(world["ids"]["a1"]), "a1", "3", "3")
    assert vm["USER_TEMPLATE"]["SERVICE_ID"] == str(world["services"]["A"])
    assert vm["USER_TEMPLATE"]["ROLE_NAME"] == "master"
    links = guest("a1").get("/").json()
    assert links["vm_info"].endswith("/vm") and links["service_info"].endswith("/service")


def test_a_wrong_token_is_401(guest, world):
    token = world["tokens"][world["ids"]["a1"]]
    for wrong in (token[:-1] + ("0" if token[-1] != "0" else "1"), "", "x" * 64, "é"):
        answer = guest("a1", token=wrong).get("/vm")
        assert answer.status_code == 401, wrong
    assert "X-ONEGATE-TOKEN" in message(answer)


def test_the_token_of_vm_a_with_the_vmid_of_b_is_401(guest, world):
    answer = guest("a1", token=world["tokens"][world["ids"]["a2"]]).get("/vm")
    assert answer.status_code == 401
    answer = guest("a1", vm_id="not-a-number").get("/vm")
    assert answer.status_code == 401 and "X-ONEGATE-VMID" in message(answer)


def test_missing_headers_are_401_naming_the_header(gate):
    answer = requests.get(gate + "/vm", timeout=10)
    assert answer.status_code == 401 and "X-ONEGATE-VMID" in message(answer)
    answer = requests.get(gate + "/vm", headers={"X-ONEGATE-VMID": "1"}, timeout=10)
    assert answer.status_code == 401 and "X-ONEGATE-TOKEN" in message(answer)


def test_a_vm_without_a_token_in_its_context_cannot_use_the_gate(guest, world):
    answer = guest(world["ids"]["n1"], token="0" * 64).get("/vm")
    assert answer.status_code == 401


def test_a_token_is_stale_once_its_vm_is_recreated(gate, world):
    factory = world["factory"]
    with factory() as s, s.begin():
        owner = s.scalar(select(User.id).where(User.name == "admin"))
        vm_id = make_vm(s, owner, world["host"], "recreated")
    with factory() as s:
        old = s.get(VmDevices, vm_id).token
    assert Guest(gate, vm_id, old).get("/vm").status_code == 200
    with factory() as s, s.begin():
        logic.vm_action(s, vm_id, "recover", {"operation": "recreate"})
        answer(s, vm_id)                # the cleanup: PENDING again, its devices given back
    with factory() as s, s.begin():      # placed and started again: a new start time
        deploy_to_running(s, vm_id, world["host"])
    with factory() as s:
        new = s.get(VmDevices, vm_id).token
    assert new != old
    assert Guest(gate, vm_id, old).get("/vm").status_code == 401
    assert Guest(gate, vm_id, new).get("/vm").status_code == 200


# ---------------------------------------------------------------- reach and restrictions

def test_a_guest_sees_and_changes_the_vms_of_its_service(guest, world):
    a3 = world["ids"]["a3"]
    assert guest("a1").get(f"/vms/{a3}").json()["VM"]["NAME"] == "a3"
    put = guest("a1").put(f"/vms/{a3}", 'PEER_NOTE = "from a1"')
    assert put.status_code == 200, put.text
    assert guest("a3").get("/vm").json()["VM"]["USER_TEMPLATE"]["PEER_NOTE"] == "from a1"


def test_another_services_vm_is_403(guest, world):
    b1 = world["ids"]["b1"]
    for answer in (guest("a1").get(f"/vms/{b1}"), guest("a1").put(f"/vms/{b1}", "X = 1"),
                   guest("a1").post(f"/vms/{b1}/action", '{"action": {"perform": "resched"}}'),
                   guest("c1").get(f"/vms/{world['ids']['a1']}"),
                   guest("a1").get("/vms/999999999")):
        assert answer.status_code == 403, answer.text
        assert "not in your service" in message(answer)


def test_restricted_attributes_are_403_and_change_nothing(guest, world):
    for body in ("SERVICE_ID = 7", "role_name = evil", "OK = 1\nSCHED_REQUIREMENTS = \"ID=0\""):
        answer = guest("a2").put("/vm", body)
        assert answer.status_code == 403, body
    assert "SCHED_REQUIREMENTS" in message(answer)
    assert guest("a2").put("/vm?type=2", "SERVICE_ID").status_code == 403
    user = guest("a2").get("/vm").json()["VM"]["USER_TEMPLATE"]
    assert "OK" not in user and user["SERVICE_ID"] == str(world["services"]["A"])


def test_service_shows_roles_nodes_and_extended_vm_info(guest, world):
    doc = guest("a2").get("/service").json()["SERVICE"]
    assert doc["id"] == str(world["services"]["A"]) and doc["name"] == "gate-A"
    assert doc["state"] == 2        # OneFlow's RUNNING
    roles = {r["name"]: r for r in doc["roles"]}
    assert roles["slave"]["cardinality"] == 2
    assert [n["deploy_id"] for n in roles["slave"]["nodes"]] == [world["ids"]["a2"],
                                                                 world["ids"]["a3"]]
    assert roles["master"]["nodes"][0]["vm_info"]["VM"] == {"ID": str(world["ids"]["a1"]),
                                                            "NAME": "a1"}
    extended = guest("a2").get("/service?extended").json()["SERVICE"]
    master = extended["roles"][0]["nodes"][0]["vm_info"]["VM"]
    assert master["USER_TEMPLATE"]["ROLE_NAME"] == "master" and master["STATE"] == "3"
    answer = guest("c1").get("/service")
    assert answer.status_code == 404 and "not part of a service" in message(answer)


def test_restricted_action_is_403(guest, world):
    a2 = world["ids"]["a2"]
    answer = guest("a1").post(f"/vms/{a2}/action", '{"action": {"perform": "reboot"}}')
    assert answer.status_code == 403 and "reboot" in message(answer)
    answer = guest("a1").post(f"/vms/{a2}/action", '{"action": {"perform": "explode"}}')
    assert answer.status_code == 400 and "explode" in message(answer)


def test_scale_of_a_role_the_service_lacks_is_404(guest):
    answer = guest("a1").put("/service/role/nosuch", '{"cardinality": 2}')
    assert answer.status_code == 404 and "nosuch" in message(answer)


def test_disabled_route_groups_are_403(cirrus_env, world, tmp_path):
    proc, url = start_gate(cirrus_env, tmp_path, routes_vm_write="false",
                           routes_service_read="false")
    try:
        a1 = Guest(url, world["ids"]["a1"], world["tokens"][world["ids"]["a1"]])
        answer = a1.put("/vm", "X = 1")
        assert answer.status_code == 403 and "gate.routes.vm_write" in message(answer)
        assert a1.get("/service").status_code == 403
        assert a1.get("/vm").status_code == 200
    finally:
        proc.stop()


# ---------------------------------------------------------------- bodies and limits

def test_an_oversized_body_is_413(guest):
    answer = guest("c1").put("/vm", "BIG = " + "x" * (64 * 1024))
    assert answer.status_code == 413 and "65536" in message(answer)

    def chunks():       # no Content-Length: the limit holds while reading
        for _ in range(70):
            yield b"x" * 1024
    answer = guest("c1").put("/vm", chunks())
    assert answer.status_code == 413


@pytest.mark.parametrize("path, body, says", [
    ("/vm", "no equals sign", "body: line 1, column 4: expected '='"),
    ("/vm", "1ABC = x", "'1ABC' is not an attribute name"),
    ("/vm", 'A = "open', "unterminated string"),
    ("/vm", "A = 1\nA = 2", "given more than once"),
    ("/vm", "A = [ B = 1 ]", "vector values"),
    ("/vm", "\n# only a comment\n", "no KEY = VALUE line"),
    ("/vm", b"A = \xff\xfe", "not UTF-8"),
    ("/vm?type=2", "", "name the attribute to erase"),
    ("/vm?type=9", "A = 1", "type: must be 1"),
    ("/service/role/slave", "not json", "not a JSON object"),
    ("/service/role/slave", "[1, 2]", "expected a JSON object, got list"),
    ("/service/role/slave", '{"cardinality": -1}', "cardinality: must be a whole number"),
    ("/service/role/slave", '{"cardinality": 1, "force": true}', "unknown field(s) force"),
])
def test_garbage_bodies_are_400_naming_the_problem(guest, path, body, says):
    answer = guest("a1").put(path, body)
    assert answer.status_code == 400, answer.text
    assert says in message(answer)


def test_unknown_routes_are_400_and_a_post_can_stand_for_a_put(guest):
    answer = guest("c1").get("/nothing/here")
    assert answer.status_code == 400 and "unknown route" in message(answer)
    answer = guest("c1").post("/vm", "VIA_POST = yes", headers={"X-HTTP-Method-Override": "PUT"})
    assert answer.status_code == 200
    assert answer.json()["VM"]["USER_TEMPLATE"]["VIA_POST"] == "yes"
    answer = guest("c1").get("/vm", headers={"X-HTTP-Method-Override": "PUT"})
    assert answer.status_code == 400


def test_erase_removes_a_key_and_every_write_is_audited(guest, world):
    c1 = world["ids"]["c1"]
    assert guest("c1").put("/vm", 'TEMP = "a \\"quoted\\" value"\nKEEP = 1').status_code == 200
    assert guest("c1").get("/vm").json()["VM"]["USER_TEMPLATE"]["TEMP"] == 'a "quoted" value'
    after = guest("c1").put("/vm?type=2", "TEMP").json()["VM"]["USER_TEMPLATE"]
    assert "TEMP" not in after and after["KEEP"] == "1"
    with world["factory"]() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.object_kind == "vm",
                                                     AuditEntry.object_id == str(c1))
                            .order_by(AuditEntry.id)).all()
    writes = [(e.actor, e.action, e.details) for e in entries]
    assert (f"vm:{c1}", "gate.vm.update",
            {"route": "PUT /vm", "set": {"TEMP": 'a "quoted" value', "KEEP": "1"}}) in writes
    assert writes[-1] == (f"vm:{c1}", "gate.vm.erase",
                          {"route": "PUT /vm", "erased": {"TEMP": 'a "quoted" value'}})


def test_each_vm_is_rate_limited_with_429(cirrus_env, world, tmp_path):
    proc, url = start_gate(cirrus_env, tmp_path, rate="1", burst="3")
    try:
        a1 = Guest(url, world["ids"]["a1"], world["tokens"][world["ids"]["a1"]])
        codes = [a1.get("/vm").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        limited = a1.get("/vm")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        # another VM has a bucket of its own
        c1 = Guest(url, world["ids"]["c1"], world["tokens"][world["ids"]["c1"]])
        assert c1.get("/vm").status_code == 200
    finally:
        proc.stop()


# ---------------------------------------------------------------- concurrency

def test_200_concurrent_updates_from_20_vms_lose_nothing(gate, world):
    many = world["many"]
    guests = {vm_id: Guest(gate, vm_id, world["tokens"][vm_id]) for vm_id in many}

    def put(vm_id, n):
        return guests[vm_id].put("/vm", f"K{n} = {vm_id}-{n}").status_code

    jobs = [(vm_id, n) for n in range(10) for vm_id in many]
    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        codes = list(pool.map(lambda job: put(*job), jobs))
    assert codes == [200] * 200
    with world["factory"]() as s:
        for vm_id in many:
            user = s.get(VirtualMachine, vm_id).template["USER_TEMPLATE"]
            assert {f"K{n}": f"{vm_id}-{n}" for n in range(10)}.items() <= user.items(), vm_id


# ---------------------------------------------------------------- the guest's client

ONEGATE_SH = Path(__file__).resolve().parents[2] / "deploy" / "guest" / "onegate.sh"


@pytest.fixture
def onegate_sh(gate, world, tmp_path):
    """deploy/guest/onegate.sh run by busybox sh with busybox wget, reading a
    context directory as the guest's CD holds it."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "wget").symlink_to(busybox)

    def run(name, *args):
        vm_id = world["ids"][name]
        context = tmp_path / f"context-{name}"
        context.mkdir(exist_ok=True)
        (context / "context.sh").write_text(f"VMID='{vm_id}'\nONEGATE_ENDPOINT='{gate}'\n"
                                            "NAME='it''s'\n")
        (context / "token.txt").write_text(world["tokens"][vm_id])
        env = {"PATH": f"{tools}:/usr/bin:/bin", "ONEGATE_CONTEXT": str(context)}
        return subprocess.run([busybox, "sh", str(ONEGATE_SH), *args], env=env,
                              capture_output=True, text=True, timeout=30)
    return run


def test_onegate_sh_shows_updates_erases_and_scales(onegate_sh, world):
    shown = onegate_sh("a2", "vm", "show")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["VM"]["NAME"] == "a2"
    done = onegate_sh("a2", "vm", "update", "--data", 'MOTD=say "hi" \\ bye', "--data", "LOAD=3")
    assert done.returncode == 0, done.stderr
    user = json.loads(done.stdout)["VM"]["USER_TEMPLATE"]
    assert (user["MOTD"], user["LOAD"]) == ('say "hi" \\ bye', "3")
    other = onegate_sh("a2", "vm", "update", str(world["ids"]["a3"]), "--data", "FROM=a2")
    assert json.loads(other.stdout)["VM"]["USER_TEMPLATE"]["FROM"] == "a2"
    erased = json.loads(onegate_sh("a2", "vm", "update", "--erase", "LOAD").stdout)
    assert "LOAD" not in erased["VM"]["USER_TEMPLATE"]
    service = json.loads(onegate_sh("a2", "service", "show").stdout)["SERVICE"]
    assert [r["name"] for r in service["roles"]] == ["master", "slave"]
    refused = onegate_sh("a2", "vm", "update", "--data", "SERVICE_ID=1")
    assert refused.returncode == 1 and "403" in refused.stderr
    bad = onegate_sh("a2", "service", "scale", "--role", "slave", "--cardinality", "two")
    assert bad.returncode == 2 and "--cardinality must be a whole number" in bad.stderr
