"""The django-q2 schedule of the notification sweep (its cadence follows the config at start)."""

from django.db import migrations

NAME = "picobot notifications sweep"


def create(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    if not Schedule.objects.filter(name=NAME).exists():
        Schedule.objects.create(
            name=NAME,
            func="notifications.delivery.sweep",
            schedule_type="C",
            cron="* * * * * */30",
            repeats=-1,
        )


def remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create, remove)]
