"""The agent loop: ask the model, run the tools it asks for in the sandbox, repeat until it finishes.

It runs in the worker, so model keys never reach the sandbox. Everything the user sees is an event;
every model attempt is an LLMCall row. The loop stops on its own in all cases: the model finishes
(``finish`` tool or a reply without tool calls), the step limit, a model error after retries, or a
cancelled run (checked before every model call and between tool calls).

The conversation is kept in the canonical (OpenAI chat) format. Every assistant tool call gets a
``tool`` message back, even when it was skipped, so the stored transcript is always a valid
conversation for the follow-up run.

Checkpoints, for resuming after a lost worker: the state (conversation, todo list, step count) is
saved on the Run by statements a step makes anyway: with the model call's usage (and its LLMCall
row) once the reply is in the conversation, and with the next step's heartbeat once its tool results
are; each sends only the messages the saved conversation lacks (``Checkpoint``). Each of those shares
one commit with the events around it: the reply's usage, text and first ``tool_started`` go together
(before the tool runs), the last ``tool_finished`` goes in the heartbeat's statement (or before the
runner saves the workspace), so a step costs two commits instead of four (five with text). A run resumed from
the first kind has the reply's tool calls still to answer: those that finished are answered from
their ``tool_finished`` events, the one that was running is closed as interrupted (an event with
``interrupted: true``, a tool result telling the model) unless it is safe to run again (the session
tools, sessions/children.py ``RERUNNABLE``: a spawn is keyed by its call), the rest are run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sandboxes.base import SandboxError
from sessions.agent.context import compact, transcript_size
from sessions.agent.llm import AttemptRecord, LLMClient, LLMError, ToolCall, client_for, cost_usd
from sessions.agent.prompts import build_system_prompt
from sessions.agent.tools import ToolError, ToolResult
from sessions.agent.toolset import Toolset
from sessions.artifacts import store_artifact
from sessions.budgets import RunBudget
from sessions.children import NAMES as SESSION_TOOLS
from sessions.children import RERUNNABLE
from sessions.children import execute as execute_session_tool
from sessions.children import tool_specs as session_tool_specs
from sessions.events import emit, emit_many
from sessions.models import Checkpoint, Event, LLMCall, Run

__all__ = ["AgentResult", "build_system_prompt", "run_agent"]

logger = logging.getLogger(__name__)

COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
# Tools that only record what the model said (sessions/agent/tools.py): they return at once, so
# their tool_started waits and shares one statement with what follows it.
INSTANT_TOOLS = frozenset({"finish", "todo_write", "report_progress"})
INTERRUPTED = (
    "interrupted: the worker running this call stopped before it returned, so its output is lost. "
    "It may have run partly or completely; check the workspace before running it again."
)
EVENT_TEXT_LIMIT = 20_000  # assistant text in one event
EVENT_ARGUMENT_LIMIT = 2_000  # each string inside tool arguments, in events only
ERROR_LIMIT = 2_000


@dataclass
class AgentResult:
    status: str  # "completed", "failed" or "cancelled"
    summary: str = ""
    transcript: list[dict[str, Any]] = field(default_factory=list)  # the input messages + this run's
    error: str = ""
    tools_called: list[str] = field(default_factory=list)  # names, in order, of the tools this run ran


def run_agent(
    run: Run,
    handle: Any,
    messages: list[dict[str, Any]],
    *,
    model: str | None = None,
    client: LLMClient | None = None,
    save_steps: bool = True,
    todos: list[dict[str, str]] | None = None,
    after_step: Callable[[list[str], Callable[[], None]], None] | None = None,
    toolset: Toolset | None = None,
) -> AgentResult:
    """Drive the conversation ``messages`` (canonical format, system prompt first) to an end.

    ``model`` overrides the session's model ("provider/model"); ``client`` replaces the client made
    from it (the caller then closes it). The run must already be claimed (status running).
    ``save_steps=False``: the caller ends the run (``Run.finish`` saves the step count), so the
    count is not written here as well. ``messages`` may be a checkpoint's conversation (with
    ``run.steps`` and ``todos`` from it too): a reply whose tool calls are unanswered is finished first.
    ``after_step(tools, flush)`` is called after each step the run goes on from, with the tools it
    ran (the runner saves the workspace there, after calling ``flush`` to write the step's events).
    ``toolset``: the run's tools and limits (sessions/agent/toolset.py ``build_toolset``); without
    it, the built-in workspace tools.
    """
    transcript = list(messages)
    try:
        llm = client or client_for(model or run.session.model)
    except LLMError as exc:
        return AgentResult(FAILED, transcript=transcript, error=str(exc))
    try:
        return _Agent(run, handle, llm, transcript, todos, after_step, toolset).loop()
    finally:
        if client is None:
            llm.close()
        if save_steps:
            Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(steps=run.steps)


class _Agent:
    def __init__(
        self,
        run: Run,
        handle: Any,
        llm: LLMClient,
        transcript: list[dict[str, Any]],
        todos: list[dict[str, str]] | None = None,
        after_step: Callable[[list[str], Callable[[], None]], None] | None = None,
        toolset: Toolset | None = None,
    ):
        self.run = run
        self.toolset = toolset or Toolset.builtin()
        self.handle = handle
        self.llm = llm
        self.transcript = transcript
        self.started = timezone.now()
        self.budget = RunBudget(run)
        self.tools_called: list[str] = []
        self.steers_seen = run.steers  # Run.beat reads the counter back each step
        # The run's toolset (profile, MCP, web) plus the child-session tools (sessions/children.py).
        # A profile that lists its tools gets only those of the session tools too.
        profile = run.session.profile
        self.tool_specs = self.toolset.specs + [
            spec
            for spec in session_tool_specs(run.session)
            if profile is None or profile.allows_tool(spec["name"])
        ]
        self.todos = todos
        self.after_step = after_step
        self.answer: AttemptRecord | None = None  # the successful attempt, recorded with its reply
        # Written with the next event (one commit per step boundary instead of one per write): the
        # reply's attempt (LLMCall, usage, checkpoint) and the events that follow it.
        self.unsaved: tuple[AttemptRecord, Checkpoint] | None = None
        # How many messages of the transcript the run's saved checkpoint holds (None: not known,
        # the next checkpoint writes it whole); only what follows them is sent (Checkpoint).
        self.saved_messages: int | None = None
        self.unsent: list[tuple[str, dict[str, Any]]] = []
        self.recorded: dict[str, dict[str, Any]] = {}  # call id -> its events from a lost attempt
        self.chars = self.measured = 0  # the transcript's size in characters, of its first messages

    def checkpoint(self) -> Checkpoint:
        """What a recovered attempt needs to go on from here (Run.checkpoint). Counted as saved at
        once: a failed write ends the run."""
        checkpoint = Checkpoint(
            self.run.steps, self.todos, self.transcript, len(self.transcript), self.saved_messages or 0
        )
        self.saved_messages = checkpoint.upto
        return checkpoint

    def emit(self, type: str, payload: dict[str, Any]) -> None:
        self.emit_all([(type, payload)])

    def emit_all(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Write ``events`` now, after whatever was held back, in one transaction with the reply's
        attempt when that is still unsaved."""
        events = self.unsent + events
        self.unsent = []
        if self.unsaved is not None:
            (answer, checkpoint), self.unsaved = self.unsaved, None
            self.save_attempt(answer, checkpoint, events)
        elif len(events) == 1:
            emit(self.run.session_id, *events[0], run_id=self.run.pk)
        elif events:
            emit_many(self.run.session_id, events, run_id=self.run.pk)

    def flush(self) -> None:
        if self.unsent or self.unsaved is not None:
            self.emit_all([])

    def beat(self) -> bool:
        """Heartbeat with the checkpoint; the last step's held-back events share its statement (or,
        with the reply's attempt still unsaved, its commit)."""
        if self.unsaved is None:
            events, self.unsent = self.unsent, []
            return self.run.beat(self.checkpoint(), events)
        with transaction.atomic():
            self.flush()
            return self.run.beat(self.checkpoint())

    def result(self, status: str, summary: str = "", error: str = "") -> AgentResult:
        return AgentResult(status, summary, self.transcript, error, list(self.tools_called))

    def loop(self) -> AgentResult:
        try:
            return self.drive()
        finally:
            self.flush()  # however the loop ends, what it held back is written

    def drive(self) -> AgentResult:
        max_steps = self.toolset.max_steps or settings.AGENT_MAX_STEPS
        unanswered = self.unanswered()
        if unanswered is not None:  # resumed mid-step: finish the step the lost attempt was in
            calls, text = unanswered
            if (end := self.act(calls, text)) is not None:
                return end
        while self.run.steps < max_steps:
            # Also persists the step count and the checkpoint; False once cancelled.
            if not self.beat():
                return self.result(CANCELLED, error="cancelled")
            self.take_steers()
            if problem := self.budget.problem() or self.time_problem():
                return self.result(FAILED, error=problem)
            self.compact()
            self.run.steps += 1
            try:
                response = self.llm.complete(self.transcript, self.tool_specs, on_attempt=self.record_attempt)
            except LLMError as exc:
                return self.result(FAILED, error=str(exc))
            self.transcript.append(response.to_message())
            if self.answer is not None:  # its usage and the checkpoint with the reply, written with
                answer, self.answer = self.answer, None  # the first event of the step (tool_started)
                self.unsaved = (answer, self.checkpoint())
            text = response.text.strip()
            if text:
                self.unsent.append(("assistant_text", {"text": _clip(text, EVENT_TEXT_LIMIT)}))
            if not response.tool_calls:
                return self.result(COMPLETED, summary=text)
            if (end := self.act(response.tool_calls, text)) is not None:
                return end
        return self.result(FAILED, error=f"step limit ({max_steps}) reached")

    def take_steers(self) -> None:
        """Steer messages sent since the last step, as user messages before this model call."""
        if self.run.steers != self.steers_seen:
            from sessions.steering import take_steers

            self.steers_seen = self.run.steers
            take_steers(self.run, self.transcript)

    def unanswered(self) -> tuple[list[ToolCall], str] | None:
        """The last reply's tool calls when none has its result in the conversation yet (a
        checkpoint saved with the reply), with the lost attempt's events for each of them."""
        last = self.transcript[-1] if self.transcript else {}
        if last.get("role") != "assistant" or not last.get("tool_calls"):
            return None
        calls = [
            ToolCall(c.get("id", ""), c["function"]["name"], c["function"].get("arguments", ""))
            for c in last["tool_calls"]
        ]
        events = Event.objects.filter(
            run_id=self.run.pk,
            type__in=("tool_started", "tool_finished"),
            payload__call_id__in=[c.id for c in calls],
        ).order_by("seq")
        for event in events:
            self.recorded.setdefault(event.payload["call_id"], {})[event.type] = event.payload
        return calls, (last.get("content") or "").strip()

    def act(self, calls: list[ToolCall], text: str) -> AgentResult | None:
        """Run one reply's tool calls; the run's result when the step ends it, else None."""
        summary: str | None = None
        for n, call in enumerate(calls):
            if summary is not None:
                self.skip(call, "not run: `finish` was called earlier in the same reply")
                continue
            if n > 0 and self.run.is_cancelled():
                for rest in calls[n:]:
                    self.skip(rest, "not run: the run was cancelled")
                return self.result(CANCELLED, error="cancelled")
            try:
                result = self.run_tool(call)
            except SandboxError as exc:  # the sandbox itself is broken: no point going on
                for rest in calls[n:]:
                    self.skip(rest, f"not run: the sandbox failed ({exc})")
                return self.result(FAILED, error=f"sandbox error in {call.name}: {exc}")
            if result is not None and result.finished:
                summary = (result.summary or "").strip() or text
        if summary is not None:
            return self.result(COMPLETED, summary=summary)
        if self.after_step is not None:
            # Whatever it saves comes after this step's events, so it writes them first.
            self.after_step([c.name for c in calls], self.flush)
        return None

    def time_problem(self) -> str | None:
        """The environment's time limit, checked between steps (a command in flight keeps its own
        exec timeout, so a run can overrun by at most DEPUTIES_SANDBOX_EXEC_TIMEOUT)."""
        environment = self.run.session.environment
        limit = environment.timeout_seconds if environment else None
        if not limit:
            return None
        elapsed = (timezone.now() - (self.run.started or self.started)).total_seconds()
        if elapsed <= limit:
            return None
        return f"time limit: the run has taken {elapsed:.0f} s, over its environment's {limit} s limit"

    def compact(self) -> None:
        """Within the context budget. The size is counted as the conversation grows (only at its
        end, between compactions), not over all of it at every step."""
        self.chars += transcript_size(self.transcript[self.measured :])
        self.measured = len(self.transcript)
        if self.chars <= settings.CONTEXT_CHARS:
            return
        compacted, done = compact(self.transcript, settings.CONTEXT_CHARS)
        if done is not None:
            self.chars = done.chars_after
            self.transcript[:] = compacted
            self.saved_messages = None  # earlier messages changed: the next checkpoint is whole
            self.emit(
                "context_compacted",
                {"elided": done.elided, "chars_before": done.chars_before, "chars_after": done.chars_after},
            )

    def record_attempt(self, record: AttemptRecord) -> None:
        """One LLMCall row per HTTP attempt; usage and cost count only for successful ones.

        The successful attempt is written once its reply is in the conversation (``loop``), so the
        checkpoint with the reply shares its statement.
        """
        if record.outcome == LLMCall.Outcome.OK and record.usage is not None:
            self.answer = record
            return
        self.save_attempt(record)

    def save_attempt(
        self,
        record: AttemptRecord,
        checkpoint: Checkpoint | None = None,
        then: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        """``then``: events that follow the attempt's own, written in its transaction."""
        usage = record.usage
        ok = record.outcome == LLMCall.Outcome.OK and usage is not None
        cost = cost_usd(record.model_key, usage) if ok else Decimal("0")
        call = {"provider": record.provider, "model": record.model, "latency_ms": record.latency_ms,
                "status_code": record.status_code, "outcome": record.outcome,
                "error": record.error[:ERROR_LIMIT]}  # fmt: skip
        if ok:  # the usage, its LLMCall row, the checkpoint and the events: one statement on Postgres
            event = (
                "usage",
                {
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                    "cached_tokens": usage.cached_tokens,
                    "cost_usd": str(cost),
                    "model": record.model_key,
                },
            )
            self.run.add_usage(
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_tokens,
                cost,
                checkpoint,
                call,
                events=[event, *(then or [])],
            )
            return
        event = (
            "llm_error",
            {
                "error": _clip(record.error, 500),
                "attempt": record.attempt,
                "will_retry": record.outcome == LLMCall.Outcome.RETRY,
            },
        )
        with transaction.atomic():
            LLMCall.objects.create(session_id=self.run.session_id, run=self.run, **call)
            emit_many(self.run.session_id, [event, *(then or [])], run_id=self.run.pk)

    def run_tool(self, call: ToolCall) -> ToolResult | None:
        """Run one tool call; a ToolError goes back to the model as the result text.

        A SandboxError (the sandbox is broken, per the tools contract) propagates to the caller.
        """
        recorded = self.recorded.pop(call.id, None)
        if recorded and ("tool_finished" in recorded or call.name not in RERUNNABLE):
            return self.replay(call, recorded)
        self.tools_called.append(call.name)
        started = (
            "tool_started",
            {"call_id": call.id, "name": call.name, "arguments": _event_arguments(call.arguments)},
        )
        events: list[tuple[str, dict[str, Any]]] = []
        if not recorded:  # run again (RERUNNABLE): its tool_started is the lost attempt's
            if call.name in INSTANT_TOOLS:
                events.append(started)  # written with tool_finished, in order
            else:
                self.emit(*started)  # shown while the tool runs
        result: ToolResult | None = None
        try:
            if call.name in SESSION_TOOLS and any(spec["name"] == call.name for spec in self.tool_specs):
                # spawn/wait/cancel child sessions: they need the run
                result = execute_session_tool(self.run, call.name, call.arguments, call.id)
            else:
                result = self.toolset.execute(self.handle, call.name, call.arguments)
            ok, output = result.ok, result.output or ""
        except ToolError as exc:
            ok, output = False, f"error: {exc}"
        except SandboxError as exc:
            events.append(
                (
                    "tool_finished",
                    {
                        "call_id": call.id,
                        "name": call.name,
                        "ok": False,
                        "output": f"sandbox error: {exc}",
                        "truncated": False,
                    },
                )
            )
            self.emit_all(events)
            raise
        except BaseException:
            self.emit_all(events)  # tool_started stays in the record of what ran
            raise
        if events and len(output) > settings.TOOL_OUTPUT_LIMIT:
            self.emit_all(events)  # before the artifact the truncation stores (and announces)
            events = []
        text, artifact_id = self.truncate(call, output)
        payload: dict[str, Any] = {
            "call_id": call.id,
            "name": call.name,
            "ok": ok,
            "output": text,
            "truncated": artifact_id is not None,
        }
        if artifact_id is not None:
            payload["artifact_id"] = artifact_id
        events.append(("tool_finished", payload))
        if result is not None and result.todos is not None:
            self.todos = result.todos
            events.append(("todo", {"todos": result.todos}))
        if result is not None and result.progress:
            events.append(("progress", {"message": result.progress}))
        self.unsent += events  # written by whatever comes next: a tool_started, the heartbeat
        self.transcript.append({"role": "tool", "tool_call_id": call.id, "content": text})
        return result

    def replay(self, call: ToolCall, recorded: dict[str, dict[str, Any]]) -> ToolResult | None:
        """A call of the lost attempt: answered from its ``tool_finished`` (the text the model
        would have got), or closed as interrupted when it was still running."""
        self.tools_called.append(call.name)
        finished = recorded.get("tool_finished")
        if finished is None:
            payload = {"call_id": call.id, "name": call.name, "ok": False, "output": INTERRUPTED,
                       "truncated": False, "interrupted": True}  # fmt: skip
            self.emit("tool_finished", payload)
            self.transcript.append({"role": "tool", "tool_call_id": call.id, "content": INTERRUPTED})
            return None
        self.transcript.append({"role": "tool", "tool_call_id": call.id, "content": finished["output"]})
        if call.name in INSTANT_TOOLS:  # they only record what the model said: run them again, silently
            try:
                result = self.toolset.execute(self.handle, call.name, call.arguments)
            except ToolError:
                return None
            if result.todos is not None:
                self.todos = result.todos
            return result
        return ToolResult(ok=bool(finished.get("ok")), output=finished["output"])

    def truncate(self, call: ToolCall, output: str) -> tuple[str, int | None]:
        """Head and tail within TOOL_OUTPUT_LIMIT; the whole output is kept as an artifact."""
        limit = settings.TOOL_OUTPUT_LIMIT
        if len(output) <= limit:
            return output, None
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "", call.id)[:40] or "call"
        artifact = store_artifact(
            self.run.session_id,
            "tool_output",
            f"{re.sub(r'[^A-Za-z0-9_-]', '', call.name)[:40] or 'tool'}-{safe_id}.txt",
            output,
            run_id=self.run.pk,
        )
        head = limit * 3 // 4
        tail = limit - head
        omitted = len(output) - head - tail
        marker = (
            f"\n[... {omitted} characters omitted; the full output ({len(output)} characters) "
            f"is saved as artifact {artifact.pk} ...]\n"
        )
        return output[:head] + marker + output[-tail:], artifact.pk

    def skip(self, call: ToolCall, reason: str) -> None:
        self.transcript.append({"role": "tool", "tool_call_id": call.id, "content": reason})


def _event_arguments(raw: str) -> Any:
    """The arguments for the event stream: parsed when possible, long strings clipped."""
    try:
        value = json.loads(raw) if raw and raw.strip() else {}
    except ValueError:
        return _clip(raw, EVENT_ARGUMENT_LIMIT)
    return _clip_strings(value)


def _clip_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _clip(value, EVENT_ARGUMENT_LIMIT)
    if isinstance(value, dict):
        return {k: _clip_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip_strings(v) for v in value]
    return value


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"
