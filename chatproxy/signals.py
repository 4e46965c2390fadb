"""Signals for integrations (analytics, billing, notifications)."""

from django.dispatch import Signal

# Sent when a turn has ended and its answer is saved, whatever its status, with
# ``message`` (the saved assistant ``Message``) and ``turn``. Receivers may be async.
turn_finished = Signal()
