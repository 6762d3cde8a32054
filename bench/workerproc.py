"""One worker process as ``vivoflow worker --processes 1`` starts it, at the log level the bench asks for.

The CLI fixes long-running commands at INFO; the throughput stage runs at WARNING so a no-op
step measures the engine, not the log handler (``--log-level INFO`` shows what logging costs).
"""

from __future__ import annotations

import argparse
import logging
import threading


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workerproc")
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args()

    from workers.logs import setup_logging

    setup_logging(getattr(logging, args.log_level))
    from workers.app import App
    from workers.config import load_config
    from workers.runner import stop_on_signals, work

    stop = threading.Event()
    stop_on_signals(stop)
    work(App(load_config(args.config)), args.threads, stop)


if __name__ == "__main__":
    main()
