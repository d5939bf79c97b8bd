"""Integrations found lazily: every subpackage of ``integrations`` that has a ``checks`` module with
``check() -> Check`` gets a card on /setup. Nothing is imported until the page asks, and a new
integration needs no edit here."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import integrations

logger = logging.getLogger(__name__)

# Cards in this order; integrations not listed follow alphabetically.
ORDER = ("webhooks", "deliveries", "slack", "github")


def names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(integrations.__path__) if m.ispkg}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def checks() -> list:
    """One check per integration; a check that raises is shown as a problem, not a broken page."""
    from sessions.web.setup_checks import Check

    results = []
    for name in names():
        try:
            module = importlib.import_module(f"integrations.{name}.checks")
        except ModuleNotFoundError as exc:
            if exc.name != f"integrations.{name}.checks":
                raise
            continue  # an integration without a card
        try:
            results.append(module.check())
        except Exception as exc:
            logger.warning("setup: the %s check failed", name, exc_info=True)
            results.append(
                Check(name.title(), "error", f"Its check failed ({type(exc).__name__}).", "See the web log.")
            )
    return results
