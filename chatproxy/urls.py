from django.urls import path

from . import health, metrics, pages, views

app_name = "chatproxy"

urlpatterns = [
    path("", pages.chat_page, name="chat"),
    path("completions", views.completions, name="completions"),
    path("completions/<uuid:conversation_id>/stream", views.resume, name="resume"),
    path("completions/<uuid:conversation_id>/cancel", views.cancel, name="cancel"),
    path("completions/<uuid:conversation_id>/watch", views.watch, name="watch"),
    path("messages/<uuid:message_id>/rating", views.rate, name="rating"),
    path("conversations", pages.conversations, name="conversations"),
    path("conversations/<uuid:conversation_id>", pages.conversation, name="conversation"),
    path("health", health.health, name="health"),
    path("health/ready", health.ready, name="ready"),
    path("metrics", metrics.export, name="metrics"),
    path(
        "conversations/<uuid:conversation_id>/branches",
        pages.branches,
        name="conversation-branches",
    ),
    path("conversations/<uuid:conversation_id>/branch", pages.branch, name="conversation-branch"),
]
