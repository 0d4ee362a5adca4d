"""Database access: the engine, sessions, and migrations."""
from functools import lru_cache
from pathlib import Path

import orjson
from sqlalchemy import create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from cirrus import config
from cirrus.errors import NotFound, Unavailable

MIGRATIONS = Path(__file__).parent / "migrations"


# SQLSTATEs of a server going away or not taking connections yet: connection
# exceptions (class 08), admin/crash shutdown, "the database system is starting up"
UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03")
# The advisory lock upgrades of one database take turns on ("cirr").
UPGRADE_LOCK = 0x63697272
# CREATE DATABASE losing a race: "already exists", or the catalog's unique index
DATABASE_EXISTS_STATES = ("42P04", "23505")


def to_json(value):
    """The JSON text the database gets for ``value``. orjson is several times
    quicker than json.dumps, and a batch of 500 placements writes half a
    megabyte of it; keys that are not text become text, as with json.dumps."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


@lru_cache(maxsize=None)
def engine(url=None):
    cfg = config.get()["database"]
    made = create_engine(url or cfg["url"], pool_size=cfg.get("pool_size", 10),
                         max_overflow=10, pool_pre_ping=True,
                         json_serializer=to_json, json_deserializer=orjson.loads,
                         connect_args={"connect_timeout": cfg.get("connect_timeout", 5)})
    event.listen(made, "handle_error", raise_unavailable)
    return made


def is_unreachable(context):
    """Whether a database error means the server cannot be reached (as opposed
    to a statement it refused): a lost connection, or none to be had."""
    if context.is_disconnect:
        return True
    code = getattr(context.original_exception, "pgcode", None)
    if code is None:
        # the driver's own connection failures (refused, closed) carry no SQLSTATE
        return type(context.original_exception).__name__ == "OperationalError"
    return code.startswith(UNREACHABLE_STATES)


def raise_unavailable(context):
    """Turn "cannot reach PostgreSQL" into Unavailable, which callers see as
    gRPC UNAVAILABLE: retry later, nothing was done. The pool's pre-ping keeps
    its own handling, so a dead pooled connection is replaced silently."""
    if context.is_pre_ping or not is_unreachable(context):
        return
    detail = str(context.original_exception).strip().splitlines()[0]
    raise Unavailable(f"the database is unavailable: {detail}") from context.original_exception


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
    ensure the bootstrap admin exists. Upgrades started at once (the units
    of several machines, say) take turns on an advisory lock, so the later
    ones find the schema migrated instead of failing halfway through it."""
    from alembic import command
    url = url or config.get()["database"]["url"]
    create_database(url)
    lock_holder = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with lock_holder.connect() as lock:
            lock.exec_driver_sql("SELECT pg_advisory_lock(%s)", (UPGRADE_LOCK,))
            command.upgrade(alembic_config(url), revision)
            from cirrus.auth import ensure_admin
            with session_factory(url)() as session, session.begin():
                ensure_admin(session)
            # closing the connection would release it too; this says so
            lock.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (UPGRADE_LOCK,))
    finally:
        lock_holder.dispose()


def create_database(url):
    from sqlalchemy.engine import make_url
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.exec_driver_sql(
                "SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)).scalar()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{target.database}"')
    except DBAPIError as exc:
        # another upgrade made it between our look and our CREATE
        if getattr(exc.orig, "pgcode", None) not in DATABASE_EXISTS_STATES:
            raise
    finally:
        admin.dispose()


def get_row(session, model, row_id, what, lock=False):
    """The row of ``model`` with id ``row_id`` (locked FOR UPDATE with
    ``lock``), or NotFound naming ``what``: "VM 7 does not exist"."""
    row = session.get(model, row_id, with_for_update=lock)
    if row is None:
        raise NotFound(f"{what} {row_id} does not exist")
    return row


def per_transaction(session, key, make=dict):
    """``session``'s value for ``key``, made by ``make`` at first use and
    forgotten when the session's outermost transaction ends: what a
    transaction keeps of what it read or has yet to write."""
    kept = session.info.setdefault("per_transaction", {})
    if key not in kept:
        kept[key] = make()
    return kept[key]


def read_missing(rows, keys, read):
    """Fill ``rows`` (a per_transaction dict) with the ``keys`` it lacks, read
    in one go: ``read(sorted keys)`` gives (key, row) pairs, and a key it
    does not give maps to None, so it is not asked for again."""
    wanted = sorted(set(keys) - rows.keys() - {None})
    if wanted:
        rows.update(dict.fromkeys(wanted))
        rows.update(read(wanted))


def forget_per_transaction(session, key):
    """Drop ``key`` before the end (a savepoint that wrote it rolled back)."""
    session.info.get("per_transaction", {}).pop(key, None)


@event.listens_for(Session, "after_transaction_end")
def _end_of_transaction(session, transaction):
    if transaction.parent is None:
        session.info.pop("per_transaction", None)


def iso(value):
    """A timestamp column as ISO 8601 text, None as None."""
    return value.isoformat() if value else None
