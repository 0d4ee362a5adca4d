"""The Alembic migrations build exactly the schema the models describe."""
import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from cirrus.db.models import Base


def test_migrated_database_matches_the_models(db_url):
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrades_started_at_once_take_turns(db_url):
    """Four `cirrus db upgrade` processes started together on a database that
    does not exist yet (as several machines' units might): each succeeds, and
    the database has the latest schema and one admin. Without the lock the
    losers fail on the database and the tables the winner is creating."""
    from cirrus import config, db
    url = make_url(db_url).set(database=make_url(db_url).database + "_race")
    url = url.render_as_string(hide_password=False)
    env = {**os.environ, "CIRRUS_DATABASE_URL": url}
    try:
        upgrades = [subprocess.Popen([sys.executable, "-m", "cirrus.cli", "db", "upgrade"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for _ in range(4)]
        outputs = [upgrade.communicate(timeout=120)[0] for upgrade in upgrades]
        assert [upgrade.returncode for upgrade in upgrades] == [0] * 4, outputs
        engine = create_engine(url)
        with engine.connect() as conn:
            heads = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
            admins = conn.exec_driver_sql("SELECT count(*) FROM users WHERE name = %s",
                                          (config.get()["auth"]["admin_user"],)).scalar()
        engine.dispose()
        assert heads == [ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()]
        assert admins == 1
    finally:
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
        admin.dispose()
