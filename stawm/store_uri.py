"""Where a store's URI puts its files on this machine: MLflow tracking URIs and Optuna storage URLs.

    scheme("postgresql+psycopg://user:pw@host/db")  # "postgresql+psycopg"; "" for a plain path
    sqlite_path("sqlite:///a/b.db?timeout=20")       # Path("a/b.db"); None for a server or an in-memory database
    local_path("file:///tmp/ray")                    # Path("/tmp/ray"); None for any scheme but file:

Paths come back as the URI writes them: a relative one stays relative (SQLite opens it from the
working folder), and each caller resolves it where it knows which folder that is.

Plain Python, so the study layer and the analysis both use it. SQLAlchemy, which parses SQLite URLs
the way MLflow and Optuna open them, is imported only when one is parsed: MLflow and Optuna bring it,
`pip install stawm` alone does not.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

# What SQLAlchemy's SQLite dialect reads as "no file": sqlite:// and sqlite:/// (empty), sqlite:///:memory:.
_IN_MEMORY = (None, "", ":memory:")


def scheme(uri: str) -> str:
    """The URI's scheme in lower case, driver included ("sqlite", "postgresql+psycopg", "s3", "file");
    "" for a plain path, also one with a colon in it (C:\\... or a:b)."""
    if "://" not in uri and not uri.startswith("file:"):
        return ""
    return urllib.parse.urlsplit(uri).scheme.lower()


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite URL (any driver, sqlite+pysqlite:// too); None for an in-memory
    database or a URI that is not SQLite.

    sqlite:///a/b.db?timeout=20 is a/b.db (the query holds driver options), sqlite:////abs/b.db is
    /abs/b.db; %-escapes are decoded, as SQLAlchemy decodes them before SQLite opens the file.
    """
    if scheme(uri).partition("+")[0] != "sqlite":
        return None
    from sqlalchemy.engine import make_url  # see the module's docstring: not in the base install

    database = make_url(uri).database
    return None if database in _IN_MEMORY else Path(database)


def local_path(uri: str) -> Path | None:
    """The path a plain path (~ expanded) or a file: URI names; None for any other scheme.

    Raises ValueError for a file:// URI that names another host, which this machine cannot open; its
    message follows the URI, which it leaves out: "storage {uri} {error}".
    """
    kind = scheme(uri)
    if kind == "":
        return Path(os.path.expanduser(uri))
    if kind != "file":
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.hostname not in (None, "localhost"):  # the host, not the netloc: a user:password@ is no host
        raise ValueError(f"names another host, {parts.hostname}: file:// URIs must be file:///PATH")
    return Path(urllib.request.url2pathname(parts.path))
