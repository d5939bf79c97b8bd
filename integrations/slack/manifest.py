"""``deputies slack manifest``: the Slack app manifest (JSON, which Slack's "Create an app › From a
manifest" accepts) with the scopes, events, slash command and interactivity this integration uses,
for HTTP (request URLs under DEPUTIES_BASE_URL) or Socket Mode (no public URL needed)."""

from __future__ import annotations

from typing import Any

BOT_SCOPES = [
    "app_mentions:read",  # @Deputies <prompt>
    "channels:history",  # replies in a bound thread (public channels)
    "groups:history",  # ... and private channels the app is in
    "chat:write",  # the thread's messages, the status message (chat.update), ephemeral answers
    "commands",  # /deputy
    "reactions:write",  # eyes, hourglass, check, x
    "users:read",  # users.info ...
    "users:read.email",  # ... with the verified email a Slack user is mapped by
]
BOT_EVENTS = ["app_mention", "message.channels", "message.groups"]


def build(
    base_url: str, socket_mode: bool, command: str = "/deputy", name: str = "Deputies"
) -> dict[str, Any]:
    base = base_url.rstrip("/") + "/integrations/slack"
    slash: dict[str, Any] = {
        "command": command,
        "description": "Delegate work to a background coding agent",
        "usage_hint": "[owner/repo] what to do",
        "should_escape": False,
    }
    events: dict[str, Any] = {"bot_events": BOT_EVENTS}
    interactivity: dict[str, Any] = {"is_enabled": True}
    if not socket_mode:
        slash["url"] = f"{base}/commands"
        events["request_url"] = f"{base}/events"
        interactivity["request_url"] = f"{base}/interactive"
    return {
        "display_information": {
            "name": name,
            "description": "Background coding agents: ask in a channel, follow and steer in the thread.",
        },
        "features": {
            "bot_user": {"display_name": name, "always_online": True},
            "slash_commands": [slash],
        },
        "oauth_config": {"scopes": {"bot": BOT_SCOPES}},
        "settings": {
            "event_subscriptions": events,
            "interactivity": interactivity,
            "org_deploy_enabled": False,
            "socket_mode_enabled": socket_mode,
            "token_rotation_enabled": False,
        },
    }
