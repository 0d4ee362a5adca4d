"""Fixtures shared by every test level.

Integration and end-to-end tests run against the real PostgreSQL and RabbitMQ:
each test session gets its own database and its own RabbitMQ vhost, so runs
never see each other's rows or queues.
"""
import os
import subprocess
import uuid

import pytest

from cirrus import config

TEST_ID = uuid.uuid4().hex[:8]
BASE_DB = os.environ.get("CIRRUS_TEST_DATABASE", "postgresql+psycopg2://postgres@127.0.0.1:5432/")
BASE_AMQP = os.environ.get("CIRRUS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def db_url():
    from sqlalchemy import create_engine
    from cirrus import db
    url = BASE_DB.rstrip("/") + f"/cirrus_test_{TEST_ID}"
    db.upgrade(url)
    yield url
    db.engine.cache_clear()
    admin = create_engine(BASE_DB.rstrip("/") + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "cirrus_test_{TEST_ID}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def amqp_uri():
    vhost = f"cirrus-test-{TEST_ID}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield BASE_AMQP.rstrip("/") + "/" + vhost
    rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def cirrus_env(db_url, amqp_uri, tmp_path_factory):
    """Environment for processes under test, also applied to this process."""
    env = {
        "CIRRUS_DATABASE_URL": db_url,
        "CIRRUS_AMQP_URI": amqp_uri,
        "CIRRUS_DRIVERS_DATASTORE": str(tmp_path_factory.mktemp("datastore")),
        "CIRRUS_DRIVERS_MONITOR_INTERVAL": "1",
        "CIRRUS_SCHEDULER_SWEEP_INTERVAL": "2",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    config._cached = None
    yield {**os.environ, **env}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    config._cached = None


@pytest.fixture
def session(cirrus_env):
    from cirrus import db
    with db.session_factory()() as s:
        yield s
