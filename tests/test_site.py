"""The site serves its admin login page and a public OpenAPI schema."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_the_admin_login_page_is_served(client) -> None:
    response = client.get("/admin/login/")
    assert response.status_code == 200
    assert b"password" in response.content


def test_the_schema_is_public_openapi_3(client) -> None:
    response = client.get("/api/v1/schema", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
