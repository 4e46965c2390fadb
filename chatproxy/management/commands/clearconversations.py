"""Delete conversations, with their messages, that nobody touched for N days."""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from chatproxy.models import Conversation


class Command(BaseCommand):
    help = "Delete conversations (and their messages) last updated more than --days days ago."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, required=True, help="Keep the last N days.")
        parser.add_argument("--dry-run", action="store_true", help="Count, delete nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"]
        if days < 1:
            raise CommandError("--days must be 1 or more: --days 0 would delete everything.")
        cutoff = timezone.now() - datetime.timedelta(days=days)
        old = Conversation.objects.filter(updated_at__lt=cutoff)
        if options["dry_run"]:
            self.stdout.write(f"Would delete {old.count()} conversations older than {days} days.")
            return
        deleted = old.delete()[1].get(Conversation._meta.label, 0)
        self.stdout.write(f"Deleted {deleted} conversations older than {days} days.")
