"""Executions carry their job's owner, and the runs in an owner's rolling window are counted from
an (owner, started_at) index: the count no longer walks every job the owner ever had."""

from django.conf import settings
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_owners(apps, schema_editor):
    Execution = apps.get_model("schedules", "Execution")
    Job = apps.get_model("schedules", "Job")
    owner = Job.objects.filter(pk=OuterRef("job_id")).values("owner_id")[:1]
    Execution.objects.filter(owner__isnull=True).update(owner_id=Subquery(owner))


class Migration(migrations.Migration):
    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("schedules", "0004_execution_job_started_idx"),
    ]

    operations = [
        migrations.AddField(
            model_name="execution",
            name="owner",
            field=models.ForeignKey(
                blank=True,
                db_constraint=False,
                db_index=False,
                editable=False,
                null=True,
                on_delete=models.DO_NOTHING,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(copy_owners, migrations.RunPython.noop, elidable=True),
        migrations.RemoveIndex(model_name="execution", name="execution_job_started_idx"),
        migrations.AddIndex(
            model_name="execution",
            index=models.Index(
                condition=models.Q(("status", "skipped"), _negated=True),
                fields=["owner", "started_at"],
                name="execution_owner_started_idx",
            ),
        ),
    ]
