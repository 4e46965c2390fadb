from django.urls import path

from . import pages, views

app_name = "chatproxy"

urlpatterns = [
    path("", pages.chat_page, name="chat"),
    path("completions", views.completions, name="completions"),
    path("conversations", pages.conversations, name="conversations"),
    path("conversations/<uuid:conversation_id>", pages.conversation, name="conversation"),
]
