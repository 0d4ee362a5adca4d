"""The OneGate secret on the real database: lifecycle reads it once per
deploy transaction (never for the life of the process), a rotation replaces
the kept row, and a secret fixed in the configuration is refused by name
and left alone."""
import pytest
from sqlalchemy import select

from cirrus import config, db
from cirrus.db.models import Setting
from cirrus.errors import FailedPrecondition
from services.lifecycle import devices


def kept(factory):
    with factory() as s:
        return s.scalar(select(Setting.value).where(Setting.key == "gate.secret"))


def test_a_rotation_reaches_the_next_transaction_not_the_one_running(cirrus_env):
    factory = db.session_factory()
    with factory() as s, s.begin():
        before = devices.platform_secret(s)
    assert before == kept(factory)
    with factory() as deploying:
        deploying.begin()
        assert devices.platform_secret(deploying) == before
        with factory() as s, s.begin():
            devices.rotate_platform_secret(s)
        # a deploy already under way keeps the one it read: its VMs' tokens match one secret
        assert devices.platform_secret(deploying) == before
        deploying.rollback()
        with deploying.begin():             # the same session, a new transaction: the new one
            after = devices.platform_secret(deploying)
    assert after != before and after == kept(factory) and len(after) == 64


def test_a_rotation_that_rolls_back_keeps_the_old_secret(cirrus_env):
    factory = db.session_factory()
    with factory() as s, s.begin():
        before = devices.platform_secret(s)
    with factory() as s:
        s.begin()
        devices.rotate_platform_secret(s)
        s.rollback()
    assert kept(factory) == before


def test_a_secret_fixed_in_the_configuration_is_not_rotated(cirrus_env, monkeypatch):
    factory = db.session_factory()
    with factory() as s, s.begin():
        before = devices.platform_secret(s)
    monkeypatch.setitem(config.get(), "gate", {**(config.get().get("gate") or {}),
                                               "secret": "fixed-here"})
    with factory() as s, s.begin():
        with pytest.raises(FailedPrecondition, match="gate.secret is set in the configuration"):
            devices.rotate_platform_secret(s)
        assert devices.platform_secret(s) == "fixed-here"
    assert kept(factory) == before
