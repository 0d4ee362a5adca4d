"""OneGate on a whole cluster (cirrus-launch, the embedded test driver),
through gRPC, the CLI and HTTP as guests send it: the secret's rotation
(old tokens 401 at once, new deploys get tokens that work, administrators
only, audited), and a guest scaling its live flow service within its role's
min_vms and max_vms, with the body checks on the same live stack."""
import hashlib
import hmac
import secrets

import pytest
import requests
from sqlalchemy import create_engine, text

from cirrus.client import Client, ClientError
from tests.procs import wait_until

ROLE_VM = 'CPU = 0.05\nMEMORY = 16\nCONTEXT = [ TOKEN = "YES" ]\n'


@pytest.fixture(scope="module")
def database(cluster):
    engine = create_engine(cluster.db_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.client(timeout=60)


def running_service(api, name, cardinality=1, min_vms=None, max_vms=None):
    role = {"name": "web", "cardinality": cardinality, "vm_template_contents": ROLE_VM,
            **({"min_vms": min_vms} if min_vms is not None else {}),
            **({"max_vms": max_vms} if max_vms is not None else {})}
    template = api.create_flow_template({"name": name, "deployment": "straight",
                                         "cooldown": 0, "roles": [role]})
    sid = api.instantiate_flow_template(template["id"])["id"]
    wait_until(lambda: api.get_flow(sid)["state"] == "RUNNING", 90, interval=0.3,
               what=f"service {name} RUNNING")
    return sid


def settled(api, sid, count):
    """Whether role web has ``count`` VMs, all RUNNING, and the service is done scaling."""
    flow = api.get_flow(sid)
    nodes = [n for r in flow["roles"] for n in r.get("nodes") or ()]
    return flow["state"] in ("RUNNING", "COOLDOWN") and len(nodes) == count and \
        all(n["status"] == "RUNNING" for n in nodes)


def web_vms(api, sid):
    role = next(r for r in api.get_flow(sid)["roles"] if r["name"] == "web")
    return sorted(n["vm_id"] for n in role.get("nodes") or ())


def token_of(database, vm_id):
    with database.connect() as conn:
        return conn.execute(text("SELECT token FROM vm_devices WHERE vm_id = :id"),
                            {"id": vm_id}).scalar()


def kept_secret(database):
    with database.connect() as conn:
        return conn.execute(text("SELECT value FROM settings WHERE key = 'gate.secret'")).scalar()


def gate(cluster, method, path, vm_id, token, body=None):
    return requests.request(method, f"http://127.0.0.1:{cluster.gate_port}{path}", data=body,
                            headers={"X-ONEGATE-VMID": str(vm_id), "X-ONEGATE-TOKEN": token},
                            timeout=30)


def error(answer):
    return answer.json()["error"]["message"]


def test_rotating_the_secret_kills_old_tokens_and_new_deploys_get_working_ones(
        cluster, api, database):
    sid = running_service(api, "rotate")
    [before] = web_vms(api, sid)
    old_token = token_of(database, before)
    assert gate(cluster, "GET", "/vm", before, old_token).status_code == 200
    old_secret = kept_secret(database)

    name = "gate-user-" + secrets.token_hex(3)
    api.create_user(name, "a-long-password", role="user")
    with Client(f"127.0.0.1:{cluster.port}", username=name,
                password="a-long-password") as user:
        with pytest.raises(ClientError) as refused:
            user.rotate_gate_secret()
    assert refused.value.code == "PERMISSION_DENIED"
    assert "administrators" in refused.value.details
    assert kept_secret(database) == old_secret

    done = cluster.cli("gate", "rotate-secret")
    assert "rotated at" in done.stdout
    new_secret = kept_secret(database)
    assert new_secret != old_secret and new_secret not in done.stdout + done.stderr
    shown = cluster.json("gate", "rotate-secret")      # a second rotation, as JSON
    assert set(shown) == {"rotated_at"}
    newest = kept_secret(database)
    assert newest != new_secret

    # the VM deployed before: its token is dead at once, on every route
    for method, path, body in (("GET", "/vm", None), ("PUT", "/vm", "X = 1"),
                               ("GET", "/service", None)):
        answer = gate(cluster, method, path, before, old_token, body)
        assert answer.status_code == 401, (path, answer.text)

    # a VM deployed after: a token of the newest secret, which works
    api.scale_flow(sid, "web", 2)
    wait_until(lambda: settled(api, sid, 2), 90, interval=0.5, what="the second VM RUNNING")
    [after] = [vm for vm in web_vms(api, sid) if vm != before]
    new_token = token_of(database, after)
    with database.connect() as conn:
        started = conn.execute(text("SELECT started_at FROM vm_devices WHERE vm_id = :id"),
                               {"id": after}).scalar()
    assert new_token == hmac.new(newest.encode(), f"{after}:{started.isoformat()}".encode(),
                                 hashlib.sha256).hexdigest()
    answer = gate(cluster, "PUT", "/vm", after, new_token, "AFTER_ROTATION = yes")
    assert answer.status_code == 200, answer.text
    assert answer.json()["VM"]["USER_TEMPLATE"]["AFTER_ROTATION"] == "yes"
    assert gate(cluster, "GET", "/vm", before, new_token).status_code == 401

    rotations = [e for e in api.list_audit(object_kind="setting", object_id="gate.secret")
                 if e["action"] == "gate.secret.rotated"]
    assert [(e["actor"], e["actor_role"]) for e in rotations[-2:]] == [("admin", "admin")] * 2
    assert all(old_secret not in str(e) and newest not in str(e) for e in rotations)
    api.delete_flow(sid)


def test_a_guest_scales_its_live_service_within_min_and_max(cluster, api, database):
    sid = running_service(api, "elastic", cardinality=2, min_vms=1, max_vms=3)
    guest = web_vms(api, sid)[0]
    token = token_of(database, guest)

    def scale(body):
        return gate(cluster, "PUT", "/service/role/web", guest, token, body)

    for cardinality, bound in ((4, "max_vms 3"), (0, "min_vms 1")):
        answer = scale(f'{{"cardinality": {cardinality}}}')
        assert answer.status_code == 409 and bound in error(answer), answer.text
    # the body checks, on the live stack: nothing reaches flow
    answer = scale("{'cardinality': 'many'}")
    assert answer.status_code == 400 and "cardinality" in error(answer)
    answer = scale('{"cardinality": 3, "force": true}')
    assert answer.status_code == 400 and "force" in error(answer)
    answer = scale('{"cardinality": 3}' + " " * (64 * 1024))
    assert answer.status_code == 413
    answer = gate(cluster, "PUT", "/vm", guest, token, "LOAD = " + "9" * (64 * 1024))
    assert answer.status_code == 413
    assert [r["cardinality"] for r in api.get_flow(sid)["roles"]] == [2]

    answer = scale('{"cardinality": 3}')                 # at max_vms: accepted
    assert answer.status_code == 200, answer.text
    [role] = answer.json()["SERVICE"]["roles"]
    assert role["cardinality"] == 3
    wait_until(lambda: settled(api, sid, 3), 90, interval=0.5, what="the role at 3 VMs")
    answer = scale("{'cardinality' : 1}")                # OpenNebula's own example's quoting
    assert answer.status_code == 200, answer.text
    wait_until(lambda: settled(api, sid, 1), 90, interval=0.5, what="the role at 1 VM")
    assert [r["cardinality"] for r in api.get_flow(sid)["roles"]] == [1]
    scaled = [e["details"]["cardinality"] for e in api.list_audit(object_kind="service",
                                                                   object_id=str(sid))
              if e["action"] == "gate.service.scale" and e["actor"] == f"vm:{guest}"]
    assert scaled == [3, 1]
    api.delete_flow(sid)
