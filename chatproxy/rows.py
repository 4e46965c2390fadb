"""Rows written on the path every turn takes, as one SQL statement each, without the ORM's query
compiler: what ``update()`` and ``bulk_create()`` run, each value through its field's
``get_db_prep_save``, so every database backend gets what it expects. Measured: most of a
turn's write CPU was the compiler (docs/performance.md).
"""

from __future__ import annotations

from typing import Any, cast

from django.db import connection, models


def update_row(
    model: type[models.Model], pk: Any, values: dict[str, Any], /, **only_if: Any
) -> None:
    """Run what ``model.objects.filter(pk=pk, **only_if).update(**values)`` runs, one
    ``UPDATE``, without the ORM building a query for it: on the path every turn takes, that
    was most of the write's CPU. Each value goes through its field's ``get_db_prep_save``, as
    ``update()`` does, so every database backend gets what it expects; like ``update()``, it
    sends no signals. ``only_if`` takes equality conditions on plain fields.
    """
    quote = connection.ops.quote_name
    fields = [_field(model, name) for name in values]
    conditions = [model._meta.pk, *(_field(model, name) for name in only_if)]
    assignments = ", ".join(f"{quote(str(f.column))} = %s" for f in fields)
    where = " AND ".join(f"{quote(str(f.column))} = %s" for f in conditions)
    params = [f.get_db_prep_save(values[f.name], connection) for f in fields]
    params.append(model._meta.pk.get_db_prep_value(pk, connection))
    params += [f.get_db_prep_value(only_if[f.name], connection) for f in conditions[1:]]
    sql = f"UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {where}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def row_exists(model: type[models.Model], pk: Any, /, **only_if: Any) -> bool:
    """Run what ``model.objects.filter(pk=pk, **only_if).exists()`` runs, one ``SELECT``,
    without the ORM building a query for it (see ``update_row``)."""
    quote = connection.ops.quote_name
    conditions = [model._meta.pk, *(_field(model, name) for name in only_if)]
    where = " AND ".join(f"{quote(str(f.column))} = %s" for f in conditions)
    params = [model._meta.pk.get_db_prep_value(pk, connection)]
    params += [f.get_db_prep_value(only_if[f.name], connection) for f in conditions[1:]]
    sql = f"SELECT 1 FROM {quote(model._meta.db_table)} WHERE {where} LIMIT 1"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() is not None


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    return cast("models.Field[Any, Any]", model._meta.get_field(name))


def insert_rows(model: type[models.Model], rows: list[Any]) -> None:
    """Run what ``model.objects.bulk_create(rows)`` runs for rows whose primary key is set:
    multi-row ``INSERT``s, without the ORM's query compiler (see ``update_row``). Each value
    is the field's ``pre_save`` (``auto_now_add`` included) through ``get_db_prep_save``;
    like ``bulk_create()``, it sends no signals."""
    if not rows:
        return
    fields = list(model._meta.concrete_fields)
    quote = connection.ops.quote_name
    table, columns = quote(model._meta.db_table), ", ".join(quote(str(f.column)) for f in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    size = connection.ops.bulk_batch_size(fields, rows) or len(rows)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            params = [
                f.get_db_prep_save(f.pre_save(row, True), connection)
                for row in batch
                for f in fields
            ]
            values = ", ".join([placeholders] * len(batch))
            cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {values}", params)
    for row in rows:  # saved now, as bulk_create() marks them
        row._state.adding, row._state.db = False, connection.alias
