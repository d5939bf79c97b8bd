"""Hand-written SQL for the hot paths, where compiling an ORM query costs more CPU than Postgres
spends running it: rows as model instances, existence checks, statements prepared once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, models


class Columns:
    """A model's concrete columns for hand-written SQL, and the instance built from them as the
    ORM would (``Model.from_db``, with the fields' database converters)."""

    def __init__(self, model: type[models.Model], alias: str) -> None:
        self.model = model
        self.fields = model._meta.concrete_fields
        self.names = [f.attname for f in self.fields]
        self.sql = ", ".join(f'{alias}."{f.column}"' for f in self.fields)
        self._converters: list | None = None

    def build(self, values: Sequence[Any]) -> models.Model:
        if self._converters is None:
            self._converters = [
                (i, convs)
                for i, f in enumerate(self.fields)
                if (convs := connection.ops.get_db_converters(f.cached_col) + f.get_db_converters(connection))
            ]
        if self._converters:
            values = list(values)
            for i, convs in self._converters:
                for convert in convs:
                    values[i] = convert(values[i], self.fields[i].cached_col, connection)
        return self.model.from_db(DEFAULT_DB_ALIAS, self.names, values)


def prepared_cursor():
    """A Django cursor (query logging and execute wrappers included) whose statements Postgres
    prepares once per connection: planning a statement of the hot paths (the events insert, the
    claim) costs it about what running it does. Elsewhere, or with DEPUTIES_DB_PREPARED_STATEMENTS
    off, Django's own cursor.

    Django's own cursors bind client-side and never prepare; Django turns psycopg's automatic
    preparing off (``prepare_threshold=None``), which also refuses explicit ``prepare=True``, so
    the threshold is set out of reach instead: only this cursor's statements get prepared."""
    global _PreparedCursor
    db = connections[DEFAULT_DB_ALIAS]  # once: each use of the proxy looks this thread's up again
    if db.vendor != "postgresql" or not settings.DB_PREPARED_STATEMENTS:
        return db.cursor()
    if _PreparedCursor is None:
        import psycopg
        from psycopg import _queries

        # psycopg keeps a statement's parsed placeholders (an LRU of 128) only for statements of
        # up to 50 parameters; start_session's insert (models._insert_first_rows) has 54, and was
        # parsed again on every POST.
        if getattr(_queries, "MAX_CACHED_STATEMENT_PARAMS", 0) < MAX_CACHED_PARAMS:
            _queries.MAX_CACHED_STATEMENT_PARAMS = MAX_CACHED_PARAMS

        class PreparedCursor(psycopg.Cursor):
            def execute(self, query, params=None, **kwargs):
                return super().execute(query, params, prepare=True)

            def _send_query_prepared(self, name, pgq, **kwargs):
                self._query = pgq  # what Django's query log reads (psycopg sets it only unprepared)
                return super()._send_query_prepared(name, pgq, **kwargs)

        _PreparedCursor = PreparedCursor
    db.ensure_connection()
    raw = db.connection
    if raw.prepare_threshold is None:
        raw.prepare_threshold = 1 << 30
    if not getattr(raw, "_deputies_generic_plans", False) and not db.in_atomic_block:
        # Postgres would plan a custom plan per execution (no cheaper than not preparing); the
        # generic plan is right for any batch. Only prepared statements are affected, and only
        # ours are prepared. Outside a transaction, so no rollback can undo it.
        with db.cursor() as cursor:
            cursor.execute("SET plan_cache_mode = force_generic_plan")
        raw._deputies_generic_plans = True
    with db.wrap_database_errors:
        return db._prepare_cursor(_PreparedCursor(raw))


_PreparedCursor = None
MAX_CACHED_PARAMS = 100


def exists(model: type[models.Model], where: str, params: Sequence[Any]) -> bool:
    """``SELECT 1 ... WHERE where LIMIT 1`` written out (``where`` names columns, with placeholders)."""
    with prepared_cursor() as cursor:
        cursor.execute(f'SELECT 1 FROM "{model._meta.db_table}" WHERE {where} LIMIT 1', params)
        return cursor.fetchone() is not None
