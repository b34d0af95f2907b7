"""Operations the migrations share (keep them stable: released revisions call them)."""

from __future__ import annotations

import sqlite3

from alembic import op

__all__ = ["drop_columns_in_place"]


def drop_columns_in_place(table: str, *columns: str) -> None:
    """Drop plain columns (no index, key or constraint on them) with ALTER TABLE ... DROP COLUMN.

    Not Alembic's batch mode: on SQLite it copies the table and drops the original, and with
    foreign keys on (as fluxport opens SQLite) that drop first deletes every row, cascading to the
    rows that refer to them: the requests' attempts and images. SQLite drops such a column in place
    since 3.35; older versions are refused, saying why, before anything is changed.
    """
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(
            "this downgrade needs SQLite 3.35 or later (ALTER TABLE ... DROP COLUMN); "
            f"Python's sqlite3 module has {sqlite3.sqlite_version}"
        )
    for column in columns:
        op.drop_column(table, column)
