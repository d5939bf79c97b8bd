"""Inbound webhooks: ``POST /integrations/webhooks/<source>`` starts (or continues) a session.

A ``WebhookSource`` says who may call (a bearer token, or an HMAC-SHA256 secret over the raw body
with a timestamp) and where the work goes (default repository, environment, model, allowlist).
The view is thin; ``services.receive`` verifies, validates and routes.
"""
