"""OneFlow (issue 6) through the gRPC gateway, the SDK and the CLI, in front of
the real requests, lifecycle, scheduler and flow services and a simulated node,
on the real broker and database: templates from JSON files, a straight
service followed live to RUNNING, Watch, scaling, role actions, a failed
deploy, undeploy, who sees what, and bad input named."""
import json
import threading

import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cirrus.client import Client
from tests.integration.test_gateway import (  # noqa: F401  (fixtures)
    admin, ann, api, cirrus, refused, start_gateway, unique, user,
)
from tests.procs import Proc, wait_until
from tests.scheduling import running

FLOW_API = ["cirrus.v1.FlowTemplateService", "cirrus.v1.FlowService"]
HOST = "gw-flow-sim"
SMALL_VM = 'NAME = "flow-vm"\nCPU = 0.1\nMEMORY = 32\n'


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    """requests, lifecycle, scheduler and flow; yields their environment."""
    logs = tmp_path_factory.mktemp("gateway-flow")
    more = {"CIRRUS_FLOW_CHECK_INTERVAL": "1", "CIRRUS_FLOW_DEFAULT_COOLDOWN": "0"}
    for procs in running(cirrus_env, logs, ("requests", "lifecycle", "scheduler", "flow"),
                         **more):
        yield procs[0].env, logs


@pytest.fixture(scope="module")
def gateway(services, admin):
    """A gateway in front of the services, and one simulated node."""
    env, logs = services
    gateway, address = start_gateway(env, logs)
    gateway.wait_for("watching flow.service events")
    node = Proc(["cirrus-node", "--host", HOST, "--backend", "simulated"], env,
                logs / "node.log").start()
    try:
        with Client(address, username=admin[0], password=admin[1]) as api:
            host = api.create_host(HOST)
            wait_until(lambda: api.get_host(host["id"])["state"] == "MONITORED",
                       what=f"{HOST} MONITORED")
        yield address
    finally:
        node.stop()
        gateway.stop()


@pytest.fixture
def cli_env(cirrus_env, tmp_path, admin):
    return {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_USER": admin[0],
            "CIRRUS_PASSWORD": admin[1]}


def blog(name, vm_template, slave_template=None, **more):
    """A 2-role straight service: master, then two slaves (1 to 3)."""
    return {"name": name, "deployment": "straight",
            "description": "written for OpenNebula",
            "custom_attrs": {"DB_PASSWORD": "M|password|Database password"},
            "x_vendor": {"kept": ["as", "given"]},      # unknown keys stay
            "roles": [
                {"name": "master", "cardinality": 1, "vm_template": vm_template,
                 "cooldown": 0},
                {"name": "slave", "cardinality": 2, "vm_template": slave_template or vm_template,
                 "parents": ["master"], "min_vms": 1, "max_vms": 3, "cooldown": 0}],
            **more}


@pytest.fixture(scope="module")
def vm_template(gateway, admin):
    with Client(gateway, username=admin[0], password=admin[1]) as api:
        return api.create_template(SMALL_VM, name=unique("flow-small"))["id"]


def json_file(tmp_path, body):
    path = tmp_path / f"{unique('flow')}.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body, indent=2))
    return str(path)


def wait_state(api, service_id, state, timeout=30):
    return wait_until(lambda: (lambda s: s if s["state"] == state else None)(
        api.get_flow(service_id)), timeout=timeout, what=f"service {service_id} {state}")


def roles_of(service):
    return {role["name"]: role for role in service["roles"]}


def running_service(api, vm_template, name=None):
    template = api.create_flow_template(blog(name or unique("blog"), vm_template))
    service = api.instantiate_flow_template(template["id"], custom_attrs={"DB_PASSWORD": "pw"})
    return api.wait_flow(service["id"], timeout=60)


# ----------------------------------------------------------------- the services are there

def test_reflection_and_health_cover_the_flow_services(gateway):
    import grpc
    with grpc.insecure_channel(gateway) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(FLOW_API) <= set(database.get_services())
        watch = DescriptorPool(database).FindServiceByName(
            "cirrus.v1.FlowService").methods_by_name["Watch"]
        assert watch.server_streaming and watch.output_type.full_name == "cirrus.v1.FlowChange"
        health = health_pb2_grpc.HealthStub(channel)
        for service in FLOW_API:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


# ----------------------------------------------------------------- the CLI, end to end

def test_a_straight_service_from_a_json_file_deploys_live_and_shows_its_nodes(
        gateway, api, vm_template, cli_env, tmp_path):
    name = unique("blog")
    created = cirrus(gateway, cli_env, "flow-template", "create",
                     json_file(tmp_path, blog(name, vm_template)))
    assert created.returncode == 0, created.stderr
    template_id = int(created.stdout)
    shown = json.loads(cirrus(gateway, cli_env, "flow-template", "show", name, "--json").stdout)
    assert shown["id"] == template_id and shown["body"] == blog(name, vm_template)
    listed = cirrus(gateway, cli_env, "flow-template", "list").stdout.splitlines()
    assert [str(template_id), name, "admin", "master,slave"] == next(
        row.split()[:4] for row in listed if row.split()[1:2] == [name])

    started = cirrus(gateway, cli_env, "flow-template", "instantiate", name, "--name",
                     f"{name}-1", "--attr", "DB_PASSWORD=s3cret")
    assert started.returncode == 0, started.stderr
    service_id = int(started.stdout)
    waited = cirrus(gateway, cli_env, "flow", "deploy-wait", f"{name}-1", "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert waited.stdout.splitlines()[-1].startswith(f"service {service_id} ({name}-1) is "
                                                     "RUNNING after ")
    frames = [frame.splitlines() for frame in waited.stdout.split("\n\n")[:-1]]
    assert frames[-1][0] == f"SERVICE {service_id} ({name}-1): RUNNING"
    assert frames[-1][2].split()[:4] == ["master", "RUNNING", "[" + "#" * 20 + "]", "1/1"]
    assert frames[-1][3].split()[:4] == ["slave", "RUNNING", "[" + "#" * 20 + "]", "2/2"]
    # straight: no frame shows a slave VM while the master is not yet running
    for frame in frames:
        rows = {line.split()[0]: line.split() for line in frame[2:]}
        if rows["slave"][3] != "0/2" or rows["slave"][4:] != ["-"]:
            assert rows["master"][1] == "RUNNING", frame

    show = cirrus(gateway, cli_env, "flow", "show", str(service_id)).stdout
    nodes = show.split("\nNODES\n", 1)[1].split("\n\n")[0].splitlines()
    assert nodes[0].split() == ["ROLE", "VM", "STATUS", "READY"]
    assert sorted(row.split()[0] for row in nodes[1:]) == ["master", "slave", "slave"]
    assert {row.split()[2] for row in nodes[1:]} == {"RUNNING"}
    assert "  DB_PASSWORD  s3cret" in show
    service = json.loads(cirrus(gateway, cli_env, "flow", "show", str(service_id),
                                "--json").stdout)
    assert (service["state"], service["owner"], service["custom_attrs"]) == (
        "RUNNING", "admin", {"DB_PASSWORD": "s3cret"})
    for role in service["roles"]:
        for node in role["nodes"]:
            assert api.get_vm(node["vm_id"])["status"] == "RUNNING"

    deleted = cirrus(gateway, cli_env, "flow", "delete", str(service_id))
    assert deleted.returncode == 0 and "undeploy accepted" in deleted.stdout, deleted.stderr
    done = wait_state(api, service_id, "DONE")
    vm_ids = [n["vm_id"] for role in service["roles"] for n in role["nodes"]]
    assert [api.get_vm(vm_id)["status"] for vm_id in vm_ids] == ["DONE"] * 3
    assert all(not role["nodes"] for role in done["roles"])


def test_a_failed_deploy_fails_deploy_wait_and_recover_delete_ends_it(
        gateway, api, cli_env, vm_template):
    failing = api.create_template(SMALL_VM + 'SIMULATE_FAIL = "deploy"\n',
                                  name=unique("flow-failing"))["id"]
    template = api.create_flow_template(blog(unique("broken"), vm_template, failing))
    service = api.instantiate_flow_template(template["id"], custom_attrs={"DB_PASSWORD": "pw"})
    waited = cirrus(gateway, cli_env, "flow", "deploy-wait", str(service["id"]),
                    "--timeout", "60")
    assert waited.returncode == 1, waited.stdout
    assert waited.stderr.startswith(f"cirrus: FAILED_PRECONDITION: service {service['id']} "
                                    f"({service['name']}) reached FAILED_DEPLOYING instead of "
                                    "RUNNING"), waited.stderr
    assert f"SERVICE {service['id']} ({service['name']}): FAILED_DEPLOYING" in waited.stdout
    failed = api.get_flow(service["id"])
    assert roles_of(failed)["master"]["state"] == "RUNNING"
    assert roles_of(failed)["slave"]["state"] == "FAILED_DEPLOYING"

    recovered = cirrus(gateway, cli_env, "flow", "recover", str(service["id"]), "--delete")
    assert recovered.returncode == 0, recovered.stderr
    wait_state(api, service["id"], "DONE")


# ----------------------------------------------------------------- Watch and actions

def test_watch_sends_the_current_state_then_each_change_of_a_scale(api, vm_template):
    service = running_service(api, vm_template)
    changes, current_seen = [], threading.Event()

    def read():
        for change in api.watch_flows(service["id"], timeout=60):
            changes.append(change)
            current_seen.set()
            slaves = roles_of(change["flow"])["slave"]
            if change["flow"]["state"] == "RUNNING" and len(slaves["nodes"]) == 3:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert current_seen.wait(10)
    scaled = api.scale_flow(service["id"], "slave", 3)
    assert roles_of(scaled)["slave"]["cardinality"] == 3
    reader.join(60)
    assert not reader.is_alive(), [c["flow"]["state"] for c in changes]
    assert changes[0]["current"] and not any(c["current"] for c in changes[1:])
    assert changes[0]["flow"]["state"] == "RUNNING"
    assert "SCALING" in [c["flow"]["state"] for c in changes[1:]]
    assert [n["status"] for n in roles_of(changes[-1]["flow"])["slave"]["nodes"]] == \
        ["RUNNING"] * 3

    too_many = refused(api.scale_flow, service["id"], "slave", 4)
    assert (too_many.code, too_many.details) == (
        "FAILED_PRECONDITION", "role slave: cardinality 4 is above max_vms 3 (force to go above)")
    unknown = refused(api.scale_flow, service["id"], "db", 2)
    assert (unknown.code, unknown.details) == (
        "INVALID_ARGUMENT", f"role: service {service['id']} has no role 'db'; its roles are "
                            "master, slave")
    assert roles_of(api.get_flow(service["id"]))["slave"]["cardinality"] == 3
    api.delete_flow(service["id"])
    wait_state(api, service["id"], "DONE")


def test_a_role_action_reaches_every_vm_of_the_role(gateway, api, cli_env, vm_template):
    service = running_service(api, vm_template)
    done = cirrus(gateway, cli_env, "flow", "action", str(service["id"]), "slave", "poweroff")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"service {service['id']} ({service['name']}): poweroff on "
                                  "role slave accepted; now ")
    slaves = [n["vm_id"] for n in roles_of(service)["slave"]["nodes"]]
    wait_until(lambda: {api.get_vm(vm_id)["status"] for vm_id in slaves} == {"POWEROFF"},
               timeout=30, what="the slaves POWEROFF")
    master = roles_of(service)["master"]["nodes"][0]["vm_id"]
    assert api.get_vm(master)["status"] == "RUNNING"
    bad = cirrus(gateway, cli_env, "flow", "action", str(service["id"]), "slaves", "poweroff")
    assert (bad.returncode, bad.stderr) == (
        1, f"cirrus: INVALID_ARGUMENT: role: service {service['id']} has no role 'slaves'; "
           "its roles are master, slave\n")
    api.delete_flow(service["id"])
    wait_state(api, service["id"], "DONE")


def test_a_role_is_added_from_a_json_file_and_removed_through_the_cli(
        gateway, api, ann, cli_env, tmp_path, vm_template):
    service = running_service(api, vm_template)
    sid = str(service["id"])
    cache = {"name": "cache", "cardinality": 1, "vm_template": vm_template,
             "parents": ["master"]}
    done = cirrus(gateway, cli_env, "flow", "add-role", sid, json_file(tmp_path, cache))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"service {sid} ({service['name']}): role cache added; now ")
    service = api.wait_flow(service["id"], timeout=60)
    assert [n["status"] for n in roles_of(service)["cache"]["nodes"]] == ["RUNNING"]

    # bad input is named; nothing changes
    not_json = json_file(tmp_path, '{"name": "x",')
    done = cirrus(gateway, cli_env, "flow", "add-role", sid, not_json)
    assert (done.returncode, done.stderr) == (
        1, f"cirrus: INVALID_ARGUMENT: '{not_json}' is not JSON: Expecting property name "
           "enclosed in double quotes at line 1 column 14\n")
    err = refused(api.add_flow_role, service["id"], {**cache, "cardinality": -1})
    assert (err.code, err.details) == (
        "INVALID_ARGUMENT", "role: cardinality: -1 is less than the minimum of 0")
    assert refused(ann.add_flow_role, service["id"], {**cache, "name": "x"}).code == "NOT_FOUND"
    done = cirrus(gateway, cli_env, "flow", "remove-role", sid, "master")
    assert (done.returncode, done.stderr) == (
        1, "cirrus: FAILED_PRECONDITION: role master: role(s) slave, cache depend on it "
           "(parents); remove them first\n")
    err = refused(api.remove_flow_role, service["id"], "nope")
    assert err.code == "INVALID_ARGUMENT" and "its roles are master, slave, cache" in err.details

    [cache_vm] = [n["vm_id"] for n in roles_of(service)["cache"]["nodes"]]
    done = cirrus(gateway, cli_env, "flow", "remove-role", sid, "cache")
    assert done.returncode == 0, done.stderr
    assert "remove role cache accepted" in done.stdout
    wait_until(lambda: list(roles_of(api.get_flow(service["id"]))) == ["master", "slave"]
               and api.get_flow(service["id"])["state"] == "RUNNING", timeout=30,
               what="cache removed")
    assert api.get_vm(cache_vm)["status"] == "DONE"
    api.delete_flow(service["id"])
    wait_state(api, service["id"], "DONE")


# ----------------------------------------------------------------- who sees what

def test_users_see_their_own_templates_and_services_and_admins_all(api, ann, user, vm_template):
    mine = api.create_flow_template(blog(unique("admins"), vm_template))
    theirs = ann.create_flow_template({"name": unique("anns"), "roles": [
        {"name": "solo", "cardinality": 0, "vm_template_contents": SMALL_VM}]})
    assert theirs["owner"] == user[0]
    assert {t["owner"] for t in ann.list_flow_templates()} == {user[0]}
    assert {mine["id"], theirs["id"]} <= {t["id"] for t in api.list_flow_templates()}
    for call in (ann.get_flow_template, ann.delete_flow_template,
                 lambda i: ann.instantiate_flow_template(i, custom_attrs={"DB_PASSWORD": "x"}),
                 lambda i: ann.update_flow_template(i, {"name": "x", "roles": []}),
                 lambda i: ann.clone_flow_template(i, "mine-now")):
        error = refused(call, mine["id"])
        assert (error.code, error.details) == ("NOT_FOUND",
                                               f"service template {mine['id']} does not exist")
    copy = ann.clone_flow_template(theirs["id"], unique("anns-copy"))
    assert (copy["owner"], copy["body"]["roles"]) == (user[0], theirs["body"]["roles"])

    service = api.instantiate_flow_template(mine["id"], custom_attrs={"DB_PASSWORD": "pw"})
    assert service["id"] not in {s["id"] for s in ann.list_flows()}
    for call in (ann.get_flow, ann.delete_flow, ann.release_flow,
                 lambda i: ann.scale_flow(i, "slave", 1),
                 lambda i: ann.flow_role_action(i, "slave", "reboot"),
                 lambda i: next(ann.watch_flows(i))):
        error = refused(call, service["id"])
        assert (error.code, error.details) == ("NOT_FOUND",
                                               f"service {service['id']} does not exist")
    api.wait_flow(service["id"], timeout=60)
    api.delete_flow(service["id"])
    wait_state(api, service["id"], "DONE")


# ----------------------------------------------------------------- bad input, named

def test_bad_templates_are_refused_naming_what_is_wrong_and_nothing_is_kept(
        gateway, api, cli_env, tmp_path, vm_template):
    before = api.list_flow_templates()
    not_json = refused(api.create_flow_template, '{"name": "x", "roles": [}')
    assert (not_json.code, not_json.details) == (
        "INVALID_ARGUMENT", "body: not JSON: Expecting value at line 1 column 25")
    not_object = refused(api.create_flow_template, '["a", "list"]')
    assert (not_object.code, not_object.details) == (
        "INVALID_ARGUMENT", "body: a service template is a JSON object, not an array")
    no_roles = refused(api.create_flow_template, {"name": unique("no-roles")})
    assert no_roles.code == "INVALID_ARGUMENT" and "roles" in no_roles.details, no_roles
    bad_parent = refused(api.create_flow_template, {**blog(unique("x"), vm_template), "roles": [
        {"name": "web", "cardinality": 1, "vm_template": vm_template, "parents": ["db"]}]})
    assert bad_parent.code == "INVALID_ARGUMENT" and "db" in bad_parent.details, bad_parent

    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n "roles": [\n')
    for argv in (("flow-template", "create", str(broken)),
                 ("flow-template", "update", "1", str(broken))):
        done = cirrus(gateway, cli_env, *argv)
        assert (done.returncode, done.stderr) == (
            1, f"cirrus: INVALID_ARGUMENT: '{broken}' is not JSON: Expecting value at line 3 "
               "column 1\n")
    missing = cirrus(gateway, cli_env, "flow-template", "create", str(tmp_path / "gone.json"))
    assert (missing.returncode, missing.stderr) == (
        1, f"cirrus: INVALID_ARGUMENT: cannot read template file '{tmp_path / 'gone.json'}': "
           "No such file or directory\n")
    assert api.list_flow_templates() == before

    template = api.create_flow_template(blog(unique("attrs"), vm_template))
    services = api.list_flows()
    no_password = cirrus(gateway, cli_env, "flow-template", "instantiate", str(template["id"]))
    assert no_password.returncode == 1 and "DB_PASSWORD" in no_password.stderr, \
        no_password.stderr
    assert no_password.stderr.startswith("cirrus: INVALID_ARGUMENT: ")
    assert api.list_flows() == services
    unknown = cirrus(gateway, cli_env, "flow", "show", "no-such-service")
    assert (unknown.returncode, unknown.stderr) == (
        1, "cirrus: NOT_FOUND: service 'no-such-service' does not exist\n")


def test_templates_are_updated_cloned_and_deleted(gateway, api, cli_env, tmp_path, vm_template):
    name = unique("edit")
    template = api.create_flow_template(blog(name, vm_template))
    changed = blog(name, vm_template, description="second version")
    updated = cirrus(gateway, cli_env, "flow-template", "update", name,
                     json_file(tmp_path, changed))
    assert updated.stdout == f"service template {template['id']} ({name}) updated\n", \
        updated.stderr
    assert api.get_flow_template(template["id"])["body"]["description"] == "second version"
    copy_id = int(cirrus(gateway, cli_env, "flow-template", "clone", name, f"{name}-copy").stdout)
    copy = api.get_flow_template(copy_id)
    assert (copy["name"], copy["body"]["roles"]) == (f"{name}-copy", changed["roles"])
    deleted = cirrus(gateway, cli_env, "flow-template", "delete", f"{name}-copy")
    assert deleted.stdout == f"service template {copy_id} ({name}-copy) deleted\n"
    assert refused(api.get_flow_template, copy_id).code == "NOT_FOUND"
