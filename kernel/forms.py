"""Admin form fields for permission lists."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from kernel.permissions import InvalidPermission, parse_permission


class PermissionListField(forms.CharField):
    """One permission string per line; every line must parse, none is dropped."""

    widget = forms.Textarea(attrs={"rows": 6, "cols": 60})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list):
            lines = value
        else:
            lines = [line.strip() for line in (value or "").splitlines()]
        result: list[str] = []
        errors: list[str] = []
        for line in lines:
            if not line:
                continue
            try:
                canonical = parse_permission(line).text
            except InvalidPermission as exc:
                errors.append(str(exc))
                continue
            if canonical not in result:
                result.append(canonical)
        if errors:
            raise ValidationError(errors)
        return result

    def validate(self, value: Any) -> None:
        if self.required and not value:
            raise ValidationError(self.error_messages["required"], code="required")
