from django.apps import AppConfig
from django.core import checks
from django.utils.translation import gettext_lazy as _

from .checks import check_settings


class ChatproxyConfig(AppConfig):
    name = "chatproxy"
    verbose_name = _("Chat proxy")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        checks.register(check_settings)
