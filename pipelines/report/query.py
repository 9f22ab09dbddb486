"""`ibllm catalog`: one SQL query over the workspace's catalog views, printed as a table (or JSON)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.errors import InputError
from stores.catalog import VIEWS, Catalog
from stores.workspace import Workspace

DEFAULT_SQL = "SELECT source, reason, count(*) AS samples FROM download_latest GROUP BY ALL ORDER BY ALL"


class QueryResult(BaseModel):
    """The rows of a catalog query."""

    sql: str
    columns: list[str]
    rows: list[list[Any]]

    def summary(self) -> str:
        """An aligned text table."""
        cells = [self.columns, *([_cell(v) for v in row] for row in self.rows)]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def run(cfg: Config, sql: str | None = None) -> QueryResult:
    """Run `sql` (default: download outcomes by source and reason) over the catalog's views of the workspace."""
    sql = sql or DEFAULT_SQL
    catalog = Catalog(Workspace(cfg.workspace, cfg.storage_options))
    try:
        rows = catalog.rows(sql)
    except Exception as e:  # DuckDB's parser, binder and catalog errors: the message says what is wrong
        raise InputError(f"catalog query failed: {str(e).splitlines()[0]} (views: {', '.join(VIEWS)})") from None
    columns = list(rows[0]) if rows else []
    return QueryResult(sql=sql, columns=columns, rows=[list(r.values()) for r in rows])
