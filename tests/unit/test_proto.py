"""The generated stubs in cirrus/v1 match proto/, and every service imports."""
import importlib
import re

import pytest

from cirrus import protogen

SERVICE = re.compile(r"^\s*service\s+(\w+)\s*\{", re.MULTILINE)


def services_in_protos():
    """(module stem, service name) for every `service` in proto/cirrus/v1."""
    found = []
    for rel in protogen.proto_files():
        text = (protogen.PROTO_ROOT / rel).read_text()
        stem = rel.rsplit("/", 1)[-1].removesuffix(".proto")
        found += [(stem, name) for name in SERVICE.findall(text)]
    return found


def test_the_protos_declare_the_api_services():
    names = {name for _, name in services_in_protos()}
    assert {"VirtualMachineService", "HostService", "TemplateService",
            "SessionService", "FlowTemplateService", "FlowService"} <= names


def test_stubs_in_the_tree_match_the_protos(tmp_path):
    protogen.generate(tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "cirrus" / "v1").glob("*.py"))
    assert fresh, "protoc generated nothing"
    tree = protogen.REPO_ROOT / "cirrus" / "v1"
    committed = sorted(p.name for p in tree.glob("*_pb2*.py"))
    assert committed == fresh, "run `python -m cirrus.protogen`: the set of stubs differs"
    for name in fresh:
        assert (tmp_path / "cirrus" / "v1" / name).read_bytes() == (tree / name).read_bytes(), (
            f"cirrus/v1/{name} is stale: run `python -m cirrus.protogen`")


@pytest.mark.parametrize("stem,service", services_in_protos())
def test_every_service_is_importable(stem, service):
    messages = importlib.import_module(f"cirrus.v1.{stem}_pb2")
    grpc_module = importlib.import_module(f"cirrus.v1.{stem}_pb2_grpc")
    assert service in messages.DESCRIPTOR.services_by_name
    for attr in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
        assert hasattr(grpc_module, attr), f"{stem}_pb2_grpc lacks {attr}"


def test_a_broken_proto_fails_generation(tmp_path):
    root = tmp_path / "proto"
    (root / "cirrus" / "v1").mkdir(parents=True)
    (root / "cirrus" / "v1" / "bad.proto").write_text('syntax = "proto3";\nmessage {')
    with pytest.raises(RuntimeError, match="protoc failed"):
        protogen.generate(tmp_path / "out", root=root)


# field numbers of the released API (issue 2); a client built against it must keep working
RELEASED_FIELDS = {
    "cirrus.v1.VirtualMachine": [
        "id", "name", "owner", "state", "lcm_state", "status", "short_status", "host",
        "host_id", "cpu", "vcpu", "memory", "deploy_id", "error", "sched_message", "seq",
        "created_at", "updated_at", "template", "history"],
    "cirrus.v1.VmStateChange": [
        "id", "name", "key", "state", "lcm_state", "status", "short_status", "seq", "host",
        "error", "at", "current"],
    "cirrus.v1.Host": [
        "id", "name", "state", "max_cpu", "max_mem", "cpu_usage", "mem_usage", "running_vms",
        "monitoring", "last_monitored_at"],
    "cirrus.v1.TerminateVmRequest": ["id", "hard"],
    "cirrus.v1.WatchVmsRequest": ["id"],
    "cirrus.v1.CreateHostRequest": ["name"],
}


@pytest.mark.parametrize("message", sorted(RELEASED_FIELDS))
def test_released_fields_keep_their_numbers(message):
    from cirrus.v1 import host_pb2, vm_pb2  # noqa: F401  (fills the default pool)
    from google.protobuf import descriptor_pool
    fields = descriptor_pool.Default().FindMessageTypeByName(message).fields_by_name
    assert [fields[name].number for name in RELEASED_FIELDS[message]] == list(
        range(1, len(RELEASED_FIELDS[message]) + 1))


def test_the_released_terminate_rpc_is_still_there():
    from cirrus.v1 import vm_pb2
    methods = vm_pb2.DESCRIPTOR.services_by_name["VirtualMachineService"].methods_by_name
    assert {"Terminate", "Action", "Watch", "Accounting"} <= set(methods)


def test_the_action_request_documents_every_action_lifecycle_takes():
    from services.lifecycle.logic import ACTION_OPTIONS
    text = (protogen.PROTO_ROOT / "cirrus" / "v1" / "vm.proto").read_text()
    table = text.split("message VmActionRequest", 1)[0].rsplit("// A user action on a VM", 1)[1]
    documented = set(re.findall(r"^//   (\w+) ", table, re.MULTILINE)) - {"action"}
    assert documented == set(ACTION_OPTIONS)
    for action, options in ACTION_OPTIONS.items():
        row = re.search(rf"^//   {action} .*$(\n//  {{10,}}.*$)*", table, re.MULTILINE).group(0)
        assert all(option in row for option in options), (action, options)
