"""Issue a bearer API key for a user from the command line, for scripts and servers."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatproxy.models import ApiKey


class Command(BaseCommand):
    help = (
        "Create an API key for USERNAME and print it. Only its hash is stored: the key is "
        "shown this once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="The user the key acts as.")
        parser.add_argument("--name", default="command line", help="What the key is for.")

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model()._default_manager
        try:
            user = users.get_by_natural_key(options["username"])
        except users.model.DoesNotExist:
            raise CommandError(
                f"No user {options['username']!r}. Create one first, for example with "
                "manage.py createsuperuser."
            ) from None
        if not user.is_active:
            raise CommandError(
                f"The user {options['username']!r} is inactive: a key would not work."
            )
        _, raw = ApiKey.objects.issue(user, options["name"][:100])
        # The key alone on stdout, so a shell can capture it: KEY=$(manage.py createapikey …).
        self.stdout.write(raw)
