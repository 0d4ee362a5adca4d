"""Database access: the engine, sessions, and migrations."""
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from cirrus import config

MIGRATIONS = Path(__file__).parent / "migrations"


@lru_cache(maxsize=None)
def engine(url=None):
    cfg = config.get()["database"]
    return create_engine(url or cfg["url"], pool_size=cfg.get("pool_size", 10),
                         max_overflow=10, pool_pre_ping=True)


def session_factory(url=None):
    return sessionmaker(bind=engine(url), expire_on_commit=False)


def alembic_config(url=None):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url or config.get()["database"]["url"])
    return cfg


def upgrade(url=None, revision="head"):
    """Migrate the database, creating it first if the server lacks it, and
    ensure the bootstrap admin exists."""
    from alembic import command
    url = url or config.get()["database"]["url"]
    create_database(url)
    command.upgrade(alembic_config(url), revision)
    from cirrus.auth import ensure_admin
    with session_factory(url)() as session, session.begin():
        ensure_admin(session)


def create_database(url):
    from sqlalchemy.engine import make_url
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)).scalar()
        if not exists:
            conn.exec_driver_sql(f'CREATE DATABASE "{target.database}"')
    admin.dispose()
