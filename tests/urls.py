from django.urls import include, path

from chatproxy.views import CompletionsView

urlpatterns = [
    path(
        "shouting/completions",
        CompletionsView.as_view(interceptors=["tests.test_interception.Shout"]),
    ),
    path("", include("project.urls")),
]
