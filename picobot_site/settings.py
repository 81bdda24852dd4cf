"""Settings for PicoBot Scheduler: the environment plus one TOML file, nothing else.

Environment: DATABASE_URL, PICOBOT_CONFIG, SECRET_KEY, DEBUG, ALLOWED_HOSTS, PICOBOT_PUBLIC_URL,
PICOBOT_METRICS_TOKEN, PICOBOT_HTTPS, PICOBOT_LOG_FORMAT, PICOBOT_MODEL_*, TWILIO_*. The TOML file (PICOBOT_CONFIG, default
./picobot.toml when present) holds [scheduler], [heartbeats], [model] and [notifications].
"""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from picobot_site.config import load_config
from picobot_site.observability import log_format

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false (got {raw!r})")


def _secret_key() -> str:
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    # Local use: a random key kept in a file beside the project, so sessions survive restarts
    # without anyone shipping a well-known key.
    path = BASE_DIR / ".secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


def _config_path() -> str | None:
    explicit = os.environ.get("PICOBOT_CONFIG")
    if explicit:
        return explicit
    default = BASE_DIR / "picobot.toml"
    return str(default) if default.exists() else None


# A ConfigError names the file, the key and the reason; manage.py prints it as one line.
PICOBOT = load_config(_config_path())

SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h
]

PICOBOT_PUBLIC_URL = os.environ.get("PICOBOT_PUBLIC_URL", "")
# Production behind a TLS-terminating proxy that sets X-Forwarded-Proto (README, "Deploying"):
# secure cookies, HTTPS redirect and HSTS, so `manage.py check --deploy` is clean.
PICOBOT_HTTPS = env_bool("PICOBOT_HTTPS", False)
if PICOBOT_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("PICOBOT_HSTS_SECONDS", "31536000"))
    # Both commit the whole domain to HTTPS for a long time: the operator says so explicitly.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PICOBOT_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("PICOBOT_HSTS_PRELOAD", False)
    # The metrics endpoint is scraped over plain HTTP on the private network.
    SECURE_REDIRECT_EXEMPT = [r"^metrics$"]
if PICOBOT_PUBLIC_URL:
    CSRF_TRUSTED_ORIGINS = [PICOBOT_PUBLIC_URL.rstrip("/")]
PICOBOT_METRICS_TOKEN = os.environ.get("PICOBOT_METRICS_TOKEN", "")
PICOBOT_MODEL_BASE_URL = os.environ.get("PICOBOT_MODEL_BASE_URL", "")
PICOBOT_MODEL = os.environ.get("PICOBOT_MODEL", "")
PICOBOT_MODEL_API_KEY = os.environ.get("PICOBOT_MODEL_API_KEY", "")
TWILIO_ACCOUNT_SID = os.environ.get("TWILIO_ACCOUNT_SID", "")
TWILIO_AUTH_TOKEN = os.environ.get("TWILIO_AUTH_TOKEN", "")
TWILIO_WHATSAPP_FROM = os.environ.get("TWILIO_WHATSAPP_FROM", "")
TWILIO_WHATSAPP_CONTENT_SID = os.environ.get("TWILIO_WHATSAPP_CONTENT_SID", "")
TWILIO_API_BASE_URL = os.environ.get("TWILIO_API_BASE_URL", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "django_prometheus",
    "picobot_site.apps.PicobotSiteConfig",
    "kernel",
    "schedules",
    "notifications",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS) under gunicorn with DEBUG off.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "picobot_site.middleware.ApiTrailingSlash",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "picobot_site.urls"
WSGI_APPLICATION = "picobot_site.wsgi.application"
ASGI_APPLICATION = "picobot_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'picobot.sqlite3'}"
    try:
        database: dict[str, object] = dict(dj_database_url.parse(url, conn_max_age=0))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
    if database["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets readers run beside the one writer; IMMEDIATE takes the writer lock at BEGIN so
        # two claimers never deadlock upgrading a read lock; the busy timeout queues writers.
        database["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
        # Tests start real worker processes, so the test database must be a file they can open.
        database["TEST"] = {"NAME": f"{database['NAME']}.test"}
    elif database["ENGINE"] == "django.db.backends.postgresql":
        database.setdefault("OPTIONS", {})
    return database


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "kernel.User"
AUTHENTICATION_BACKENDS = ["kernel.backends.PicoBotBackend"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve from the apps' static folders too, so a missed `collectstatic` never breaks the admin
# (and whitenoise need not warn that STATIC_ROOT was never collected).
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["kernel.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "picobot_site.api_rules.KnownQueryParams",
    ],
    "EXCEPTION_HANDLER": "picobot_site.api_rules.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "PicoBot Scheduler API",
    "DESCRIPTION": "Schedule prompts that the PicoBot agent runs later, with fixed capabilities.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Path ids are integers (the routes also take any segment, so a bad id is a JSON 404).
    "SCHEMA_COERCE_PATH_PK_SUFFIX": True,
    "ENUM_NAME_OVERRIDES": {
        "ScheduleTypeEnum": "schedules.models.ScheduleType",
        "MisfireEnum": "schedules.models.Misfire",
        "ExecutionStatusEnum": "schedules.models.ExecutionStatus",
        "ToolDecisionEnum": "kernel.models.ToolDecision",
        "ChannelEnum": "notifications.models.Channel",
        "ContactChannelEnum": "notifications.contacts.CONTACT_CHANNELS",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "picobot_site.api.readable_component_names",
        "picobot_site.api.readable_operations",
    ],
    # The docs page's scripts come from drf-spectacular-sidecar's static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

Q_CLUSTER = {
    "name": "picobot",
    "orm": "default",
    "workers": 2,
    "timeout": 60,
    "retry": 120,
    "catch_up": False,
    "ack_failures": True,
    "max_attempts": 1,
    # django-q2's admin pages are its delivery internals, not the schedule queue.
    "label": "Notification delivery (django-q2 tasks)",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "picobot_site.observability.JsonFormatter"},
    },
    # PICOBOT_LOG_FORMAT=json: one JSON object per line, with the run's ids.
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": log_format()}},
    "root": {"handlers": ["console"], "level": os.environ.get("PICOBOT_LOG_LEVEL", "INFO")},
    "filters": {
        "503_is_a_warning": {"()": "picobot_site.log_filters.ServiceUnavailableIsAWarning"}
    },
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # The server's own access line already shows every 4xx; this logger keeps 5xx only.
        "django.request": {"level": "ERROR", "filters": ["503_is_a_warning"]},
        # One line per model call is noise: the worker logs each run once.
        **{name: {"level": "WARNING"} for name in ("httpx", "httpx2", "httpcore", "openai")},
    },
}
