"""The operator edits grants in the admin: malformed permissions are refused, never dropped."""

from __future__ import annotations

import pytest

from kernel.forms import PermissionListField
from kernel.models import ApiKey, User

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    User.objects.create_superuser("operator", password="a long operator password")
    client.login(username="operator", password="a long operator password")
    return client


def change_form_data(user: User, grant: str) -> dict[str, str]:
    return {
        "username": user.username,
        "grant": grant,
        "is_active": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
    }


def test_the_grant_field_keeps_canonical_forms_and_refuses_the_whole_list_on_one_bad_line() -> None:
    field = PermissionListField(required=False)
    assert field.clean("schedule:*\n\nshell:cat,ls\nshell:ls,cat\n") == [
        "schedule:*",
        "shell:cat,ls",
    ]
    with pytest.raises(Exception, match="filesystem:read:relative"):
        field.clean("schedule:*\nfilesystem:read:relative")


def test_a_malformed_permission_in_the_admin_is_an_error_and_nothing_is_saved(
    operator, make_user
) -> None:
    user = make_user("alice", grant=["schedule:list"])
    response = operator.post(
        f"/admin/kernel/user/{user.pk}/change/",
        change_form_data(user, "schedule:list\nnet:http://example.com/path"),
    )
    assert response.status_code == 200  # the form again, with the error
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["grant"]
    assert "net:http://example.com/path" in errors["grant"][0]
    assert User.objects.get(pk=user.pk).grant == ["schedule:list"]


def test_an_interpreter_in_a_grant_is_saved_with_a_warning(operator, make_user) -> None:
    user = make_user("bob")
    response = operator.post(
        f"/admin/kernel/user/{user.pk}/change/",
        change_form_data(user, "shell:ls,python3"),
        follow=True,
    )
    assert User.objects.get(pk=user.pk).grant == ["shell:ls,python3"]
    assert b"equivalent to shell:*" in response.content


def test_the_system_principals_grant_is_the_heartbeat_files_and_read_only_here(
    operator, make_user
) -> None:
    from kernel.models import system_principal

    principal = system_principal()
    principal.grant = ["schedule:list"]
    principal.save()
    page = operator.get(f"/admin/kernel/user/{principal.pk}/change/")
    assert "grant" not in page.context["adminform"].form.fields
    operator.post(
        f"/admin/kernel/user/{principal.pk}/change/",
        change_form_data(principal, "shell:*\nnet:*"),
    )
    assert User.objects.get(pk=principal.pk).grant == ["schedule:list"]
    # Anyone else's grant is edited here as before.
    user = make_user("carol")
    assert (
        "grant"
        in operator.get(f"/admin/kernel/user/{user.pk}/change/").context["adminform"].form.fields
    )


def test_a_key_issued_in_the_admin_is_shown_once_and_stored_as_a_digest(
    operator, make_user
) -> None:
    user = make_user("carol")
    response = operator.post(
        "/admin/kernel/apikey/add/", {"user": user.pk, "name": "ci"}, follow=True
    )
    key = ApiKey.objects.get(user=user)
    secret = response.content.decode().split("copy it now): ")[1].split("<")[0].strip()
    assert secret.startswith("pbk_")
    from kernel.models import digest_key

    assert key.digest == digest_key(secret)
