"""What is kept on disk and in the broker stays private, and no SQL is built from text.

The run store and the email outbox hold invitees' personal data: their files are the owner's
only (0600), whatever the umask. Every SQL statement is parameterised, which a scan of the source
checks. The embedded Redis listens on a unix socket only, never on a TCP port.
"""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from connectors.base import ActionCall
from connectors.email import EmailConfig, EmailConnector, SendInput
from workers.broker import EmbeddedRedis
from workers.store import Store

ROOT = Path(__file__).resolve().parents[2]
#: The product's code: where a SQL statement could be written.
SOURCES = (ROOT / "workers", ROOT / "connectors")


@contextmanager
def permissive_umask() -> Iterator[None]:
    """umask 000: a file that still comes out 0600 was made so on purpose, not by the umask's luck."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_sqlite_store_and_its_journal_files_are_created_private(tmp_path: Path) -> None:
    database = tmp_path / "data" / "vivoflow.db"

    with permissive_umask():
        store = Store(f"sqlite:///{database}")
        store.create_schema()
        store.insert_delivery({"dedupe_key": "k" * 64, "event": "invitee.created", "payload_uri": None,
                               "invitee_uri": None, "sender_created_at": None, "body": "{}"})
    try:
        files = [p for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
        assert database in files and len(files) == 3  # WAL mode: the journal files exist while it is open
        assert {str(p.name): oct(mode(p)) for p in files} == {str(p.name): "0o600" for p in files}
    finally:
        store.close()


def test_outbox_messages_are_written_private(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    connector = EmailConnector(EmailConfig.model_validate({"outbox_dir": str(outbox)}))
    inputs = SendInput.model_validate({"to": "jamie@example.com", "subject": "Booked", "text": "See you"})

    with permissive_umask():
        output = connector.run("send", inputs, ActionCall(run_id="r1", step_id="s1", idempotency_key="r1:s1"))

    written = Path(output["path"])
    assert written.parent == outbox and written.suffix == ".eml"
    assert oct(mode(written)) == "0o600"
    assert list(outbox.iterdir()) == [written]  # no temporary file left behind, readable or not


# -- no SQL built from text -------------------------------------------------------------------------

#: Calls that take SQL text as their first argument.
SQL_CALLS = frozenset({"text", "execute", "executemany", "executescript", "exec_driver_sql"})


def sql_built_from_text(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every SQL call whose text is an f-string, a ``%`` or ``+`` of strings, or ``.format()``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in SQL_CALLS and _is_built_text(node.args[0]):
            found.append((node.lineno, f"{filename}:{node.lineno}"))
    return [where for _, where in sorted(found)]


def _is_built_text(arg: ast.expr) -> bool:
    if isinstance(arg, ast.JoinedStr):  # f"..."
        return True
    if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod | ast.Add):  # "..." % x, "..." + x
        return any(isinstance(side, ast.Constant | ast.JoinedStr) and isinstance(getattr(side, "value", ""), str)
                   or _is_built_text(side) for side in (arg.left, arg.right))
    return (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format"
            and isinstance(arg.func.value, ast.Constant | ast.JoinedStr))


def test_no_sql_in_the_product_is_built_with_f_strings_format_or_percent() -> None:
    files = [path for folder in SOURCES for path in sorted(folder.rglob("*.py"))]
    assert len(files) > 20  # the scan really reads the product

    found = [hit for path in files for hit in sql_built_from_text(path.read_text(), str(path.relative_to(ROOT)))]

    assert found == []


def test_the_scan_finds_sql_built_from_text() -> None:
    """The scan above cannot pass by looking for the wrong thing."""
    source = '''
conn.execute(sa.text(f"SELECT * FROM runs WHERE id = '{run_id}'"))
cursor.execute("DELETE FROM steps WHERE run_id = '%s'" % run_id)
conn.exec_driver_sql("SELECT " + column + " FROM runs")
conn.execute(text("SELECT * FROM {}".format(table)))
cursor.executescript(f"DROP TABLE {name}")
conn.execute(sa.text("SELECT * FROM runs WHERE id = :id"), {"id": run_id})
cursor.execute("PRAGMA journal_mode=WAL")
'''
    assert sql_built_from_text(source) == ["<source>:2", "<source>:3", "<source>:4", "<source>:5", "<source>:6"]


# -- the embedded broker ----------------------------------------------------------------------------


def test_the_embedded_redis_listens_on_a_unix_socket_only(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "broker")
    url = server.start()
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        port = client.config_get("port")["port"]
        bind = client.config_get("bind")["bind"].split()
        socket_path = Path(client.config_get("unixsocket")["unixsocket"])
        socket_mode = mode(socket_path)
        client.close()
    finally:
        server.stop()

    assert url.startswith("unix://")
    assert port == "0"  # no TCP listener at all
    assert not {"0.0.0.0", "*", "::", "::*", "-::*"} & set(bind), bind
    assert url == f"unix://{socket_path}"
    assert socket_mode & 0o077 == 0, oct(socket_mode)  # and only its owner may connect to the socket
