"""Measure an export's memory: JSONL and CSV of every conversation, N messages, on SQLite.

    python -m bench.export [--messages 100000]

The rows come from ``manage.py generatetranscripts`` (10 messages per conversation) in a SQLite
file under /tmp (kept for the next run). Each format is exported once through
``chatproxy.export.export`` into a sink that only counts bytes, under ``tracemalloc``: the peak
is what Python allocated at most at one time, the database driver's own buffers aside. The
process's peak RSS is printed too. Run it at two sizes to see that the peak does not grow with
the export.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    name = Path(tempfile.gettempdir()) / f"chatproxy-bench-export-{args.messages}.sqlite3"
    os.environ.pop("DATABASE_URL", None)
    os.environ["CHATPROXY_TEST_DATABASE_NAME"] = str(name)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from django.core.management import call_command

    from chatproxy.export import export
    from chatproxy.models import Conversation, Message

    call_command("migrate", verbosity=0)
    if (have := Message.objects.count()) < args.messages:
        call_command("generatetranscripts", conversations=(args.messages - have) // 10)
    print(f"{Message.objects.count():,} messages in {Conversation.objects.count():,} conversations")
    print("| format | bytes | seconds | Python peak (tracemalloc) |\n|---|---:|---:|---:|")
    for fmt in ("jsonl", "csv"):
        tracemalloc.start()
        started, size = time.perf_counter(), 0
        for chunk in export(Conversation.objects.all(), fmt):
            size += len(chunk)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"| {fmt} | {size:,} | {seconds:.1f} | {peak / 2**20:.1f} MiB |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
