"""Which index and object store the server of a data dir uses.

`pacs serve` records them in ``DATA_DIR/archive.json`` (no password: URLs
are written with it hidden, S3 keys are never in them). A command run on
the same data dir with other settings (the service's settings file not
read, a mistyped --index-url) would open another archive: a `pacs import`
then filled a new SQLite index beside the server's PostgreSQL one and
reported success. Such a command is refused, naming what to pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url

from storage import file_store_path

from .settings import Settings

RECORD_NAME = "archive.json"


def index_identity(url: str) -> str:
    """*url* as compared and recorded: no password, no driver, SQLite files by real path."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        return f"sqlite:///{os.path.realpath(database) if database and database != ':memory:' else database}"
    return parsed.set(drivername=backend).render_as_string(hide_password=True)


def store_identity(url: str) -> str:
    """*url* as compared and recorded: folders by real path, no user or password."""
    folder = file_store_path(url)
    if folder is not None:
        return f"file://{os.path.realpath(folder)}"
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname or parts.netloc.rpartition("@")[2]))


def record_archive(settings: Settings) -> None:
    """Write the data dir's record of the archive its server uses."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / RECORD_NAME
    text = json.dumps({"index": index_identity(settings.resolved_index_url),
                       "storage": store_identity(settings.resolved_storage_url),
                       "written_by": "pacs serve"}, indent=1) + "\n"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def recorded_archive(data_dir: Path) -> dict[str, str] | None:
    """The record `pacs serve` wrote in *data_dir*, or None (no server ran there yet)."""
    try:
        data = json.loads((data_dir / RECORD_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {data_dir / RECORD_NAME}: {exc}") from None
    return {"index": str(data.get("index", "")), "storage": str(data.get("storage", ""))}


def other_archive(settings: Settings) -> str | None:
    """Why these settings would open another archive than the one the data
    dir's server uses (one line naming what to pass), or None."""
    record = recorded_archive(settings.data_dir)
    if record is None:
        return None
    wrong = []
    if index_identity(settings.resolved_index_url) != record["index"]:
        wrong.append(f"--index-url {record['index']} (PACS_INDEX_URL)")
    if store_identity(settings.resolved_storage_url) != record["storage"]:
        wrong.append(f"--storage-url {record['storage']} (PACS_STORAGE_URL)")
    if not wrong:
        return None
    return (f"{settings.data_dir} is served with another archive than these settings open: pass "
            + " and ".join(wrong) + " or run as the service user so that its settings file is read "
            "(PACS_ENV_FILE, default /etc/filmless-pacs.env); `pacs serve --new-archive` records new settings")


def served_elsewhere(settings: Settings) -> str | None:
    """Why `pacs serve` with these settings would serve another archive than
    the one the data dir's record names (recorded and configured index and
    store, no password), or None.

    A typo in the service's settings file (PACS_INDEX_ULR) started a new,
    empty SQLite archive in the data dir: every study vanished from the
    viewer while modalities stored into the hidden index.
    """
    record = recorded_archive(settings.data_dir)
    if record is None:
        return None
    index, store = index_identity(settings.resolved_index_url), store_identity(settings.resolved_storage_url)
    if (index, store) == (record["index"], record["storage"]):
        return None
    return (f"{settings.data_dir} is served with index {record['index']} and store {record['storage']} "
            f"({settings.data_dir / RECORD_NAME}), but these settings open index {index} and store {store}: "
            f"check PACS_INDEX_URL / PACS_STORAGE_URL (unknown variables are warned about above) or pass "
            f"--index-url {record['index']} --storage-url {record['storage']}; to serve another archive "
            "from this data dir on purpose, pass --new-archive (`pacs db copy --switch` and "
            "`pacs migrate --switch` record their new index or store themselves)")


def follow_switch(settings: Settings, **changes: str) -> None:
    """After `--switch` pointed the config file at a new index or store,
    record it (when a server recorded the old one): the commands run before
    the server's restart open the new one."""
    if recorded_archive(settings.data_dir) is not None:
        record_archive(settings.model_copy(update=changes))
