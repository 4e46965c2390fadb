"""Mark answers left ``streaming`` by a worker that died as ``interrupted``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from chatproxy.conf import conf
from chatproxy.models import Message


class Command(BaseCommand):
    help = (
        "Mark answers still `streaming` after --older-than seconds (default "
        "CHATPROXY_STALE_AFTER) as `interrupted`, keeping their checkpointed text."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, default=None, help="Seconds.")

    def handle(self, *args: Any, **options: Any) -> None:
        older_than = options["older_than"]
        if older_than is None:
            older_than = conf.CHATPROXY_STALE_AFTER
        count = Message.objects.interrupt_stale(older_than)
        self.stdout.write(f"Marked {count} stale answers as interrupted.")
