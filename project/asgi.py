"""ASGI entry point: Django for HTTP, chatproxy's consumer for WebSockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# Populate the app registry before anything imports models (consumers, routing).
django_asgi_app = get_asgi_application()

application = django_asgi_app
