"""Shared fixtures: a team with an owner, a teammate and a viewer, plus an outsider in another team."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from deputies.netguard import parse_networks
from sessions.models import Membership, Repository, Role, Team

SAMPLE_REPO = Path(__file__).resolve().parent.parent / "deputies" / "demo" / "sample_repo"


def make_git_repo(path: Path, source: Path = SAMPLE_REPO, branch: str = "main") -> Path:
    """A real git repository with one commit of ``source`` on ``branch``."""
    shutil.copytree(source, path)
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "PATH": "/usr/bin:/bin",
    }
    for argv in (
        ["git", "init", "-q", "-b", branch],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "initial"],
    ):
        subprocess.run(argv, cwd=path, check=True, env=env)
    return path


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def no_dns(settings):
    """User-given names resolve from /etc/hosts only: a DNS query would leave loopback (children
    get the same from tests/live.py child_env)."""
    settings.RESOLVE_NAMES = False


@pytest.fixture(autouse=True)
def local_repositories_under_tmp(settings, tmp_path_factory):
    """The suite's repositories are made under pytest's temporary directory: allow that one root
    (the suite runs on Postgres, where local repositories are off by default). tests/live.py hands
    the same rules to the processes it starts."""
    settings.ALLOW_LOCAL_REPOSITORIES = True
    settings.LOCAL_REPOSITORY_ROOTS = (tmp_path_factory.getbasetemp().resolve(),)
    settings.REPOSITORY_ALLOWED_NETWORKS = ()


@pytest.fixture
def loopback_remotes(settings):
    """Remote repositories on loopback accepted, as an operator opens a range on purpose."""
    settings.REPOSITORY_ALLOWED_NETWORKS = parse_networks(
        "127.0.0.0/8", "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS"
    )
    return settings


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    return make_git_repo(tmp_path / "sample")


@pytest.fixture
def team(db) -> Team:
    return Team.objects.create(name="Alpha", slug="alpha")


@pytest.fixture
def other_team(db) -> Team:
    return Team.objects.create(name="Beta", slug="beta")


def _user(username: str, team: Team, role: str):
    user = get_user_model().objects.create_user(username, f"{username}@example.com", "pw-" + username)
    Membership.objects.create(team=team, user=user, role=role)
    return user


@pytest.fixture
def owner(team):
    return _user("owner", team, Role.OWNER)


@pytest.fixture
def teammate(team):
    return _user("teammate", team, Role.MEMBER)


@pytest.fixture
def viewer(team):
    return _user("viewer", team, Role.VIEWER)


@pytest.fixture
def outsider(other_team):
    return _user("outsider", other_team, Role.OWNER)


@pytest.fixture
def repository(team, sample_repo) -> Repository:
    return Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


@pytest.fixture
def run_settings(settings, tmp_path):
    """Settings for a run executed in the test process: a local sandbox without bwrap, files in tmp."""
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "none"
    settings.DATA_DIR = tmp_path / "data"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.LLM_RETRY_BASE_DELAY = 0.001
    return settings
