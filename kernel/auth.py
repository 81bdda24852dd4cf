"""`Authorization: Bearer <key>` authentication for the REST API."""

from __future__ import annotations

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from kernel.models import API_KEY_PREFIX, ApiKey, User, digest_key

_MAX_KEY_LENGTH = 128


class ApiKeyAuthentication(BaseAuthentication):
    """Looks the key up by its SHA-256 digest; revoked keys and inactive users get 401."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiKey] | None:
        header = get_authorization_header(request)
        if not header:
            return None
        try:
            text = header.decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Malformed Authorization header.") from None
        scheme, _, credential = text.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
        credential = credential.strip()
        if (
            not credential
            or " " in credential
            or len(credential) > _MAX_KEY_LENGTH
            or not credential.startswith(API_KEY_PREFIX)
        ):
            raise exceptions.AuthenticationFailed("Malformed API key.")
        key = (
            ApiKey.objects.select_related("user")
            .filter(digest=digest_key(credential), revoked_at__isnull=True)
            .first()
        )
        if key is None or not key.user.is_active or key.user.is_system:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        key.touch()
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
