"""Set-based writes: any number of rows in one statement with one parameter,
a JSON array the database unpacks with ``json(b)_to_recordset``. The statement
is compiled once whatever the count, and the rows are encoded by one
``db.to_json`` instead of one bind parameter per value."""
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from cirrus.db import to_json

_dialect = postgresql.dialect()


def _recordset(table, names):
    """The rows as records: parsed as jsonb when a column is jsonb (its values
    arrive parsed), else as json (nothing parsed into jsonb for nothing)."""
    types = [table.c[name].type.compile(dialect=_dialect) for name in names]
    kind = "jsonb" if "JSONB" in types else "json"
    columns = ", ".join(f"{name} {type_}" for name, type_ in zip(names, types))
    return f"{kind}_to_recordset(CAST(:rows AS {kind})) AS new({columns})"


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
    return {"rows": to_json(rows)}
