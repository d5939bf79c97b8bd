"""Cheaper event writes on Postgres (sessions/events.py).

- ``Event.session`` loses its own index: the unique ``(session, seq)`` index covers lookups by session.
- ``Session`` rows get room for new versions (fillfactor 50): every emit bumps ``last_seq``, and an
  update that finds no room on its page cannot be HOT, so it adds an entry to each of the table's
  nine indexes, and lookups by id then wade through dead entries until a vacuum. Rows inserted from
  now on leave the room; existing pages follow as they are rewritten.
"""

import django.db.models.deletion
from django.db import migrations, models


def fillfactor(value: int):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            table = apps.get_model("agent_sessions", "Session")._meta.db_table
            schema_editor.execute(f"ALTER TABLE {schema_editor.quote_name(table)} SET (fillfactor = {value})")

    return apply


class Migration(migrations.Migration):
    dependencies = [
        ("agent_sessions", "0015_automation_profile"),
    ]

    operations = [
        migrations.AlterField(
            model_name="event",
            name="session",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="events",
                to="agent_sessions.session",
            ),
        ),
        migrations.RunPython(fillfactor(50), fillfactor(100)),
    ]
