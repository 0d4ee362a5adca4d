"""A database that cannot be reached is Unavailable (gRPC UNAVAILABLE), at
once; a statement the database refuses stays what it is."""
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from cirrus import db, errors
from tests.procs import free_port


def test_a_server_not_listening_is_unavailable_naming_the_database():
    engine = db.engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nothing")
    with pytest.raises(errors.Unavailable, match="the database is unavailable: .*refused"):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert errors.grpc_status_name("Unavailable") == "UNAVAILABLE"


def test_a_connection_the_server_ends_is_unavailable_and_the_next_one_works(db_url):
    engine = db.engine(db_url)
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(errors.Unavailable, match="the database is unavailable"):
            conn.execute(text("SELECT 1"))
    admin.dispose()
    with engine.connect() as conn:       # the pool drops the dead connection
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_a_refused_statement_is_not_an_outage(db_url):
    with db.engine(db_url).connect() as conn:
        with pytest.raises(ProgrammingError):
            conn.execute(text("SELECT * FROM no_such_table"))
