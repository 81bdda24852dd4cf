"""Login backend: the system principal can never log in, whatever its password says."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import ModelBackend


class PicoBotBackend(ModelBackend):
    def user_can_authenticate(self, user: Any) -> bool:
        return super().user_can_authenticate(user) and not getattr(user, "is_system", False)
