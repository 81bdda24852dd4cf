"""The contacts API and Twilio's status callbacks, under /api/v1/.

Contacts are the caller's own: another user's contact is a 404, as for schedules. Errors are
400 `{field: [reason]}`, 403 for a webhook without `notify:webhook` in the grant, 429 (named
quota) when too many codes were sent. The status callback route takes no API key: it answers
403 unless Twilio's `X-Twilio-Signature` verifies against `PICOBOT_PUBLIC_URL`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet
from twilio.request_validator import RequestValidator

from notifications import callbacks
from notifications.channels.whatsapp import status_callback_url
from notifications.contacts import CONTACT_CHANNELS, ContactError, add_contact, verify
from notifications.models import Contact
from schedules.api import ApiKeyThrottle, Pagination, StrictJSONParser

MAX_ADDRESS_CHARS = 2048


class ContactSerializer(serializers.ModelSerializer):
    verified = serializers.BooleanField(read_only=True)

    class Meta:
        model = Contact
        fields = ("id", "channel", "address", "verified", "verified_at", "created_at")
        read_only_fields = fields


class ContactCreatedSerializer(ContactSerializer):
    secret = serializers.SerializerMethodField(
        help_text="Webhooks only, shown once: the key of the X-PicoBot-Signature HMAC."
    )

    class Meta(ContactSerializer.Meta):
        fields = (*ContactSerializer.Meta.fields, "secret")
        read_only_fields = fields

    def get_secret(self, contact: Contact) -> str | None:
        return contact.webhook_secret or None


class _ClosedSerializer(serializers.Serializer):
    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)


class ContactInputSerializer(_ClosedSerializer):
    channel = serializers.ChoiceField(choices=CONTACT_CHANNELS)
    address = serializers.CharField(max_length=MAX_ADDRESS_CHARS, trim_whitespace=True)


class VerifyInputSerializer(_ClosedSerializer):
    code = serializers.CharField(max_length=16)


def _refusal(exc: ContactError) -> Response:
    if exc.status == 429:
        return Response({"detail": exc.message, "quota": exc.quota}, status=429)
    if exc.status == 403:
        return Response({"detail": exc.message}, status=403)
    return Response({exc.field or "non_field_errors": [exc.message]}, status=400)


@extend_schema_view(
    create=extend_schema(
        summary="Add a contact; a verification code is sent to it",
        request=ContactInputSerializer,
        responses={201: ContactCreatedSerializer, 400: OpenApiResponse(), 403: OpenApiResponse()},
    ),
    list=extend_schema(summary="List your contacts", responses={200: ContactSerializer(many=True)}),
    destroy=extend_schema(summary="Delete a contact", responses={204: None}),
)
class ContactViewSet(GenericViewSet):
    serializer_class = ContactSerializer
    pagination_class = Pagination
    queryset = Contact.objects.none()  # for the schema (integer ids); get_queryset is what runs

    @property
    def allowed_query_params(self) -> frozenset[str]:
        return frozenset({"limit", "offset"}) if self.action == "list" else frozenset()

    parser_classes = [StrictJSONParser]
    throttle_classes = [ApiKeyThrottle]

    def get_queryset(self) -> Any:
        return Contact.objects.filter(owner=self.request.user).order_by("id")

    def get_object(self) -> Contact:
        pk = self.kwargs.get("pk", "")
        if not str(pk).isdigit() or len(str(pk)) > 18:
            raise Http404
        try:
            return self.get_queryset().get(pk=int(pk))
        except Contact.DoesNotExist:
            raise Http404 from None

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(ContactSerializer(page, many=True).data)

    def create(self, request: Request) -> Response:
        given = ContactInputSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            contact, created = add_contact(
                request.user, given.validated_data["channel"], given.validated_data["address"]
            )
        except ContactError as exc:
            return _refusal(exc)
        serializer = ContactCreatedSerializer if created else ContactSerializer
        return Response(serializer(contact).data, status=201 if created else 200)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        self.get_object().delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Verify a contact with the code it received",
        request=VerifyInputSerializer,
        responses={200: ContactSerializer, 400: OpenApiResponse()},
    )
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk: str | None = None) -> Response:
        contact = self.get_object()
        given = VerifyInputSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            verify(contact, given.validated_data["code"])
        except ContactError as exc:
            return _refusal(exc)
        contact.refresh_from_db()
        return Response(ContactSerializer(contact).data)


@csrf_exempt
@require_POST
def twilio_status(request: HttpRequest) -> HttpResponse:
    """Twilio's message status callback; 403 unless its signature verifies."""
    url = status_callback_url()
    signature = request.headers.get("X-Twilio-Signature", "")
    if not (url and settings.TWILIO_AUTH_TOKEN and signature):
        return HttpResponseForbidden()
    params = {key: request.POST.get(key) for key in request.POST}
    if not RequestValidator(settings.TWILIO_AUTH_TOKEN).validate(url, params, signature):
        return HttpResponseForbidden()
    callbacks.apply_status(
        params.get("MessageSid") or "",
        params.get("MessageStatus") or "",
        params.get("ErrorCode") or "",
    )
    return HttpResponse(status=204)
