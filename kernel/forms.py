"""Admin form fields for permission lists."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from kernel.permissions import canonical_list


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
        result, errors = canonical_list(line for line in lines if line)
        if errors:
            raise ValidationError(list(errors.values()))
        return result

    def validate(self, value: Any) -> None:
        if self.required and not value:
            raise ValidationError(self.error_messages["required"], code="required")
