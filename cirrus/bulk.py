"""Set-based writes: any number of rows in one statement with one parameter,
a JSON array the database unpacks with ``jsonb_to_recordset``. The statement
is compiled once whatever the count, and the rows are encoded by one
``json.dumps`` instead of one bind parameter per value."""
import json

from sqlalchemy import text
from sqlalchemy.dialects import postgresql

_dialect = postgresql.dialect()


def _recordset(table, names):
    columns = ", ".join(f"{name} {table.c[name].type.compile(dialect=_dialect)}"
                        for name in names)
    return f"jsonb_to_recordset(CAST(:rows AS jsonb)) AS new({columns})"


def insert(table, names, returning=None):
    """INSERT INTO table (names) of the rows given to ``params``."""
    listed = ", ".join(names)
    tail = f" RETURNING {returning}" if returning else ""
    return text(f"INSERT INTO {table.name} ({listed}) SELECT {listed} "
                f"FROM {_recordset(table, names)}{tail}")


def update(table, names, key="id"):
    """UPDATE table SET names of each row given to ``params``, matched by ``key``."""
    sets = ", ".join(f"{name} = new.{name}" for name in names)
    return text(f"UPDATE {table.name} SET {sets} FROM {_recordset(table, (key, *names))} "
                f"WHERE {table.name}.{key} = new.{key}")


def params(rows):
    """The one parameter of a bulk statement: rows (dicts) as a JSON array;
    dates and times as ISO text."""
    return {"rows": json.dumps(rows, default=lambda value: value.isoformat())}
