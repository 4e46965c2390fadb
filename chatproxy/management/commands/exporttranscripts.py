"""Export conversations as JSONL (the chat fine-tuning format) or CSV, streamed to a file."""

from __future__ import annotations

import datetime
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Exists, OuterRef, Q

from chatproxy.export import CONTENT_TYPES, export
from chatproxy.models import Conversation
from chatproxy.review import Annotation, Kind


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise CommandError(f"Give dates as YYYY-MM-DD, not {text!r}.") from None


class Command(BaseCommand):
    help = (
        "Export conversations as JSONL in the chat fine-tuning format (chatproxy's metadata "
        "beside each) or as CSV with one row per message. With CHATPROXY_STORE_CONTENT = False "
        "the export holds metadata only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=sorted(CONTENT_TYPES), default="jsonl")
        parser.add_argument("--output", "-o", default="-", help="A file; - (the default): stdout.")
        parser.add_argument("--since", type=_date, help="Created on or after YYYY-MM-DD.")
        parser.add_argument("--until", type=_date, help="Created before YYYY-MM-DD.")
        parser.add_argument("--status", help="The conversation's last status, e.g. failed.")
        parser.add_argument("--model", help="The conversation's model.")
        parser.add_argument("--owner", help="The owner's user name.")
        parser.add_argument("--flag", help="Only conversations with this review flag.")
        parser.add_argument(
            "--reviewed", action="store_true", help="Only conversations marked reviewed."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        conversations = Conversation.objects.filter(self.filters(options))
        marks = Annotation.objects.filter(conversation=OuterRef("pk"))
        if options["flag"]:
            flagged = marks.filter(kind=Kind.FLAG, value=options["flag"])
            conversations = conversations.filter(Exists(flagged))
        if options["reviewed"]:
            conversations = conversations.filter(Exists(marks.filter(kind=Kind.REVIEWED)))
        if options["output"] == "-":
            for chunk in export(conversations, options["format"]):
                self.stdout.write(chunk.decode(), ending="")  # each chunk ends a line
            return
        try:
            with open(options["output"], "wb") as out:
                self.write(conversations, options["format"], out)
        except OSError as exc:
            raise CommandError(f"Could not write {options['output']}: {exc.strerror}.") from None

    def filters(self, options: dict[str, Any]) -> Q:
        q = Q()
        if options["since"]:
            q &= Q(created_at__date__gte=options["since"])
        if options["until"]:
            q &= Q(created_at__date__lt=options["until"])
        for name in ("status", "model"):
            if options[name]:
                q &= Q(**{name: options[name]})
        if options["owner"]:
            q &= Q(owner__username=options["owner"])
        return q

    def write(self, conversations: Any, fmt: str, out: IO[bytes]) -> None:
        for chunk in export(conversations, fmt):
            out.write(chunk)
        out.flush()
