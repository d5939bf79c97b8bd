"""REST API v1. Views validate, call one model method, serialize; they never touch sandboxes or LLMs.

Team scoping is done by querysets (someone else's object is a 404) and ``TeamWritePermission``
(a viewer's write is a 403).
"""

from __future__ import annotations

import json
from typing import Any

from django.db.models import Count, Exists, OuterRef, Prefetch, Q, QuerySet
from django.http import FileResponse, HttpResponseRedirect
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, renderers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes.models import Sandbox
from sessions.api import serializers as s
from sessions.api.errors import Conflict, StorageUnavailable
from sessions.api.permissions import (
    MAX_ID,
    TeamWritePermission,
    as_id,
    read_only_denial,
    readable_teams,
    request_body,
    team_for_write,
)
from sessions.api.schema import bounded_int
from sessions.columns import Columns, prepared_cursor
from sessions.limits import queue_position_sql
from sessions.models import (
    WRITE_ROLES,
    Artifact,
    Environment,
    Membership,
    Message,
    Repository,
    Run,
    Session,
    SessionStatus,
    Source,
    Team,
)
from sessions.storage import ArtifactStorageError, download_url

EVENTS_DEFAULT_LIMIT = 200
EVENTS_MAX_LIMIT = 1000


def session_queryset() -> QuerySet[Session]:
    """Sessions with what SessionSerializer shows, in a fixed number of queries."""
    return (
        Session.objects.select_related("team", "repository", "environment", "created_by")
        .annotate(pending_message_count=Count("messages", filter=Q(messages__status=Message.Status.PENDING)))
        .annotate(queue_place=queue_position_sql())
        .prefetch_related(
            Prefetch("runs", queryset=Run.objects.filter(status__in=Run.ACTIVE), to_attr="active_runs"),
            Prefetch(
                "sandboxes", queryset=Sandbox.objects.order_by("-created", "-pk"), to_attr="latest_sandboxes"
            ),
            Prefetch(
                "children",
                queryset=Session.objects.only("pk", "parent_id", "title", "status", "cost_usd").order_by(
                    "pk"
                ),
                to_attr="child_list",
            ),
        )
        .order_by("-created", "-pk")
    )


class RepositoryCheck:
    """The repository, its team, the environment (when given and in that team) and the user's
    role there, in one precompiled statement (an ORM query would spend longer compiling it than
    Postgres spends running it)."""

    def __init__(self) -> None:
        self.team = Columns(Team, "t")
        self.repository = Columns(Repository, "r")
        self.environment = Columns(Environment, "e")
        self.sql = (
            f"SELECT {self.team.sql}, {self.repository.sql}, {self.environment.sql}, m.role "
            f'FROM "{Repository._meta.db_table}" r '
            f'JOIN "{Team._meta.db_table}" t ON t.id = r.team_id '
            f'LEFT JOIN "{Environment._meta.db_table}" e ON e.id = %s AND e.team_id = r.team_id '
            f'LEFT JOIN "{Membership._meta.db_table}" m ON m.team_id = r.team_id AND m.user_id = %s '
            "WHERE r.id = %s"
        )

    def fetch(self, repository_id: int, environment_id: int, user_id: int):
        with prepared_cursor() as cursor:
            cursor.execute(self.sql, [environment_id, user_id, repository_id])
            row = cursor.fetchone()
        if row is None:
            return None
        a = len(self.team.names)
        b = a + len(self.repository.names)
        c = b + len(self.environment.names)
        team = self.team.build(row[:a])
        repository = self.repository.build(row[a:b])
        repository.team = team
        environment = self.environment.build(row[b:c]) if row[b] is not None else None
        if environment is not None:
            environment.team = team
        return team, repository, environment, row[c]


_REPOSITORY_CHECK = RepositoryCheck()


def query_int(request: Request, name: str, default: int | None, minimum: int, maximum: int | None = None):
    raw = request.query_params.get(name)
    if raw is None:  # "?after=" is not a number either: a 400, as the schema says
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: [f"Expected an integer, got {raw!r}."]}) from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValidationError({name: [f"Must be {bounds}, got {value}."]})
    return value


class TeamScopedMixin:
    """Only objects of the user's teams (all for staff); ``team_lookup`` says how to reach the team."""

    permission_classes = [IsAuthenticated, TeamWritePermission]
    lookup_value_regex = r"[0-9]{1,18}"  # anything else is the JSON 404 of an unknown path
    team_lookup = "team"
    request_team = None  # the team a create goes into, decided before validation

    def scope(self, queryset: QuerySet, team_lookup: str | None = None) -> QuerySet:
        user = self.request.user
        if user.is_staff:
            return queryset
        return queryset.filter(**{f"{team_lookup or self.team_lookup}__in": readable_teams(user)})

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        context["team"] = self.request_team
        return context


# --- sessions ---------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List sessions, newest first",
        parameters=[
            OpenApiParameter("status", str, enum=SessionStatus.values),
            OpenApiParameter("repository", bounded_int(1, MAX_ID), description="Repository id."),
            OpenApiParameter("source", str, enum=Source.values, description="Where the work came from."),
            OpenApiParameter("search", str, description="Text in the title or the messages."),
        ],
    ),
    retrieve=extend_schema(summary="A session with its active run and sandbox"),
)
@extend_schema(tags=["sessions"])
class SessionViewSet(
    TeamScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """A session is one piece of agent work on a repository: a prompt, follow-ups, runs and events."""

    serializer_class = s.SessionSerializer
    queryset = Session.objects.none()  # for the schema; get_queryset scopes by team
    throttle_scope = "sessions"  # creating one counts against DEPUTIES_API_RATE_SESSIONS too

    def get_queryset(self) -> QuerySet[Session]:
        if self.action in ("list", "retrieve"):
            return self.scope(session_queryset())
        return self.scope(Session.objects.all())

    def filter_queryset(self, queryset: QuerySet[Session]) -> QuerySet[Session]:
        if self.action != "list":
            return queryset
        params = self.request.query_params
        if status_ := params.get("status"):
            if status_ not in SessionStatus.values:
                raise ValidationError({"status": [f"Expected one of {', '.join(SessionStatus.values)}."]})
            queryset = queryset.filter(status=status_)
        if (repository := query_int(self.request, "repository", None, 1, MAX_ID)) is not None:
            queryset = queryset.filter(repository_id=repository)
        if source := params.get("source"):
            if source not in Source.values:
                raise ValidationError({"source": [f"Expected one of {', '.join(Source.values)}."]})
            queryset = queryset.filter(source=source)
        if search := params.get("search", "").strip():
            if "\x00" in search:  # Postgres text cannot hold it
                raise ValidationError({"search": ["Null characters are not allowed."]})
            in_messages = Message.objects.filter(session=OuterRef("pk"), content__icontains=search)
            queryset = queryset.filter(Q(title__icontains=search) | Exists(in_messages))
        return queryset

    def show(self, session: Session) -> dict[str, Any]:
        fresh = session_queryset().get(pk=session.pk)
        return s.SessionSerializer(fresh, context=self.get_serializer_context()).data

    @extend_schema(
        summary="Start a session",
        request=s.SessionCreateSerializer,
        responses={201: s.SessionSerializer},
    )
    def create(self, request: Request) -> Response:
        """On the dispatch path: the usual request (a repository id, no team) costs one query to
        check it (``_writable_repository``), the inserts, and no read-back (``tests/test_hot_paths.py``
        pins the count)."""
        data = request_body(request.data)
        context = self.get_serializer_context()
        found = self._writable_repository(data)
        if found is not None:
            self.request_team, context["repository"], context["environment"] = found
        else:
            self.request_team = team_for_write(
                request.user, data.get("team"), hint=self._team_of_repository(data.get("repository"))
            )
        context["team"] = self.request_team
        serializer = s.SessionCreateSerializer(data=data, context=context)
        serializer.is_valid(raise_exception=True)
        session = serializer.save()
        # start_session() fills in what session_queryset() would annotate: nothing to read back.
        return Response(s.session_data(session), status=status.HTTP_201_CREATED)

    def _writable_repository(self, data: Any) -> tuple[Team, Repository, Environment | None] | None:
        """The repository's team, the repository and the environment (when given and in that team),
        with the user's right to write there, in one query. ``None`` (rare: a team named, a
        repository given by URL or not visible) leaves it to the general path and its errors."""
        user = self.request.user
        if data.get("team") not in (None, "") or (repository_id := as_id(data.get("repository"))) is None:
            return None
        environment_id = as_id(data.get("environment"))
        found = _REPOSITORY_CHECK.fetch(repository_id, environment_id or 0, user.pk)
        if found is None:
            return None
        team, repository, environment, role = found
        if role is None and not user.is_staff:
            return None  # not visible: the general path answers as for any unknown id
        if not user.is_staff and role not in WRITE_ROLES:
            raise read_only_denial(team)
        return team, repository, environment

    def _team_of_repository(self, value: Any):
        """A new session goes to its repository's team unless the request names one."""
        if (pk := as_id(value)) is None:
            return None
        repository = self.scope_repositories().filter(pk=pk).select_related("team").first()
        return repository.team if repository else None

    def scope_repositories(self) -> QuerySet[Repository]:
        return self.scope(Repository.objects.all(), "team")

    @extend_schema(
        methods=["POST"],
        summary="Send a follow-up message (or steer the running agent with steer: true)",
        request=s.MessageCreateSerializer,
        responses={201: s.MessageCreatedSerializer, 409: OpenApiResponse(description="Session archived.")},
    )
    @extend_schema(
        methods=["GET"], summary="The session's messages", responses={200: s.MessageSerializer(many=True)}
    )
    @action(detail=True, methods=["get", "post"])
    def messages(self, request: Request, pk: str | None = None) -> Response:
        session = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(session.messages.select_related("author").order_by("position"))
            return self.get_paginated_response(s.MessageSerializer(page, many=True).data)
        serializer = s.MessageCreateSerializer(data=request_body(request.data))
        serializer.is_valid(raise_exception=True)
        if session.status == SessionStatus.ARCHIVED:
            raise Conflict("The session is archived; it takes no more messages.")
        data = serializer.validated_data
        message = session.add_message(data["content"], author=request.user, steer=data["steer"])
        active = session.active_run
        # add_message starts a run only when none is active: an older running run means we wait.
        message.queued_behind_active_run = bool(
            active and active.status == Run.Status.RUNNING and active.created <= message.created
        )
        return Response(s.MessageCreatedSerializer(message).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        methods=["PATCH"],
        summary="Edit a pending follow-up",
        request=s.MessageUpdateSerializer,
        responses={200: s.MessageSerializer, 409: OpenApiResponse(description="A run already picked it.")},
    )
    @extend_schema(
        methods=["DELETE"],
        summary="Cancel a pending follow-up",
        request=None,
        responses={200: s.MessageSerializer, 409: OpenApiResponse(description="A run already picked it.")},
    )
    @action(detail=True, methods=["patch", "delete"], url_path=r"messages/(?P<message_id>[0-9]{1,18})")
    def message(self, request: Request, pk: str | None = None, message_id: str = "") -> Response:
        session = self.get_object()
        message = session.messages.filter(pk=int(message_id)).first()
        if message is None:
            raise NotFound("No such message in this session.")
        if request.method == "PATCH":
            serializer = s.MessageUpdateSerializer(data=request_body(request.data))
            serializer.is_valid(raise_exception=True)
            changed = message.edit(serializer.validated_data["content"])
        elif message.position == 1:
            raise Conflict("The first prompt cannot be withdrawn; cancel the session instead.")
        else:
            changed = message.withdraw()
        if not changed:
            raise Conflict(f"The message is {message.status}: only a pending follow-up can be changed.")
        return Response(s.MessageSerializer(message).data)

    @extend_schema(
        summary="Cancel the session and its active run",
        request=None,
        responses={
            200: s.SessionSerializer,
            409: OpenApiResponse(description="Already cancelled or archived."),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        session = self.get_object()
        if not session.cancel():
            raise Conflict(f"The session is already {session.status}.")
        return Response(self.show(session))

    @extend_schema(
        summary="Events in order, for polling",
        parameters=[
            OpenApiParameter(
                "after",
                bounded_int(0, MAX_ID),
                description="Return events with seq greater than this (default 0).",
            ),
            OpenApiParameter(
                "limit",
                bounded_int(1, EVENTS_MAX_LIMIT),
                description=f"At most this many (default {EVENTS_DEFAULT_LIMIT}, max {EVENTS_MAX_LIMIT}).",
            ),
        ],
        responses={200: s.EventPageSerializer},
    )
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str | None = None) -> Response:
        after = query_int(request, "after", 0, 0, MAX_ID)
        limit = query_int(request, "limit", EVENTS_DEFAULT_LIMIT, 1, EVENTS_MAX_LIMIT)
        session = self.get_object()
        events = list(session.events.filter(seq__gt=after).order_by("seq")[:limit])
        return Response(
            {
                "events": s.EventSerializer(events, many=True).data,
                "next_after": events[-1].seq if events else after,
            }
        )

    @extend_schema(summary="Artifacts of the session", responses={200: s.ArtifactSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def artifacts(self, request: Request, pk: str | None = None) -> Response:
        session = self.get_object()
        queryset = session.artifacts.order_by("created", "pk")
        page = self.paginate_queryset(queryset)
        serializer = s.ArtifactSerializer(page, many=True, context=self.get_serializer_context())
        return self.get_paginated_response(serializer.data)


# --- artifacts --------------------------------------------------------------------------------------


class PassthroughRenderer(renderers.BaseRenderer):
    """Lets a download be negotiated for any Accept header; errors still come out as JSON."""

    media_type = "*/*"
    format = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, bytes):
            return data
        # Only errors get here (a download is a FileResponse): say they are JSON.
        if renderer_context and (response := renderer_context.get("response")) is not None:
            response["Content-Type"] = "application/json"
        return json.dumps(data).encode()


@extend_schema_view(retrieve=extend_schema(summary="Artifact metadata"))
@extend_schema(tags=["artifacts"])
class ArtifactViewSet(TeamScopedMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Files a session produced: the final diff, logs, exported files, long tool outputs."""

    serializer_class = s.ArtifactSerializer
    queryset = Artifact.objects.none()
    team_lookup = "session__team"

    def get_queryset(self) -> QuerySet[Artifact]:
        return self.scope(Artifact.objects.all())

    @extend_schema(
        summary="Download the artifact's bytes",
        description="Files on disk are streamed; with S3 storage the answer is a redirect to a presigned "
        "URL valid for DEPUTIES_S3_URL_TTL seconds.",
        responses={
            (200, "*/*"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="Redirect to a presigned URL in the bucket"),
            503: OpenApiResponse(description="The artifact store cannot sign a download link."),
        },
    )
    @action(
        detail=True,
        methods=["get"],
        renderer_classes=[renderers.JSONRenderer, PassthroughRenderer],
        url_name="download",
    )
    def download(self, request: Request, pk: str | None = None) -> FileResponse | HttpResponseRedirect:
        artifact = self.get_object()  # the team check: someone else's artifact is a 404, before any URL
        try:
            url = download_url(artifact)
        except ArtifactStorageError as exc:  # logged with the bucket and the reason, for operators
            raise StorageUnavailable("The artifact store cannot sign a download link; see /setup.") from exc
        if url is not None:
            return HttpResponseRedirect(url)
        try:
            handle = artifact.file.open("rb")
        except FileNotFoundError:
            raise NotFound("The artifact's bytes are missing from storage.") from None
        return FileResponse(
            handle,
            as_attachment=True,
            filename=artifact.name,
            content_type=artifact.content_type,
        )


# --- repositories and environments ------------------------------------------------------------------


class TeamOwnedViewSet(TeamScopedMixin, viewsets.ModelViewSet):
    """CRUD for objects that belong to one team; a create goes to the named or the only writable team."""

    model: type

    def get_queryset(self) -> QuerySet:
        return self.scope(self.model.objects.select_related("team").order_by("name", "pk"))

    def create(self, request: Request, *args, **kwargs) -> Response:
        self.request_team = team_for_write(request.user, request_body(request.data).get("team"))
        return super().create(request, *args, **kwargs)


@extend_schema_view(
    list=extend_schema(summary="List repositories"),
    create=extend_schema(summary="Add a repository"),
    destroy=extend_schema(
        summary="Delete a repository",
        responses={204: None, 409: OpenApiResponse(description="It still has sessions.")},
    ),
)
@extend_schema(tags=["repositories"])
class RepositoryViewSet(TeamOwnedViewSet):
    """Repositories sessions work on: clone URLs, or paths on the worker host."""

    model = Repository
    queryset = Repository.objects.none()
    serializer_class = s.RepositorySerializer

    def perform_destroy(self, instance: Repository) -> None:
        count = instance.sessions.count()
        if count:
            raise Conflict(
                f"Repository {instance.name!r} has {count} session(s); sessions keep their repository, "
                "so it cannot be deleted while they exist."
            )
        instance.delete()


@extend_schema_view(
    list=extend_schema(summary="List environments"),
    create=extend_schema(summary="Add an environment"),
    update=extend_schema(summary="Replace an environment (a new revision)"),
    partial_update=extend_schema(summary="Edit an environment (a new revision)"),
)
@extend_schema(tags=["environments"])
class EnvironmentViewSet(TeamOwnedViewSet):
    """Sandbox templates. Every edit makes a new revision; sessions record the one they ran with."""

    model = Environment
    queryset = Environment.objects.none()
    serializer_class = s.EnvironmentSerializer

    def get_queryset(self) -> QuerySet:
        return super().get_queryset().prefetch_related("secrets")
