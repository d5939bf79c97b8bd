"""Hand-written SQL for the hot paths, where compiling an ORM query costs more CPU than Postgres
spends running it: rows as model instances, existence checks, statements prepared once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, models


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
    """On Postgres, a cursor whose statements Postgres prepares once per connection (see
    sessions/events.py): planning a statement of the hot paths costs it about what running it
    does. Elsewhere Django's own cursor."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    from sessions.events import _prepared_cursor

    return _prepared_cursor()


def exists(model: type[models.Model], where: str, params: Sequence[Any]) -> bool:
    """``SELECT 1 ... WHERE where LIMIT 1`` written out (``where`` names columns, with placeholders)."""
    with prepared_cursor() as cursor:
        cursor.execute(f'SELECT 1 FROM "{model._meta.db_table}" WHERE {where} LIMIT 1', params)
        return cursor.fetchone() is not None
