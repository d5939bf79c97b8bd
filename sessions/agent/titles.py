"""Session titles from a cheaper model (the agent profile's summary model, else
``DEPUTIES_SUMMARY_MODEL``), after a session's first run.

Without a title of its own a session is named after its prompt's first line, which is often a poor
name ("Hi, can you look at..."). When a summary model is configured, the first run that completes
asks it once for a short title from the prompt and the agent's summary: a few hundred tokens at the
cheap model's price, recorded as an ``LLMCall`` of the run like any other call. Nothing else uses
that model: the run's own summary is the agent's ``finish`` message, made by the session's model as
part of its work. A failing title call changes nothing but leaves its ``LLMCall`` row; the run has
already completed.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from django.db import transaction

from sessions.agent.profiles import summary_model
from sessions.events import emit_many
from sessions.models import LLMCall, Message, Run, Session, default_title

log = logging.getLogger(__name__)

TITLE_MAX_TOKENS = 40
TITLE_TIMEOUT = 30.0
PROMPT_CHARS = 4000
SUMMARY_CHARS = 2000
INSTRUCTIONS = (
    "You name coding tasks. Reply with a title of at most eight words for the task below: plain "
    "text, no quotes, no trailing period."
)


def wants_title(run: Run) -> bool:
    """The session's first run, and the session still has the title its prompt gave it."""
    if not summary_model(run.session) or run.attempt != 1:
        return False
    prompt = (
        Message.objects.filter(session_id=run.session_id, position=1)
        .values_list("content", flat=True)
        .first()
    )
    title = Session.objects.filter(pk=run.session_id).values_list("title", flat=True).first()
    return prompt is not None and title == default_title(prompt)


def clean(text: str) -> str:
    line = next((part.strip() for part in text.strip().splitlines() if part.strip()), "")
    return line.strip("\"'` ").rstrip(".").strip()[:120]


def title_session(run: Run, summary: str) -> str | None:
    """Ask the summary model for the session's title and save it; returns it (None when not)."""
    from sessions.agent.llm import LLMError, client_for, cost_usd

    model = summary_model(run.session)

    prompt = (
        Message.objects.filter(session_id=run.session_id, position=1)
        .values_list("content", flat=True)
        .first()
    )
    messages = [
        {"role": "system", "content": INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Task:\n{(prompt or '')[:PROMPT_CHARS]}\n\nOutcome:\n{summary[:SUMMARY_CHARS]}",
        },
    ]

    def record(attempt) -> None:
        usage = attempt.usage
        ok = attempt.outcome == LLMCall.Outcome.OK and usage is not None
        cost = cost_usd(attempt.model_key, usage) if ok else Decimal("0")
        LLMCall.objects.create(
            session_id=run.session_id,
            run=run,
            provider=attempt.provider,
            model=attempt.model,
            input_tokens=usage.input_tokens if ok else 0,
            output_tokens=usage.output_tokens if ok else 0,
            cached_tokens=usage.cached_tokens if ok else 0,
            cost_usd=cost,
            latency_ms=attempt.latency_ms,
            status_code=attempt.status_code,
            outcome=attempt.outcome,
            error=attempt.error[:2000],
        )
        if ok:
            run.add_usage(usage.input_tokens, usage.output_tokens, usage.cached_tokens, cost)
            record.usage = (usage, cost, attempt.model_key)

    record.usage = None
    try:
        with client_for(model, max_tokens=TITLE_MAX_TOKENS, timeout=TITLE_TIMEOUT, max_retries=1) as llm:
            response = llm.complete(messages, None, on_attempt=record)
    except LLMError as exc:
        log.warning("session %s: no title from %s: %s", run.session_id, model, exc)
        return None
    title = clean(response.text)
    if not title:
        return None
    with transaction.atomic():
        Session.objects.filter(pk=run.session_id).update(title=title)
        events = [("title", {"title": title, "model": model})]
        if record.usage is not None:
            usage, cost, model_key = record.usage
            events.append(
                (
                    "usage",
                    {
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                        "cached_tokens": usage.cached_tokens,
                        "cost_usd": str(cost),
                        "model": model_key,
                    },
                )
            )
        emit_many(run.session_id, events, run_id=run.pk)
    return title
