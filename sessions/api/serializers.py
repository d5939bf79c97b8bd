"""Request validation and response shapes. Validation names the field; writes go through the models."""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse
from rest_framework.utils.serializer_helpers import ReturnDict

from sandboxes.models import Sandbox
from sessions.api.permissions import MAX_ID, find_team
from sessions.models import (
    SECRET_NAME_RE,
    Artifact,
    Environment,
    Event,
    Message,
    Repository,
    Run,
    Session,
    Source,
    Team,
    model_problem,
    session_model,
    start_session,
    text_problem,
)
from sessions.repository_urls import RepositoryRefused, check_repository_url
from sessions.secrets import MAX_SECRET_BYTES, MIN_SECRET_LENGTH

# --- shared checks --------------------------------------------------------------------------------

# The shape of a clone URL or a path, to tell one from a repository's name (webhooks); whether it may
# be used is for clean_clone_url (sessions/repository_urls.py) to say.
CLONE_URL = re.compile(
    r"""^(?:
        [A-Za-z][A-Za-z0-9+.-]*://\S+      # scheme URLs
      | [\w.-]+@[\w.-]+:[^\s:]\S*          # scp-like: git@github.com:org/repo.git
      | /\S*                               # an absolute path on the worker host
    )$""",
    re.VERBOSE,
)
BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")


class StrictCharField(serializers.CharField):
    """A JSON string, not a number turned into one: the schema says string, so ``0`` is a 400."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string"}], "description": "Team id or slug."})
class TeamRefField(serializers.CharField):
    """A team named by id (a number) or slug; the view resolves it before validation."""


STRICT_TEXT_FIELDS = {models.CharField: StrictCharField, models.TextField: StrictCharField}


def clean_clone_url(value: str) -> str:
    """The repository URL as stored: checked by the rules of sessions/repository_urls.py."""
    try:
        return check_repository_url(value).url
    except RepositoryRefused as exc:
        raise serializers.ValidationError(str(exc)) from None


def clean_model(value: str) -> str:
    """A model setting as stored: stripped; empty (the default applies) or a usable ``provider/model``."""
    value = value.strip()
    if value and (problem := model_problem(value)):
        raise serializers.ValidationError(problem)
    return value


def clean_branch(value: str) -> str:
    value = value.strip()
    if value and (
        not BRANCH.match(value) or ".." in value or "//" in value or value.endswith(("/", ".", ".lock"))
    ):
        raise serializers.ValidationError(f"{value!r} is not a valid branch name.")
    return value


def repository_name_for(url: str) -> str:
    """``https://github.com/acme/widgets.git`` -> ``widgets``."""
    path = url.strip().rstrip("/")
    if path.endswith(".git"):
        path = path[:-4]
    return (re.split(r"[/:]", path)[-1] or "repository")[:180]


# --- teams ----------------------------------------------------------------------------------------


class TeamSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Team
        fields = ["id", "slug", "name"]


class TeamField(serializers.Field):
    """Shown as ``{id, slug, name}``; given as an id or a slug of a team the user belongs to."""

    def to_representation(self, value: Team) -> dict[str, Any]:
        return TeamSummarySerializer(value).data

    def to_internal_value(self, data: Any) -> Team:
        team = find_team(self.context["request"].user, data)
        if team is None:
            raise serializers.ValidationError(f"Unknown team {data!r}.")
        return team


class TeamFieldExtension(OpenApiSerializerFieldExtension):
    target_class = TeamField

    def map_serializer_field(self, auto_schema, direction):
        if direction == "request":
            return {"oneOf": [{"type": "integer"}, {"type": "string"}], "description": "Team id or slug."}
        return auto_schema._map_serializer(TeamSummarySerializer, direction)


class TeamOwnedSerializer(serializers.ModelSerializer):
    """Repositories and environments: a unique name per team, and they never move between teams.

    The view decides the team of a new object (``context["team"]``), so permission errors come first.
    Related fields named in ``Meta.team_related`` offer only the object's team's rows: another team's id
    reads as unknown, like a missing one.
    """

    team = TeamField(required=False)
    serializer_field_mapping = {**serializers.ModelSerializer.serializer_field_mapping, **STRICT_TEXT_FIELDS}

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        names = getattr(self.Meta, "team_related", ())
        team = self.instance.team if isinstance(self.instance, self.Meta.model) else self.context.get("team")
        if names and team is not None:
            for name in names:
                field = getattr(fields[name], "child_relation", fields[name])  # many=True: the child
                field.queryset = field.queryset.model.objects.filter(team=team)
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        team = self.instance.team if self.instance else self.context["team"]
        given = attrs.pop("team", None)
        if given is not None and given.pk != team.pk:
            if self.instance:
                raise serializers.ValidationError({"team": ["Moving to another team is not supported."]})
            raise serializers.ValidationError({"team": ["Does not match the team of the request."]})
        name = attrs.get("name", self.instance.name if self.instance else None)
        model = self.Meta.model
        clash = model.objects.filter(team=team, name=name)
        if self.instance:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            noun = model._meta.verbose_name
            article = "An" if noun[:1] in "aeiou" else "A"
            raise serializers.ValidationError(
                {"name": [f"{article} {noun} named {name!r} already exists in team {team.slug!r}."]}
            )
        if not self.instance:
            attrs["team"] = team
        return attrs

    def save(self, **kwargs):
        try:
            with transaction.atomic():
                return super().save(**kwargs)
        except IntegrityError:  # lost a race with a concurrent request for the same name
            raise serializers.ValidationError(
                {"name": ["That name was just taken; choose another."]}
            ) from None


# --- repositories and environments -----------------------------------------------------------------


class RepositorySerializer(TeamOwnedSerializer):
    provider = serializers.ChoiceField(
        choices=Repository.Provider.choices, required=False, help_text="Default: derived from the URL."
    )

    class Meta:
        model = Repository
        fields = ["id", "team", "name", "url", "default_branch", "provider", "created"]
        read_only_fields = ["created"]
        validators: list = []  # the unique name per team is checked in validate(), with the team known

    def validate_url(self, value: str) -> str:
        return clean_clone_url(value)

    def validate_default_branch(self, value: str) -> str:
        value = clean_branch(value)
        if not value:
            raise serializers.ValidationError("This field may not be blank.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if "url" in attrs and "provider" not in attrs:
            attrs["provider"] = Repository.provider_for(attrs["url"])
        return attrs


class SecretsField(serializers.Field):
    """Read: ``[{name, sandbox_visible, updated}]``, never a value. Write: ``{NAME: change}`` where a
    change is ``{"value": "...", "sandbox_visible": bool}`` (``value`` may be left out to re-flag an
    existing secret) or ``null`` to delete it. Secrets not named are left as they are."""

    def get_attribute(self, instance: Environment) -> Environment:
        return instance

    def to_representation(self, value: Environment) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "sandbox_visible": s.sandbox_visible, "updated": s.updated.isoformat()}
            for s in value.secrets.all()
        ]

    def to_internal_value(self, data: Any) -> dict[str, dict[str, Any] | None]:
        if not isinstance(data, dict):
            raise serializers.ValidationError(
                'Expected an object: {"NAME": {"value": "...", "sandbox_visible": true}}.'
            )
        errors: dict[str, list[str]] = {}
        changes: dict[str, dict[str, Any] | None] = {}
        for name, change in data.items():
            problem = None
            if not re.fullmatch(SECRET_NAME_RE, name) or len(name) > 100:
                problem = f"{name!r} is not a valid environment variable name."
            elif change is None:
                changes[name] = None
                continue
            elif not isinstance(change, dict) or set(change) - {"value", "sandbox_visible"}:
                problem = 'Expected {"value": "...", "sandbox_visible": true|false} or null to delete.'
            elif "value" in change and not isinstance(change["value"], str):
                problem = "The value must be a string."
            elif "value" in change and len(change["value"]) < MIN_SECRET_LENGTH:
                problem = (
                    f"The value is shorter than {MIN_SECRET_LENGTH} characters; it could not be told "
                    "apart from ordinary output, so it cannot be redacted."
                )
            elif "value" in change and len(change["value"].encode()) > MAX_SECRET_BYTES:
                problem = f"The value is larger than {MAX_SECRET_BYTES} bytes."
            elif "sandbox_visible" in change and not isinstance(change["sandbox_visible"], bool):
                problem = "sandbox_visible must be true or false."
            if problem:
                errors[name] = [problem]
            else:
                changes[name] = dict(change)
        if errors:
            raise serializers.ValidationError(errors)
        return changes


class SecretsFieldExtension(OpenApiSerializerFieldExtension):
    target_class = SecretsField

    def map_serializer_field(self, auto_schema, direction):
        if direction == "request":
            change = {
                "type": "object",
                "nullable": True,
                "properties": {"value": {"type": "string"}, "sandbox_visible": {"type": "boolean"}},
            }
            return {"type": "object", "additionalProperties": change}
        item = {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "sandbox_visible": {"type": "boolean"},
                "updated": {"type": "string", "format": "date-time"},
            },
        }
        return {"type": "array", "items": item}


class EnvironmentSerializer(TeamOwnedSerializer):
    secrets = SecretsField(
        required=False,
        help_text='Write {"NAME": {"value": "...", "sandbox_visible": false}} (null deletes); '
        "read back as names and flags only. Values are encrypted at rest and never returned.",
    )

    class Meta:
        model = Environment
        fields = [
            "id",
            "team",
            "name",
            "revision",
            "image",
            "setup_script",
            "env_vars",
            "sandbox_provider",
            "network_policy",
            "cpu_limit",
            "memory_mb",
            "timeout_seconds",
            "idle_ttl_seconds",
            "default_model",
            "default_profile",
            "secrets",
            "created",
            "updated",
        ]
        read_only_fields = ["revision", "created", "updated"]
        validators: list = []
        extra_kwargs = {
            "cpu_limit": {"min_value": 0.1},
            "memory_mb": {"min_value": 16},
            "timeout_seconds": {"min_value": 10},
            # A shell script: leading indentation and the final newline are part of it.
            "setup_script": {"trim_whitespace": False, "max_length": 64 * 1024},
        }

    def validate_env_vars(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("Expected an object of NAME: value strings.")
        for key, item in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise serializers.ValidationError(f"{key!r} is not a valid environment variable name.")
            if not isinstance(item, str):
                raise serializers.ValidationError(f"The value of {key} must be a string.")
            if "\x00" in item:  # neither jsonb nor a process environment can hold it
                raise serializers.ValidationError(f"The value of {key} contains a null character.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        env_vars = attrs.get("env_vars", self.instance.env_vars if self.instance else {})
        clash = sorted(set(env_vars) & {n for n, c in attrs.get("secrets", {}).items() if c is not None})
        if self.instance and "env_vars" in attrs:
            clash += sorted(
                set(attrs["env_vars"]) & set(self.instance.secrets.values_list("name", flat=True))
            )
        if clash:
            raise serializers.ValidationError(
                {"secrets": [f"{', '.join(sorted(set(clash)))}: also a plain variable in env_vars; use one."]}
            )
        if not self.instance:
            for name, change in attrs.get("secrets", {}).items():
                if change is not None and "value" not in change:
                    raise serializers.ValidationError({"secrets": {name: ["A new secret needs a value."]}})
        elif "secrets" in attrs:
            known = set(self.instance.secrets.values_list("name", flat=True))
            for name, change in attrs["secrets"].items():
                if change is not None and "value" not in change and name not in known:
                    raise serializers.ValidationError({"secrets": {name: ["A new secret needs a value."]}})
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Environment:
        changes = validated_data.pop("secrets", None)
        environment = super().create(validated_data)
        if changes:
            environment.change_secrets(changes, new_revision=False)
        return environment

    def update(self, instance: Environment, validated_data: dict[str, Any]) -> Environment:
        changes = validated_data.pop("secrets", None)
        environment = super().update(instance, validated_data)  # saved: already a new revision
        if changes:
            environment.change_secrets(changes, new_revision=False)
        return environment

    def validate_sandbox_provider(self, value: str) -> str:
        if value and value not in ("local", "docker"):
            raise serializers.ValidationError(
                f"Unknown sandbox provider {value!r}; use local, docker or leave empty."
            )
        return value

    def validate_default_model(self, value: str) -> str:
        return clean_model(value)

    def validate_default_profile(self, value):
        team = self.instance.team if self.instance else self.context["team"]
        if value is not None and value.team_id != team.pk:
            raise serializers.ValidationError(f"Unknown agent profile {value.pk} in team {team.slug!r}.")
        return value


# --- sessions ---------------------------------------------------------------------------------------


class RepositorySummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Repository
        fields = ["id", "name", "url"]


class EnvironmentSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Environment
        fields = ["id", "name"]


class ActiveRunSerializer(serializers.ModelSerializer):
    class Meta:
        model = Run
        fields = ["id", "status", "attempt"]


class SandboxSummarySerializer(serializers.ModelSerializer):
    isolated = serializers.BooleanField(
        help_text="False means the agent's commands run on the worker host without isolation."
    )

    class Meta:
        model = Sandbox
        fields = ["provider", "isolated", "isolation_note", "status"]


class ChildSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Session
        fields = ["id", "title", "status", "cost_usd"]


class SessionSerializer(serializers.ModelSerializer):
    """The session as the API shows it. Use with ``views.session_queryset()`` to avoid N+1 queries."""

    team = TeamSummarySerializer(read_only=True)
    repository = RepositorySummarySerializer(read_only=True)
    environment = EnvironmentSummarySerializer(read_only=True, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    active_run = serializers.SerializerMethodField()
    pending_messages = serializers.SerializerMethodField()
    sandbox = serializers.SerializerMethodField()
    queue_position = serializers.SerializerMethodField(
        help_text="For a queued session of a team with a concurrency limit: its place among the "
        "team's queued runs (1 = starts next). Null otherwise."
    )
    thread = serializers.CharField(
        source="thread_label", read_only=True, help_text="The external thread it is bound to, or empty."
    )
    profile = serializers.IntegerField(
        source="profile_id", read_only=True, allow_null=True, help_text="The agent profile's id, or null."
    )
    parent = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True, help_text="The session whose agent spawned this one, or null."
    )
    children = serializers.SerializerMethodField(help_text="Child sessions its agent spawned, oldest first.")
    # A URLField's schema says format uri, which "" (no pull request yet) is not.
    pull_request_url = serializers.CharField(
        read_only=True, help_text="The pull request opened for the session's branch; empty until then."
    )

    class Meta:
        model = Session
        fields = [
            "id",
            "team",
            "title",
            "status",
            "source",
            "external_ref",
            "thread",
            "repository",
            "base_branch",
            "branch",
            "environment",
            "environment_revision",
            "model",
            "profile",
            "summary",
            "error",
            "pull_request_url",
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "cost_usd",
            "budget_usd",
            "created",
            "updated",
            "finished",
            "created_by",
            "active_run",
            "pending_messages",
            "sandbox",
            "queue_position",
            "parent",
            "depth",
            "children",
            "children_cost_usd",
        ]
        read_only_fields = fields

    @extend_schema_field(ChildSummarySerializer(many=True))
    def get_children(self, obj: Session) -> list[dict[str, Any]]:
        children = obj.child_list if hasattr(obj, "child_list") else obj.children.order_by("pk")
        serializer = _shared(ChildSummarySerializer)
        return [serializer.to_representation(child) for child in children]

    @extend_schema_field(ActiveRunSerializer(allow_null=True))
    def get_active_run(self, obj: Session) -> dict[str, Any] | None:
        runs = obj.active_runs if hasattr(obj, "active_runs") else [obj.active_run]
        run = runs[0] if runs else None
        return _shared(ActiveRunSerializer).to_representation(run) if run else None

    @extend_schema_field(serializers.IntegerField())
    def get_pending_messages(self, obj: Session) -> int:
        if hasattr(obj, "pending_message_count"):
            return obj.pending_message_count
        return obj.messages.filter(status=Message.Status.PENDING).count()

    @extend_schema_field(serializers.IntegerField(allow_null=True, min_value=1))
    def get_queue_position(self, obj: Session) -> int | None:
        from sessions.limits import queue_position

        return queue_position(obj)

    @extend_schema_field(SandboxSummarySerializer(allow_null=True))
    def get_sandbox(self, obj: Session) -> dict[str, Any] | None:
        if hasattr(obj, "latest_sandboxes"):
            sandbox = obj.latest_sandboxes[0] if obj.latest_sandboxes else None
        else:
            sandbox = obj.sandboxes.order_by("-created", "-pk").first()
        return _shared(SandboxSummarySerializer).to_representation(sandbox) if sandbox else None


_SHARED: dict[type, serializers.Serializer] = {}


def _shared(cls: type[serializers.Serializer]) -> serializers.Serializer:
    """One instance per serializer class for read-only representations without context.

    A ModelSerializer builds its fields (and its nested serializers' fields) once per instance,
    which costs more than the representation itself; to_representation keeps no per-object state,
    so one instance serves every object and thread. (Two threads building it at once is harmless.)
    """
    serializer = _SHARED.get(cls)
    if serializer is None:
        serializer = cls()
        serializer.fields  # noqa: B018 - built once, here
        _SHARED[cls] = serializer
    return serializer


class CopiedFields:
    """A serializer whose fields are shallow copies of unbound ones made once per class.

    DRF deep-copies the declared fields for every instance, which re-runs each field's
    ``__init__`` (its validators, messages): ~0.6 ms of a session POST here. A shallow copy shares
    only what the field set up at init and never changes (validators, error messages, choices);
    ``bind`` then sets the copy's name and parent, so each instance's fields still see its own
    context. Only for plain fields: a nested serializer's copy would share its bound fields.
    """

    def get_fields(self) -> dict[str, serializers.Field]:
        cls = type(self)
        prototypes = cls.__dict__.get("_field_prototypes")
        if prototypes is None:
            prototypes = copy.deepcopy(self._declared_fields)
            if any(isinstance(f, serializers.BaseSerializer) for f in prototypes.values()):
                raise TypeError(f"{cls.__name__}: CopiedFields cannot copy nested serializers")
            cls._field_prototypes = prototypes  # two threads making it at once is harmless
        return {name: copy.copy(field) for name, field in prototypes.items()}


def session_data(session: Session) -> ReturnDict:
    """``SessionSerializer(session).data`` (what GET /api/v1/sessions/<id> shows), with its fields
    built once per process rather than per request. The serializer uses no context."""
    serializer = _shared(SessionSerializer)
    return ReturnDict(serializer.to_representation(session), serializer=serializer)


class SessionCreateSerializer(CopiedFields, serializers.Serializer):
    """``context["team"]`` is decided by the view before validation (so a viewer gets 403 first)."""

    team = TeamRefField(
        required=False, allow_blank=True, help_text="Team id or slug; optional with one writable team."
    )
    repository = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_ID, help_text="Repository id."
    )
    repository_url = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=1000,
        help_text="Instead of repository: found or created in the team by URL. https://, ssh://, git:// or "
        "user@host:path to a public address (or one in DEPUTIES_REPOSITORY_ALLOWED_NETWORKS), or a path under "
        "DEPUTIES_LOCAL_REPOSITORY_ROOTS where local repositories are allowed.",
    )
    prompt = StrictCharField(allow_blank=True, trim_whitespace=False)
    base_branch = StrictCharField(required=False, allow_blank=True, max_length=200)
    environment = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_ID, help_text="Environment id."
    )
    model = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=200,
        help_text="provider/model; default: the agent profile's, the environment's, then DEPUTIES_DEFAULT_MODEL.",
    )
    title = StrictCharField(required=False, allow_blank=True, max_length=200)
    budget_usd = serializers.DecimalField(
        required=False,
        allow_null=True,
        max_digits=12,
        decimal_places=2,
        min_value=Decimal("0.01"),
        help_text="Model spend this session may reach over all its runs; default: the agent profile's, "
        "then DEPUTIES_SESSION_BUDGET_USD.",
    )
    profile = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=100,
        help_text="Agent profile id or name; default: the environment's default profile, then the team's.",
    )

    @property
    def target_team(self) -> Team:
        return self.context["team"]

    def validate_prompt(self, value: str) -> str:
        if problem := text_problem(value, "prompt"):
            raise serializers.ValidationError(problem)
        return value.strip()

    def _checked(self, name: str, pk: int):
        """The object the view already read for this request (``SessionViewSet._writable_repository``)."""
        found = self.context.get(name)
        if found is not None and found.pk == pk and found.team_id == self.target_team.pk:
            return found
        return None

    def validate_repository(self, value: int | None) -> Repository | None:
        if value is None:
            return None
        repository = (
            self._checked("repository", value) or self.target_team.repositories.filter(pk=value).first()
        )
        if repository is None:
            # The same words whether it is missing or another team's: existence does not leak.
            raise serializers.ValidationError(
                f"Unknown repository {value} in team {self.target_team.slug!r}."
            )
        return repository

    def validate_repository_url(self, value: str) -> str:
        return clean_clone_url(value) if value.strip() else ""

    def validate_environment(self, value: int | None) -> Environment | None:
        if value is None:
            return None
        environment = (
            self._checked("environment", value) or self.target_team.environments.filter(pk=value).first()
        )
        if environment is None:
            raise serializers.ValidationError(
                f"Unknown environment {value} in team {self.target_team.slug!r}."
            )
        return environment

    def validate_base_branch(self, value: str) -> str:
        return clean_branch(value)

    def validate_profile(self, value: str):
        value = value.strip()
        if not value:
            return None
        profiles = self.target_team.agent_profiles
        profile = (profiles.filter(pk=int(value)) if value.isdigit() else profiles.filter(name=value)).first()
        if profile is None:
            raise serializers.ValidationError(
                f"Unknown agent profile {value!r} in team {self.target_team.slug!r}."
            )
        return profile

    def validate_model(self, value: str) -> str:
        value = value.strip()
        if value and (problem := model_problem(value)):
            raise serializers.ValidationError(problem)
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        repository, url = attrs.get("repository"), attrs.get("repository_url")
        if repository and url:
            raise serializers.ValidationError(
                {"repository": ["Give either repository or repository_url, not both."]}
            )
        if not repository and not url:
            raise serializers.ValidationError(
                {"repository": ["This field is required (or give repository_url)."]}
            )
        environment = attrs.get("environment")
        from sessions.agent.profiles import default_profile

        profile = attrs.get("profile") or default_profile(self.target_team, environment)
        attrs["profile"] = profile
        model = session_model(attrs.get("model", ""), profile, environment)
        if not model:
            providers = ", ".join(sorted(settings.LLM_PROVIDERS)) or "none"
            raise serializers.ValidationError(
                {
                    "model": [
                        f"No model given and no default is configured; configured providers: {providers}."
                    ]
                }
            )
        if problem := model_problem(model):
            source = "" if attrs.get("model") else "The default model: "
            raise serializers.ValidationError({"model": [source + problem]})
        attrs["model"] = model
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Session:
        user = self.context["request"].user
        with transaction.atomic(savepoint=False):
            repository = validated_data.get("repository") or self._repository_for_url(
                validated_data["repository_url"]
            )
            return start_session(
                team=self.target_team,
                repository=repository,
                prompt=validated_data["prompt"],
                model=validated_data["model"],
                created_by=user,
                base_branch=validated_data.get("base_branch", ""),
                environment=validated_data.get("environment"),
                title=validated_data.get("title", ""),
                source=Source.API,
                budget_usd=validated_data.get("budget_usd"),
                profile=validated_data.get("profile"),
            )

    def _repository_for_url(self, url: str) -> Repository:
        return repository_for_url(self.target_team, url)


def repository_for_url(team: Team, url: str) -> Repository:
    """The team's repository with this (validated) clone URL, created when there is none. Every
    way work names a repository by URL (this API, webhooks) goes through here. Caller holds a
    transaction."""
    # Serialize per team so two requests for one new URL make one repository.
    Team.objects.select_for_update().filter(pk=team.pk).first()
    existing = team.repositories.filter(url=url).order_by("pk").first()
    if existing is not None:
        return existing
    base = repository_name_for(url)
    taken = set(team.repositories.filter(name__startswith=base).values_list("name", flat=True))
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return Repository.objects.create(team=team, name=name, url=url, provider=Repository.provider_for(url))


class MessageCreateSerializer(CopiedFields, serializers.Serializer):
    content = StrictCharField(allow_blank=True, trim_whitespace=False)
    steer = serializers.BooleanField(
        default=False,
        help_text="Deliver it to the running agent before its next model call instead of queueing it "
        "for the next run. Without an active run it starts one, like any follow-up.",
    )

    def validate_content(self, value: str) -> str:
        if problem := text_problem(value, "message"):
            raise serializers.ValidationError(problem)
        return value.strip()


class MessageUpdateSerializer(serializers.Serializer):
    content = StrictCharField(allow_blank=True, trim_whitespace=False)

    validate_content = MessageCreateSerializer.validate_content


class MessageCreatedSerializer(serializers.ModelSerializer):
    queued_behind_active_run = serializers.BooleanField(
        help_text="True when a run is in progress: the message waits and the next run picks it up "
        "(a steer message goes to that run instead)."
    )

    class Meta:
        model = Message
        fields = ["id", "position", "status", "steer", "queued_behind_active_run"]


class MessageSerializer(serializers.ModelSerializer):
    author = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Message
        fields = ["id", "position", "content", "status", "steer", "run", "author", "created"]
        read_only_fields = fields


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["seq", "type", "payload", "created", "run"]


class EventPageSerializer(serializers.Serializer):
    events = EventSerializer(many=True)
    next_after = serializers.IntegerField(help_text="Pass as ?after= to get the events that follow.")


class ArtifactSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = [
            "id",
            "session",
            "run",
            "kind",
            "name",
            "content_type",
            "size",
            "sha256",
            "created",
            "download_url",
        ]

    def get_download_url(self, obj: Artifact) -> str:
        return reverse("api-artifact-download", args=[obj.pk], request=self.context.get("request"))
