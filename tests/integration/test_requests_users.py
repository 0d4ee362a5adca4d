"""Users, groups, roles and passwords (issue 8) through the real requests
service: argon2 hashes (old scrypt ones still work and are rehashed at login),
administrators manage users, everyone else only themselves; logout ends a
token on the server at once."""
import hashlib
import secrets

import pytest

from cirrus import db
from cirrus.client import Client, ClientError
from cirrus.db.models import User
from tests.requests_fixtures import (  # noqa: F401  (fixtures)
    PASSWORD, admin_credentials, make_user, refused, request_services, requests_dir,
    requests_env, rpc,
)
from tests.integration.test_gateway import start_gateway


def stored_hash(name):
    with db.session_factory()() as session:
        return session.query(User).filter(User.name == name).one().password_hash


def test_administrators_create_show_and_delete_users(rpc):
    admin = admin_credentials()
    user = rpc.create_user(admin, "alice-" + secrets.token_hex(3), "a-long-password",
                           "finance", [])
    assert user["role"] == "finance" and stored_hash(user["name"]).startswith("$argon2id$")
    shown = rpc.get_user(admin, user["name"])
    assert shown["quota"]["limits"] == {"vms": None, "cpu": None, "memory": None,
                                        "images": None}
    assert user["name"] in [u["name"] for u in rpc.list_users(admin)]
    with refused("AlreadyExists"):
        rpc.create_user(admin, user["name"], "a-long-password", "user", [])
    with refused("InvalidArgument") as info:
        rpc.create_user(admin, "bob-" + secrets.token_hex(3), "short", "user", [])
    assert "at least 8" in info.value.value
    with refused("InvalidArgument") as info:
        rpc.create_user(admin, "carol-" + secrets.token_hex(3), "a-long-password", "boss", [])
    assert "unknown role 'boss'" in info.value.value
    assert rpc.delete_user(admin, user["name"])["name"] == user["name"]
    with refused("NotFound"):
        rpc.get_user(admin, user["name"])


def test_users_see_and_change_only_themselves(rpc):
    user, other = make_user(), make_user()
    assert [u["name"] for u in rpc.list_users(user)] == [user["username"]]
    with refused("NotFound"):
        rpc.get_user(user, other["username"])
    with refused("PermissionDenied"):
        rpc.create_user(user, "x-" + secrets.token_hex(3), "a-long-password", "admin", [])
    with refused("PermissionDenied"):
        rpc.set_password(user, other["username"], "another-password")
    session = rpc.login(user)
    rpc.set_password(user, user["username"], "another-password")
    # the old password and the tokens made with it stop working
    with refused("Unauthenticated"):
        rpc.whoami({"token": session["token"]})
    with refused("Unauthenticated"):
        rpc.whoami(user)
    assert rpc.whoami({**user, "password": "another-password"})["name"] == user["username"]


def test_an_old_scrypt_hash_still_logs_in_and_is_rehashed_with_argon2(rpc):
    user = make_user()
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, dklen=32, n=2 ** 14, r=8, p=1)
    with db.session_factory()() as session, session.begin():
        session.query(User).filter(User.name == user["username"]).update(
            {"password_hash": f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"})
    with refused("Unauthenticated"):
        rpc.login({**user, "password": "wrong-password"})
    assert stored_hash(user["username"]).startswith("scrypt$")
    assert rpc.login(user)["token"]
    assert stored_hash(user["username"]).startswith("$argon2id$")
    assert rpc.whoami(user)["name"] == user["username"]


def test_groups_hold_users(rpc):
    admin = admin_credentials()
    name = "ops-" + secrets.token_hex(3)
    user = make_user()
    rpc.create_group(admin, name)
    group = rpc.group_add_user(admin, name, user["username"])
    assert group["users"] == [user["username"]]
    assert rpc.get_user(admin, user["username"])["groups"] == [name]
    with refused("AlreadyExists"):
        rpc.group_add_user(admin, name, user["username"])
    with refused("PermissionDenied"):
        rpc.group_del_user(user, name, user["username"])
    assert rpc.group_del_user(admin, name, user["username"])["users"] == []
    rpc.delete_group(admin, name)
    with refused("NotFound"):
        rpc.get_group(admin, name)
    entries = rpc.list_audit(admin, object_kind="group")
    assert {"group.created", "group.user_added", "group.user_removed", "group.deleted"} <= \
        {e["action"] for e in entries}


def test_a_user_who_owns_vms_cannot_be_deleted(rpc):
    user = make_user()
    rpc.create_vm(user, {"name": "kept", "cpu": 0.1, "vcpu": 1, "memory": 64})
    with refused("FailedPrecondition") as info:
        rpc.delete_user(admin_credentials(), user["username"])
    assert "still owns" in info.value.value
    assert rpc.whoami(user)["name"] == user["username"]


def test_the_audit_log_is_append_only(session):
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError
    import pytest
    with pytest.raises(DBAPIError) as info:
        session.execute(text("DELETE FROM audit_log"))
    assert "append-only" in str(info.value)
    session.rollback()
    with pytest.raises(DBAPIError):
        session.execute(text("UPDATE audit_log SET reason = 'changed'"))
    session.rollback()


@pytest.fixture(scope="module")
def gateway(request_services, requests_env, requests_dir):
    proc, address = start_gateway(requests_env, requests_dir)
    yield address
    proc.stop()


def test_logout_ends_that_token_at_once_over_grpc(gateway):
    user = make_user()
    with Client(gateway, username=user["username"], password=PASSWORD) as api:
        token, other = api.login()["token"], api.login()["token"]
        with pytest.raises(ClientError) as info:
            api.logout()        # a password has no session to end
        assert info.value.code == "INVALID_ARGUMENT"
    with Client(gateway, token=token) as api:
        assert api.get_user(user["username"])["name"] == user["username"]
        api.logout()
        for call in (lambda: api.get_user(user["username"]), api.logout):
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.code == "UNAUTHENTICATED"
    # the user's other token lives on
    with Client(gateway, token=other) as api:
        assert api.get_user(user["username"])["name"] == user["username"]
