"""The request path's batched statements, sent to the driver with as little in between as possible.

Admission and settlement (:func:`moestack.tenancy.admission.admit_many`,
:func:`moestack.tenancy.ledger.settle_many`) run a few statements per batch of requests, while the
batch's tenants' counters rows are locked. Two costs dominate once the statements are few:
SQLAlchemy's per-row parameter processing (tens of microseconds of Python per row of an
``executemany``) and, on PostgreSQL, one network round trip per statement, each made while other
gateways wait for the same counters row. :class:`Statements` sends a phase's statements straight
to the driver, still through SQLAlchemy's connection (so driver errors are SQLAlchemy's, and a store
failure is a 503 as anywhere else):

* SQLite: one ``executemany`` per statement on the sqlite3 cursor itself (SQLAlchemy's execution
  context costs more than the statement; driver errors are wrapped as SQLAlchemy wraps them),
  times written as SQLAlchemy writes them (text, so comparisons with stored times hold);
* PostgreSQL with psycopg2: every statement of a phase rendered with its values (``mogrify``,
  the driver's own quoting) into one query string, multi-row ``INSERT`` as one statement, sent in
  one round trip. PostgreSQL runs the statements of one query in order, each with a fresh
  snapshot (read committed), so a read placed after a lock sees what was committed before the
  lock was granted, as with separate round trips;
* any other driver: each statement through SQLAlchemy.

Statements are written with ``:name`` parameters; ``:name`` of a ``lists`` parameter expands to
a parenthesised list. The store writer runs a batch's batch functions :func:`sharing` one
:class:`Statements`, so the writes of one (the settlements) go in the same round trip as the
reads of the next (the admissions' counters).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

_NAME = re.compile(r"(?<![:\w]):(\w+)")
_NO_PARAMS = {"no_parameters": True}
_SHARED = "moestack.batch_sql.shared"


def _pyformat(statement: str) -> str:
    return _NAME.sub(r"%(\1)s", statement)


class Statements:
    """Statements of one phase of a transaction on ``conn``: writes are queued with
    :meth:`write` / :meth:`insert` and sent by :meth:`flush` or with the next :meth:`read`."""

    def __init__(self, conn: Connection):
        self.conn = conn
        dialect = conn.dialect
        self.kind = ("sqlite" if dialect.name == "sqlite" else
                     "psycopg2" if dialect.driver == "psycopg2" else "other")
        self.postgresql = dialect.name == "postgresql"
        self._queued: list[tuple[str, list[dict]]] = []
        self._rendered: list[bytes] = []
        self._times: dict[dt.datetime, str] = {}
        self._cursor = None

    @classmethod
    def of(cls, conn: Connection) -> Statements:
        """The statements :func:`sharing` shares on ``conn``, else new ones."""
        shared = conn.info.get(_SHARED)
        return shared if shared is not None else cls(conn)

    def done(self) -> None:
        """A batch function's writes are queued: send them, unless they are shared (then
        whoever shares them sends them, with the next read or at its end)."""
        if self.conn.info.get(_SHARED) is not self:
            self.flush()

    # -- values ------------------------------------------------------------------------------

    def time(self, t: dt.datetime | None):
        """A naive UTC time as the store's column takes it (SQLite: SQLAlchemy's text form)."""
        if self.kind != "sqlite" or t is None:
            return t
        s = self._times.get(t)
        if s is None:
            s = self._times[t] = t.isoformat(" ", "microseconds")
        return s

    def read_time(self, value) -> dt.datetime | None:
        """A time column as read back (SQLite returns the text form)."""
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value)
        return value

    @staticmethod
    def json(value) -> str:
        """A JSON column's value (as SQLAlchemy's JSON type writes it: ``None`` is ``null``)."""
        return json.dumps(value)

    # -- statements --------------------------------------------------------------------------

    def write(self, statement: str, rows: Sequence[dict]) -> None:
        """Queue ``statement`` once per row of ``rows``."""
        if not rows:
            return
        if self.kind == "psycopg2":
            cur, stmt = self._raw_cursor(), _pyformat(statement).encode()
            self._rendered.extend(cur.mogrify(stmt, row) for row in rows)
        else:
            self._queued.append((statement, list(rows)))

    def write_values(self, head: str, values: str, tail: str, rows: Sequence[dict],
                     statement: str) -> None:
        """Queue ``statement`` once per row of ``rows``; on PostgreSQL, one statement instead:
        ``head`` + the rows as a ``VALUES`` list (each row rendered with ``values``) + ``tail``
        (an ``UPDATE ... FROM (VALUES ...) AS v(...)``, say)."""
        if not rows:
            return
        if self.kind != "psycopg2":
            self.write(statement, rows)
            return
        cur, row_sql = self._raw_cursor(), _pyformat(values).encode()
        self._rendered.append(b"".join((
            head.encode(), b" VALUES ", b",".join(cur.mogrify(row_sql, row) for row in rows),
            b" ", tail.encode())))

    def insert(self, head: str, values: str, rows: Sequence[dict], tail: str = "") -> None:
        """Queue ``head VALUES values tail`` for every row of ``rows``: one multi-row statement on
        PostgreSQL (``rows`` must not repeat a key ``tail``'s ``ON CONFLICT`` updates)."""
        if not rows:
            return
        if self.kind == "psycopg2":
            cur, row_sql = self._raw_cursor(), _pyformat(values).encode()
            self._rendered.append(b"".join((
                head.encode(), b" VALUES ",
                b",".join(cur.mogrify(row_sql, row) for row in rows), b" ", tail.encode())))
        else:
            self._queued.append((f"{head} VALUES {values} {tail}", list(rows)))

    def flush(self) -> None:
        """Send the queued writes."""
        if self._rendered:
            self._send_rendered(None)
        for statement, rows in self._queued:
            if self.kind == "sqlite":
                self._sqlite(statement, rows if len(rows) > 1 else rows[0], many=len(rows) > 1)
            else:
                self.conn.execute(text(statement), rows)
        self._queued.clear()

    def read(self, statement: str, params: dict, lists: Iterable[str] = (),
             before: Sequence[tuple[str, dict, Iterable[str]]] = ()) -> list[tuple]:
        """Send the queued writes, the statements ``before`` (``(statement, params, lists)``,
        results discarded: locks, say) and ``statement``; the rows ``statement`` returns."""
        if self.kind == "psycopg2":
            cur = self._raw_cursor()
            for stmt, p, _ in before:
                self._rendered.append(cur.mogrify(_pyformat(stmt).encode(), _tuples(p, ())))
            self._rendered.append(cur.mogrify(_pyformat(statement).encode(),
                                              _tuples(params, lists)))
            return self._send_rendered(True)
        self.flush()
        for stmt, p, names in before:
            self._execute(stmt, p, names)
        return self._execute(statement, params, lists)

    # -- drivers -----------------------------------------------------------------------------

    def _raw_cursor(self):
        if self._cursor is None:
            self._cursor = self.conn.connection.driver_connection.cursor()
        return self._cursor

    def _sqlite(self, statement: str, params, many: bool = False) -> list[tuple]:
        """``statement`` on the sqlite3 cursor (``executemany`` of ``params`` if ``many``); a
        driver error raised as SQLAlchemy would raise it (a locked store: ``OperationalError``)."""
        error = self.conn.dialect.loaded_dbapi.Error
        try:
            cur = self._raw_cursor()
            if many:
                cur.executemany(statement, params)
                return []
            return cur.execute(statement, params).fetchall()
        except error as exc:
            raise DBAPIError.instance(statement, params, exc, error,
                                      dialect=self.conn.dialect) from exc

    def _send_rendered(self, rows: bool | None) -> list[tuple] | None:
        from psycopg2.extensions import encodings  # the psycopg2 path only

        query = b";\n".join(self._rendered)
        self._rendered.clear()
        raw = self._raw_cursor().connection
        result = self.conn.exec_driver_sql(query.decode(encodings.get(raw.encoding, "utf-8")),
                                           execution_options=_NO_PARAMS)
        return [tuple(r) for r in result] if rows else None

    def _execute(self, statement: str, params: dict, lists: Iterable[str]) -> list[tuple]:
        lists = tuple(lists)
        if self.kind == "sqlite":
            flat = dict(params)
            for name in lists:
                values = flat.pop(name)
                names = [f"{name}_{i}" for i in range(len(values))]
                flat.update(zip(names, values))
                statement = re.sub(rf":{name}\b", "(" + ", ".join(f":{n}" for n in names) + ")",
                                   statement)
            return self._sqlite(statement, flat)
        clause = text(statement)
        if lists:
            clause = clause.bindparams(*[bindparam(n, expanding=True) for n in lists])
        return [tuple(r) for r in self.conn.execute(clause, params)]


@contextmanager
def sharing(conn: Connection) -> Iterator[Statements]:
    """One :class:`Statements` for the batch functions run on ``conn`` inside; what they
    queued is sent when the block ends (without an exception)."""
    db = conn.info[_SHARED] = Statements(conn)
    try:
        yield db
        db.flush()
    finally:
        conn.info.pop(_SHARED, None)


def _tuples(params: dict, lists: Iterable[str]) -> dict:
    """psycopg2 renders a tuple as a parenthesised list."""
    lists = set(lists)
    return {k: tuple(v) if k in lists or isinstance(v, list) else v for k, v in params.items()}
