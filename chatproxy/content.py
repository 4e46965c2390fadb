"""A message's ``content`` as a list of parts: text, images (``https:`` or a ``data:`` URL),
and the other part types a setting lets through.

Pure: no database, no I/O. Each failure is a ``RequestError`` whose message says what to fix.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit

from .conf import conf
from .exceptions import RequestError

DATA_URL = re.compile(r"data:image/(png|jpeg|webp|gif);base64,([A-Za-z0-9+/]*={0,2})", re.ASCII)
# What each image type's bytes start with: a data URL must hold the type it names.
MAGIC: dict[str, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"),
    "webp": (b"RIFF",),
}
DETAILS = ("auto", "low", "high")
MAX_URL = 2048
PART_EXAMPLE = (
    '[{"type": "text", "text": "What is this?"}, '
    '{"type": "image_url", "image_url": {"url": "https://..."}}]'
)


@dataclasses.dataclass(slots=True)
class Tally:
    """What a request's messages add up to, against the limits."""

    chars: int = 0
    images: int = 0
    image_bytes: int = 0

    def check(self) -> None:
        if self.chars > conf.CHATPROXY_MAX_CHARS:
            raise RequestError(
                "too_many_characters",
                f"Send at most {conf.CHATPROXY_MAX_CHARS} characters of content; "
                f"this request has {self.chars}.",
            )
        if not self.images:
            return  # a text-only request reads no image setting
        if self.images > conf.CHATPROXY_MAX_IMAGES:
            raise RequestError(
                "too_many_images",
                f"Send at most {conf.CHATPROXY_MAX_IMAGES} images; this request has {self.images}.",
            )
        if self.image_bytes > conf.CHATPROXY_MAX_IMAGE_BYTES:
            raise RequestError(
                "image_too_large",
                f"The images sent as data URLs take {self.image_bytes} bytes; send at most "
                f"{conf.CHATPROXY_MAX_IMAGE_BYTES}: make them smaller, or link them by https URL.",
            )


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a content: itself, or its text parts joined with newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def validate_parts(where: str, parts: list[Any], tally: Tally, *, images: bool) -> None:
    """Check a list of content parts in place; ``images`` says whether image parts may appear."""
    if not parts:
        raise RequestError(
            "invalid_messages", f"{where} must be a non-empty string or list of parts."
        )
    for i, part in enumerate(parts):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise RequestError(
                    "invalid_content_part", f'{at} must be {{"type": "text", "text": "..."}}.'
                )
            tally.chars += len(part["text"])
        elif kind == "image_url" and images:
            _image(at, part, tally)
        elif isinstance(kind, str) and kind in conf.CHATPROXY_EXTRA_PART_TYPES:
            continue  # passed through as sent: the project allowed this type
        elif kind is None:
            raise RequestError(
                "invalid_content_part",
                f'{at} must be an object with a "type", as in {PART_EXAMPLE}.',
            )
        else:
            allowed = ["text", *(["image_url"] if images else []), *conf.CHATPROXY_EXTRA_PART_TYPES]
            raise RequestError(
                "part_type_not_allowed",
                f"{at} has the type {kind!r}, which is not accepted here; use one of: "
                f"{', '.join(allowed)}.",
            )
    if not text_of(parts).strip() and not any(p["type"] != "text" for p in parts):
        raise RequestError("invalid_messages", f"{where} has no text: say something.")


def _image(at: str, part: dict[str, Any], tally: Tally) -> None:
    image = part.get("image_url")
    if (
        set(part) != {"type", "image_url"}
        or not isinstance(image, dict)
        or not isinstance(image.get("url"), str)
        or not set(image) <= {"url", "detail"}
        or image.get("detail", "auto") not in DETAILS
    ):
        raise RequestError(
            "invalid_content_part",
            f'{at} must be {{"type": "image_url", "image_url": {{"url": "...", '
            '"detail": "auto" | "low" | "high"}} (detail optional).',
        )
    url: str = image["url"]
    tally.images += 1
    if url.startswith("data:"):
        tally.image_bytes += _data_url_size(at, url)
        return
    parts = urlsplit(url) if len(url) <= MAX_URL else None
    if parts is None or parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
        raise RequestError(
            "invalid_image",
            f"{at}.image_url.url must be an https: URL of at most {MAX_URL} characters, or a "
            "data:image/(png|jpeg|webp|gif);base64,... URL.",
        )
    hosts = conf.CHATPROXY_IMAGE_HOSTS
    if hosts is not None and parts.hostname.lower() not in hosts:
        raise RequestError(
            "image_host_not_allowed",
            f"{at} links an image on {parts.hostname}, which is not an allowed host; link one on "
            f"{', '.join(hosts) or 'no host (send it as a data URL)'}, or send it as a data URL.",
        )


def _data_url_size(at: str, url: str) -> int:
    match = DATA_URL.fullmatch(url)
    try:
        data = base64.b64decode(match.group(2), validate=True) if match else b""
    except binascii.Error:
        data = b""
    if match is None or not data:
        raise RequestError(
            "invalid_image",
            f"{at}.image_url.url must be data:image/(png|jpeg|webp|gif);base64, followed by "
            "the image's bytes in base64.",
        )
    kind = match.group(1)
    if not data.startswith(MAGIC[kind]) or (kind == "webp" and data[8:12] != b"WEBP"):
        raise RequestError(
            "invalid_image", f"{at} says image/{kind}, but its bytes are not a {kind} image."
        )
    return len(data)
