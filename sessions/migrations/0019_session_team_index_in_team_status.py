"""The session's team_id index is dropped: ``session_team_status`` (team, status, -created) starts
with the same column and serves every lookup by team. Each claim and finish changes the session's
status, an indexed column, so Postgres cannot update the row in place (HOT) and writes an entry into
every index of the table: one index fewer is one fewer entry per status change and per insert.

The database side is the bare DROP INDEX: Django's AlterField would also drop and re-add the team
foreign key, re-validating every session row under a lock."""

import django.db.models.deletion
from django.db import migrations, models

INDEX = "agent_sessions_session_team_id_a61fda12"


class Migration(migrations.Migration):
    dependencies = [
        ("agent_sessions", "0018_merge_event_storage"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="session",
                    name="team",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="sessions",
                        to="agent_sessions.team",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{INDEX}"',
                    reverse_sql=f'CREATE INDEX "{INDEX}" ON "agent_sessions_session" ("team_id")',
                ),
            ],
        ),
    ]
