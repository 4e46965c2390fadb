from django.urls import path

from . import views

app_name = "chatproxy"

urlpatterns = [
    path("completions", views.completions, name="completions"),
]
