"""Repository URLs: refused at every way in unless the rules allow them, and again in the worker.

Nothing here connects anywhere but loopback: refused addresses are literal IPs (no DNS), and an
audit hook shows that no connection, name lookup or git process happened for them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from django_q.models import OrmQ

from deputies.netguard import UnsafeAddress, check_git_remote, parse_git_remote, parse_networks
from deputies.paths import realpath
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Repository, Run, Session, start_session
from sessions.repository_urls import CheckedRepository, RepositoryRefused, check_repository_url
from sessions.runner import StepFailed, execute, git, repository_source
from tests.conftest import client_for, make_git_repo
from tests.gitserver import GitHTTPServer
from tests.live import ROOT, child_env, wait_for, worker_process

SESSIONS = "/api/v1/sessions"
REPOSITORIES = "/api/v1/repositories"
DONE = {"responses": [{"content": "Nothing to do."}]}
LOOPBACK = parse_networks("127.0.0.0/8", "T")

# --- what this process does on the network -------------------------------------------------------

_recorders: list[list[tuple[str, tuple]]] = []


def _audit(event: str, args: tuple) -> None:
    if _recorders and event in ("socket.connect", "socket.getaddrinfo", "subprocess.Popen"):
        _recorders[-1].append((event, args))


sys.addaudithook(_audit)  # hooks cannot be removed; it records only inside `outbound()`


@contextmanager
def outbound():
    """Connections, name lookups and processes started by this process while the block runs."""
    seen: list[tuple[str, tuple]] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def git_processes(seen) -> list:
    return [args[1] for event, args in seen if event == "subprocess.Popen" and list(args[1])[:1] == ["git"]]


def touched(seen, host: str) -> list:
    """Connections to or lookups of ``host``."""
    found = []
    for event, args in seen:
        if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] == host:
            found.append(args[1])
        if event == "socket.getaddrinfo" and args[0] == host:
            found.append(args[0])
    return found


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


# --- every listed URL is refused at submit time -----------------------------------------------------

REFUSED = [
    ("file:///etc", "not under a local repository root"),
    ("/etc", "not under a local repository root"),
    ("/proc/self", "not under a local repository root"),
    ("/dev/zero", "not under a local repository root"),
    ("/repo/../../../etc", "not under a local repository root"),
    ("ssh://-oProxyCommand=id/repo.git", "looks like a command-line option"),
    ("http://169.254.169.254/latest/", "cloud metadata address"),
    ("ext::sh -c id", "transport::address"),
    ("ssh://h/x y", "spaces"),
    ("ext::id", "transport::address"),
    ("https://user:token@127.0.0.1/x.git", "password"),
    ("git@-oProxyCommand=id:x", "command-line option"),
    ("https://10.0.0.1/x.git", "private address"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED, ids=[u for u, _ in REFUSED])
def test_it_refuses_a_session_on_an_unsafe_repository_url(
    url, words, owner, django_capture_on_commit_callbacks
):
    with outbound() as seen, django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).post(
            SESSIONS, {"repository_url": url, "prompt": "Go", "model": "scripted/demo"}, format="json"
        )
    assert response.status_code == 400, response.json()
    errors = response.json()["errors"]
    assert list(errors) == ["repository_url"]
    assert words in errors["repository_url"][0]
    assert not Repository.objects.exists() and not Session.objects.exists()
    assert not OrmQ.objects.exists()  # nothing queued
    assert seen == []  # no connection, no name lookup, no git


@pytest.mark.parametrize(("url", "words"), REFUSED, ids=[u for u, _ in REFUSED])
def test_it_refuses_an_unsafe_repository_naming_the_url_field(url, words, owner, repository):
    client = client_for(owner)
    with outbound() as seen:
        created = client.post(REPOSITORIES, {"name": "bad", "url": url}, format="json")
        moved = client.patch(f"{REPOSITORIES}/{repository.pk}", {"url": url}, format="json")
    for response in (created, moved):
        assert response.status_code == 400
        assert words in response.json()["errors"]["url"][0]
    assert list(Repository.objects.values_list("url", flat=True)) == [repository.url]
    assert seen == []


def test_it_refuses_them_on_the_new_session_page_at_the_field(owner, repository):
    client = Client()
    client.force_login(owner)
    response = client.post(
        reverse("session-new"), {"repository_url": "/proc/self", "prompt": "Go", "model": "scripted/demo"}
    )
    assert response.status_code == 400
    html = response.content.decode()
    marker = 'id="id_repository_url_error">'
    assert "not under a local repository root" in html[html.index(marker) :].split("</div>")[0]
    assert not Session.objects.exists()


def test_it_refuses_them_in_the_admin_at_the_field(django_user_model, team):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    url = reverse("admin:agent_sessions_repository_add")
    form = {"team": team.pk, "name": "etc", "default_branch": "main", "provider": "local"}
    response = client.post(url, {**form, "url": "/repo/../../../etc"})
    assert response.status_code == 200
    assert "not under a local repository root" in response.content.decode()
    assert not Repository.objects.exists()


# --- local paths ------------------------------------------------------------------------------------


@pytest.fixture
def roots(settings, tmp_path) -> Path:
    root = tmp_path / "roots"
    root.mkdir()
    settings.LOCAL_REPOSITORY_ROOTS = (root.resolve(),)
    return root


def test_it_accepts_a_git_repository_under_a_root_by_its_resolved_path(owner, roots):
    repo = make_git_repo(roots / "widgets")
    (roots / "link").symlink_to(repo)
    for given in (str(roots / "link"), f"file://{roots}/widgets", f"{roots}/x/../widgets"):
        checked = check_repository_url(given)
        assert (checked.url, checked.local) == (str(repo.resolve()), True)
    response = client_for(owner).post(REPOSITORIES, {"name": "w", "url": f"{roots}/link/"}, format="json")
    assert response.status_code == 201, response.json()
    assert (response.json()["url"], response.json()["provider"]) == (str(repo.resolve()), "local")


def test_it_refuses_a_repository_outside_the_roots(roots, tmp_path):
    elsewhere = make_git_repo(tmp_path / "elsewhere")
    with pytest.raises(RepositoryRefused, match=r"not under a local repository root \(.*roots\)"):
        check_repository_url(str(elsewhere))


def test_it_refuses_a_symlink_that_escapes_the_roots(roots, tmp_path):
    elsewhere = make_git_repo(tmp_path / "elsewhere")
    (roots / "escape").symlink_to(elsewhere)
    with pytest.raises(RepositoryRefused, match="a link to .*elsewhere"):
        check_repository_url(str(roots / "escape"))
    # A repository under the root whose git data lives elsewhere is refused as well.
    inside = roots / "inside"
    inside.mkdir()
    (inside / ".git").symlink_to(elsewhere / ".git")
    with pytest.raises(RepositoryRefused, match="git data outside"):
        check_repository_url(str(inside))


def test_it_resolves_paths_as_os_path_realpath_does(roots, tmp_path):
    # The check asks the kernel for a path's resolved name (repository_urls.realpath); it must be
    # os.path.realpath's answer, links, "..", missing parts and links to links included.
    repo = make_git_repo(roots / "widgets")
    (roots / "link").symlink_to(repo)
    (roots / "chain").symlink_to(roots / "link")
    (roots / "up").symlink_to("..")
    (roots / "dangling").symlink_to(tmp_path / "nowhere")
    for given in ("link", "chain", "chain/.git", "up/roots/widgets", "link/../widgets", "widgets/.",
                  "dangling", "dangling/x", "missing/..", "chain/missing"):  # fmt: skip
        path = f"{roots}/{given}"
        assert realpath(path) == os.path.realpath(path), given


def test_it_refuses_a_checked_repository_once_a_link_out_replaces_it(roots, tmp_path):
    repo = make_git_repo(roots / "widgets")
    assert check_repository_url(str(repo)).url == str(repo.resolve())
    elsewhere = make_git_repo(tmp_path / "elsewhere")
    os.rename(repo, tmp_path / "moved")
    repo.symlink_to(elsewhere)
    with pytest.raises(RepositoryRefused, match="a link to .*elsewhere"):
        check_repository_url(str(repo))
    repo.unlink()
    (roots / "widgets").mkdir()
    (roots / "widgets" / ".git").symlink_to(elsewhere / ".git")
    with pytest.raises(RepositoryRefused, match="git data outside"):
        check_repository_url(str(repo))


def test_it_refuses_directories_that_are_not_repositories_and_deputies_own_data(settings, roots):
    (roots / "plain").mkdir()
    with pytest.raises(RepositoryRefused, match="not a git repository"):
        check_repository_url(str(roots / "plain"))
    with pytest.raises(RepositoryRefused, match="not a directory"):
        check_repository_url(str(roots / "missing"))
    settings.SANDBOX_ROOT = roots / "sandboxes"
    workspace = make_git_repo(roots / "sandboxes" / "s1-other-team")
    with pytest.raises(RepositoryRefused, match="Deputies' own data"):
        check_repository_url(str(workspace))


def test_it_refuses_local_paths_when_they_are_switched_off(settings, owner, sample_repo):
    settings.ALLOW_LOCAL_REPOSITORIES = False
    response = client_for(owner).post(REPOSITORIES, {"name": "s", "url": str(sample_repo)}, format="json")
    assert response.status_code == 400
    assert "DEPUTIES_ALLOW_LOCAL_REPOSITORIES" in response.json()["errors"]["url"][0]
    with pytest.raises(RepositoryRefused, match="absolute path"):
        check_repository_url("./relative")


def defaults(**env: str) -> dict:
    code = (
        "import json; from django.conf import settings as s; print(json.dumps([s.SIMPLE_MODE, "
        "s.ALLOW_LOCAL_REPOSITORIES, [str(p) for p in s.LOCAL_REPOSITORY_ROOTS]]))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEPUTIES_", "DATABASE_URL"))}
    clean.update(DJANGO_SETTINGS_MODULE="deputies.settings", **env)
    out = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        env=clean, cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_it_allows_local_repositories_by_default_only_in_simple_mode(tmp_path):
    data = tmp_path / "var"
    simple = defaults(DEPUTIES_DATA_DIR=str(data))
    assert simple == [True, True, [str(data.resolve() / "sample-repo"), str(data.resolve() / "repositories")]]
    postgres = defaults(DEPUTIES_DATA_DIR=str(data), DATABASE_URL="postgres://u@127.0.0.1:5432/x")
    assert postgres[:2] == [False, False]


# --- remote URLs ------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path, sample_repo):
    (tmp_path / "served").mkdir()
    with GitHTTPServer(tmp_path / "served") as server:
        server.publish(sample_repo, "sample.git")
        yield server


def test_it_refuses_a_loopback_remote_by_default_without_connecting(served, owner):
    response = client_for(owner).post(
        SESSIONS, {"repository_url": served.url("sample.git"), "prompt": "Go", "model": "scripted/demo"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400
    message = response.json()["errors"]["repository_url"][0]
    assert "loopback address" in message and "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS" in message
    assert served.hits == []


def test_it_accepts_plain_http_only_inside_the_allowed_networks(loopback_remotes):
    check_repository_url("http://127.0.0.1:9/x.git")
    # Only classified, never connected to (literal addresses, no DNS).
    with outbound() as seen:
        with pytest.raises(RepositoryRefused, match="Plain http is accepted only for hosts inside"):
            check_repository_url("http://93.184.216.34/x.git")
        assert check_repository_url("https://93.184.216.34/x.git").scheme == "https"
        assert check_repository_url("git@93.184.216.34:acme/x.git").scheme == "ssh"
        assert check_repository_url("git://93.184.216.34/x.git").scheme == "git"
    assert seen == []


def test_it_clones_over_http_from_an_allowed_loopback_server_in_a_run(
    run_settings, loopback_remotes, served, owner, sample_repo, django_capture_on_commit_callbacks
):
    url = served.url("sample.git")
    with start_in_thread(DONE) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": ""}
        }
        response = client_for(owner).post(
            SESSIONS, {"repository_url": url, "prompt": "Go", "model": "scripted/demo"}, format="json"
        )
        assert response.status_code == 201, response.json()
        session = Session.objects.get(pk=response.json()["id"])
        assert session.repository.url == url and session.repository.provider == "git"
        assert execute(session.runs.get().pk) == "completed", session.runs.get().error
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=sample_repo, capture_output=True, text=True)
    ready = Event.objects.get(session=session, type="repository_ready")
    assert ready.payload["commit"] == head.stdout.strip()
    assert any("git-upload-pack" in hit for hit in served.hits)  # the real protocol, over HTTP


def run_on(team, owner, url: str) -> Run:
    """A run on a repository row written directly, as rows from before the rules were."""
    repository = Repository.objects.create(team=team, name="old", url=url, provider="git")
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    execute(session.runs.get().pk)
    return session.runs.get()


def test_it_refuses_a_stored_repository_the_rules_now_refuse_before_git_runs(
    run_settings, served, team, owner
):
    run = run_on(team, owner, served.url("sample.git"))
    assert run.status == Run.Status.FAILED
    assert "is refused" in run.error and "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS" in run.error
    assert Event.objects.filter(run=run, type="run_failed", payload__error=run.error).exists()
    assert served.hits == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/", "/etc", "file:///proc/self"])
def test_it_never_starts_git_on_a_stored_unsafe_repository(run_settings, team, owner, url):
    with outbound() as seen:
        run = run_on(team, owner, url)
    assert run.status == Run.Status.FAILED and "is refused" in run.error
    assert git_processes(seen) == []
    assert touched(seen, "169.254.169.254") == []


# --- git itself -------------------------------------------------------------------------------------


def test_git_reaches_no_repository_without_a_checked_source(served, loopback_remotes):
    with pytest.raises(StepFailed, match="transport 'http' not allowed"):
        git("ls-remote", "--", served.url("sample.git"))
    assert served.hits == []
    source = repository_source(served.url("sample.git"))
    assert "refs/heads/main" in git("ls-remote", "--", source.url, source=source)
    # A checked source opens its own transport only.
    with pytest.raises(StepFailed, match="transport 'ext' not allowed"):
        git("ls-remote", "--", "ext::git-upload-pack", source=source)
    with pytest.raises(StepFailed, match="transport 'file' not allowed"):
        git("ls-remote", "--", f"file://{served.root / 'sample.git'}", source=source)


def test_it_pins_git_http_to_the_addresses_it_checked(tmp_path, sample_repo):
    """``localhost`` resolves to 127.0.0.1 here; git connects where the check said, 127.0.0.2."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with GitHTTPServer(tmp_path / "a", "127.0.0.1") as first:
        with GitHTTPServer(tmp_path / "b", "127.0.0.2", first.port) as second:
            for server in (first, second):
                server.publish(sample_repo, "sample.git")
            url = f"http://localhost:{first.port}/sample.git"
            pinned = CheckedRepository(
                url=url, scheme="http", host="localhost", port=first.port,
                addresses=(ipaddress.ip_address("127.0.0.2"),), pin=True,
            )  # fmt: skip
            assert "refs/heads/main" in git("ls-remote", "--", url, source=pinned)
    assert first.hits == [] and second.hits


def test_it_pins_only_names_and_never_follows_redirects(loopback_remotes):
    literal = check_repository_url("http://127.0.0.1:8080/x.git")
    assert literal.git_config() == [
        "protocol.allow=never",
        "protocol.http.allow=always",
        "http.followRedirects=false",
    ]
    local = CheckedRepository(url="/srv/x", scheme="file")
    assert local.git_config() == ["protocol.allow=never", "protocol.file.allow=always"]


# --- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("git@github.com:acme/widgets.git", "ssh", "github.com", 22),
        ("github.com:acme/widgets", "ssh", "github.com", 22),
        ("ssh://git@[::1]:2222/x.git", "ssh", "::1", 2222),
        ("https://GitHub.com/acme/widgets.git", "https", "github.com", 443),
        ("git://127.0.0.1/x.git", "git", "127.0.0.1", 9418),
    ],
)
def test_it_reads_remotes_as_git_does(url, scheme, host, port):
    remote = parse_git_remote(url)
    assert (remote.scheme, remote.host, remote.connect_port) == (scheme, host, port)


@pytest.mark.parametrize(
    "url",
    [
        "https://a@b@127.0.0.1/x",
        "https://127.0.0.1\\@10.0.0.1/x",
        "https://-h/x",
        "https://h%2f/x",
        "https://h/",
        "host:-x",
        "ftp://127.0.0.1/x",
        "file:///etc",
    ],
)
def test_it_refuses_remotes_git_might_read_differently(url):
    with pytest.raises(UnsafeAddress):
        check_git_remote(url, allowed=LOOPBACK)


def test_it_derives_the_github_provider_from_the_host_alone():
    assert Repository.provider_for("git@github.com:acme/widgets.git") == "github"
    assert Repository.provider_for("https://github.com/acme/widgets.git") == "github"
    assert Repository.provider_for("https://evil.example/github.com/x.git") == "git"
    assert Repository.provider_for("/srv/x") == "local"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
def test_a_worker_process_applies_the_rules_it_is_configured_with(
    settings, allowed, served, tmp_path, team, owner
):
    if allowed:
        settings.REPOSITORY_ALLOWED_NETWORKS = LOOPBACK  # tests/live.py hands it to the worker
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    repository = Repository.objects.create(
        team=team, name="served", url=served.url("sample.git"), provider="git"
    )
    with start_in_thread(DONE) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        )
        with worker_process(env):
            session = start_session(
                team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
            )
            run = wait_for(
                lambda: Run.objects.filter(session=session, status__in=["completed", "failed"]).first(),
                timeout=60,
                what="the run to end",
            )
    if allowed:
        assert run.status == Run.Status.COMPLETED, run.error
        assert any("git-upload-pack" in hit for hit in served.hits)
    else:
        assert run.status == Run.Status.FAILED and "loopback address" in run.error
        assert served.hits == []
