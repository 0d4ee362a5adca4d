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
            "SessionService"} <= names


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
