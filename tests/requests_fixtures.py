"""Fixtures for the request management tests (issue 8): the requests and
lifecycle services as processes, with a configuration whose CMDB sink is a
JSON-lines file in the test's directory, and users of every role."""
import json
import uuid
from contextlib import contextmanager

import pytest
import yaml
from nameko.exceptions import RemoteError

from cirrus import config, db
from cirrus.db.models import User
from services.requests import users
from tests.broker import rpc_proxy
from tests.procs import start_services

PASSWORD = "password-1"


def write_config(path, cmdb_path, **requests_settings):
    """deploy/cirrus.yaml with a requests section (CIRRUS_REQUESTS_* then work)."""
    tree = yaml.safe_load(config.DEFAULT_PATH.read_text())
    tree["requests"] = {"housekeeping_interval": 1, "stuck_after": 2, "cmdb_sink": "jsonl",
                        "cmdb_path": str(cmdb_path), "cmdb_url": "", "cmdb_retries": 2,
                        "cmdb_timeout": 2, **requests_settings}
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def requests_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("requests")


@pytest.fixture(scope="module")
def requests_env(cirrus_env, requests_dir):
    cfg = write_config(requests_dir / "cirrus.yaml", requests_dir / "cmdb.jsonl")
    return {**cirrus_env, "CIRRUS_CONFIG": str(cfg), "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "3600"}


@pytest.fixture(scope="module")
def request_services(requests_env, requests_dir):
    procs = start_services(["requests", "lifecycle"], requests_env, requests_dir)
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def rpc(request_services, amqp_uri):
    with rpc_proxy(amqp_uri, "requests") as proxy:
        yield proxy


def make_user(role="user", prefix=None):
    """A user of ``role`` with a unique name; returns its credentials."""
    name = f"{prefix or role}-{uuid.uuid4().hex[:6]}"
    with db.session_factory()() as session, session.begin():
        users.create_user(session, name, PASSWORD, role)
    return {"username": name, "password": PASSWORD}


def user_id(credentials):
    with db.session_factory()() as session:
        return users.find_user(session, credentials["username"]).id


def admin_credentials():
    cfg = config.get()["auth"]
    return {"username": str(cfg["admin_user"]), "password": str(cfg["admin_password"])}


@contextmanager
def refused(code):
    """Expect a call to fail with the Cirrus error class ``code``."""
    with pytest.raises(RemoteError) as info:
        yield info
    assert info.value.exc_type == code, info.value


def cmdb_lines(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def vm_spec(vcpu, memory_gb, name="vm", **more):
    return {"name": name, "cpu": 0.1, "vcpu": vcpu, "memory": memory_gb * 1024,
            "request_id": uuid.uuid4().hex, **more}


__all__ = ["requests_dir", "requests_env", "request_services", "rpc", "make_user", "user_id",
           "admin_credentials", "refused", "cmdb_lines", "vm_spec", "User", "PASSWORD",
           "write_config"]
