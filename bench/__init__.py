"""vivoflow's benchmark: intake, end to end, worker throughput and memory, beside this machine's ceilings.

``make bench`` (or ``.venv/bin/python -m bench --help``) runs it; loopback only, bounded in time.
Every load generator, server and sink runs in a process of its own.
"""
