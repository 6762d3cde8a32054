"""The end-to-end sink, in a process of its own: records when each posted id arrives.

``POST /sink`` with a JSON body holding ``id`` (an invitee uri) records ``(id, time.monotonic())``
(the clock every process on the machine shares) and answers 200. ``GET /_count?prefix=P`` and
``GET /_dump?prefix=P`` let the bench poll and collect. Raw asyncio, so the sink stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

from bench.payloads import uid_of

arrivals: list[tuple[str, float]] = []


def answer(status: int, body: bytes, reason: str = "OK") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def route(method: str, target: str, body: bytes) -> bytes:
    url = urlsplit(target)
    prefix = parse_qs(url.query).get("prefix", [""])[0]
    if method == "POST" and url.path == "/sink":
        now = time.monotonic()
        try:
            uid = uid_of(str(json.loads(body)["id"]))
        except (ValueError, KeyError, TypeError):
            return answer(400, b'{"error":"no id"}', "Bad Request")
        arrivals.append((uid, now))
        return answer(200, b'{"ok":true}')
    if url.path == "/_count":
        mine = [uid for uid, _ in arrivals if uid.startswith(prefix)]
        return answer(200, json.dumps({"arrivals": len(mine), "unique": len(set(mine))}).encode())
    if url.path == "/_dump":
        return answer(200, json.dumps([a for a in arrivals if a[0].startswith(prefix)]).encode())
    if url.path == "/healthz":
        return answer(200, b'{"status":"ok"}')
    return answer(404, b"{}", "Not Found")


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            writer.write(route(method, target, body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main_async(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main_async(parser.parse_args().port))


if __name__ == "__main__":
    main()
