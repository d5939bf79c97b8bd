import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agent_sessions", "0014_merge_agent_tools_flow"),
    ]

    operations = [
        migrations.AddField(
            model_name="automation",
            name="profile",
            field=models.ForeignKey(
                blank=True,
                help_text="The agent profile of its sessions. Empty: the environment's default, then the team's.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="automations",
                to="agent_sessions.agentprofile",
            ),
        ),
        migrations.AlterField(
            model_name="automation",
            name="model",
            field=models.CharField(
                blank=True,
                help_text="Empty: the profile's, the environment's default, then DEPUTIES_DEFAULT_MODEL.",
                max_length=200,
            ),
        ),
    ]
