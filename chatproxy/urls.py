from django.urls import path

from . import health, metrics, openai_views, pages, ui_views, views

app_name = "chatproxy"

urlpatterns = [
    path("", pages.chat_page, name="chat"),
    path("completions", views.completions, name="completions"),
    path("completions/<uuid:conversation_id>/stream", views.resume, name="resume"),
    path("completions/<uuid:conversation_id>/cancel", views.cancel, name="cancel"),
    path("completions/<uuid:conversation_id>/watch", views.watch, name="watch"),
    path("budgets", views.budgets, name="budgets"),
    path("messages/<uuid:message_id>/rating", views.rate, name="rating"),
    path("conversations", pages.conversations, name="conversations"),
    path("v1/chat/completions", openai_views.chat_completions, name="openai_chat_completions"),
    path("v1/models", openai_views.models, name="openai_models"),
    path("ui/chat", ui_views.chat, name="ui_chat"),
    path("ui/chat/<str:chat_id>/stream", ui_views.resume, name="ui_resume"),
    path("ui/chat/<str:chat_id>/cancel", ui_views.cancel, name="ui_cancel"),
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
