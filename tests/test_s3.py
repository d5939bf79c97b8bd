"""Artifacts in an S3 bucket: a real ``moto_server`` process on loopback, real runs, real presigned URLs."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from django.test import Client
from django.urls import reverse

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Event, Repository, Run, start_session
from sessions.runner import execute
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process

ACCESS_KEY = "deputies-test-access-key"
SECRET_KEY = "s3-secret-" + "x" * 24  # must never show up in a log, an event or a page
PREFIX = "tenant-a/artifacts"


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


FIX = {
    "responses": [
        {
            "tool_calls": [
                call("edit_file", path="calc.py", old_string="return a - b", new_string="return a + b")
            ]
        },
        {"tool_calls": [call("finish", summary="Fixed add().")]},
    ]
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> str:
    """A real S3 API (moto's server mode) in its own process on a free loopback port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, "moto_server exited"
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout=60, what="moto_server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def s3_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def use_bucket(settings, endpoint: str, bucket: str, *, ttl: int = 300, prefix: str = PREFIX) -> None:
    """The STORAGES entry deputies/settings.py builds from DEPUTIES_S3_* (switching resets default_storage)."""
    settings.S3_URL_TTL = ttl
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "sessions.s3.ArtifactS3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "location": prefix,
                "endpoint_url": endpoint,
                "region_name": "us-east-1",
                "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY,
                "default_acl": None,
                "file_overwrite": False,
                "querystring_auth": True,
                "querystring_expire": ttl,
                "signature_version": "s3v4",
            },
        },
    }


@pytest.fixture
def bucket(moto, run_settings) -> str:
    name = f"deputies-{secrets.token_hex(4)}"
    s3_client(moto).create_bucket(Bucket=name)
    use_bucket(run_settings, moto, name)
    return name


LOUD = {"responses": [{"tool_calls": [call("bash", command="seq 1 2000")]}, *FIX["responses"]]}


def run_fix(run_settings, team, owner, repository, script: dict = FIX) -> Run:
    session = start_session(
        team=team, repository=repository, prompt="Fix add()", model="scripted/demo", created_by=owner
    )
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    return session.runs.get()


def test_it_stores_a_runs_diff_in_the_bucket_and_redirects_downloads_to_it(
    moto, bucket, run_settings, team, owner, repository
):
    run_settings.TOOL_OUTPUT_LIMIT = 500  # seq's output is kept whole as a tool_output artifact
    run = run_fix(run_settings, team, owner, repository, LOUD)
    assert run.status == Run.Status.COMPLETED, run.error

    diff = Artifact.objects.get(run=run, kind="diff")
    client = s3_client(moto)
    stored = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{diff.file.name}")["Body"].read()
    assert b"+    return a + b" in stored and len(stored) == diff.size
    output = Artifact.objects.get(run=run, kind="tool_output")
    body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{output.file.name}")["Body"].read()
    assert b"\n1999\n2000\n" in body and len(body) == output.size
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"{PREFIX}/{a.file.name}" for a in Artifact.objects.filter(run=run)}
    assert not run_settings.MEDIA_ROOT.exists()  # nothing on local disk

    response = client_for(owner).get(reverse("api-artifact-download", args=[diff.pk]))
    assert response.status_code == 302
    location = response["Location"]
    assert location.startswith(f"{moto}/{bucket}/{PREFIX}/artifacts/{diff.session_id}/")
    query = parse_qs(urlsplit(location).query)
    assert query["X-Amz-Expires"] == ["300"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert SECRET_KEY not in location

    fetched = httpx.get(location, timeout=5)
    assert fetched.status_code == 200
    assert fetched.content == stored
    assert fetched.headers["content-disposition"] == f'attachment; filename="{diff.name}"'
    assert fetched.headers["content-type"].startswith("text/x-diff")


def test_it_links_the_dashboard_to_the_same_checked_redirect(bucket, run_settings, team, owner, repository):
    run = run_fix(run_settings, team, owner, repository)
    diff = Artifact.objects.get(run=run, kind="diff")
    browser = Client()
    browser.force_login(owner)

    page = browser.get(reverse("session-detail", args=[run.session_id])).content.decode()
    link = reverse("api-artifact-download", args=[diff.pk])
    assert f'href="{link}"' in page
    text = re.sub(r"<[^>]+>", "", page)  # the viewer's markup (highlighting spans) aside
    assert "1 file changed" in text and "    return a + b\n" in text  # it read the diff from the bucket
    response = browser.get(link)
    assert response.status_code == 302 and f"/{bucket}/" in response["Location"]


def test_it_signs_download_urls_that_expire_after_the_ttl(
    moto, bucket, run_settings, team, owner, repository
):
    use_bucket(run_settings, moto, bucket, ttl=1)
    run = run_fix(run_settings, team, owner, repository)
    diff = Artifact.objects.get(run=run, kind="diff")

    before = datetime.now(UTC).replace(microsecond=0)
    location = client_for(owner).get(reverse("api-artifact-download", args=[diff.pk]))["Location"]
    query = parse_qs(urlsplit(location).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert query["X-Amz-Expires"] == ["1"]
    assert 0 <= (signed_at - before).total_seconds() <= 2
    # X-Amz-Expires and X-Amz-Date are inside the signature: changing either breaks the URL on a
    # store that checks signatures. moto_server (5.2) does not check presigned expiry or signatures,
    # so the refusal itself is not observable here; the URL works while fresh.
    assert httpx.get(location, timeout=5).status_code == 200


def test_it_answers_an_outsider_404_without_making_a_url(
    bucket, run_settings, team, owner, outsider, teammate, viewer, repository
):
    run = run_fix(run_settings, team, owner, repository)
    diff = Artifact.objects.get(run=run, kind="diff")
    url = reverse("api-artifact-download", args=[diff.pk])

    refused = client_for(outsider).get(url)
    assert refused.status_code == 404
    assert refused.json() == {"detail": "Not found.", "code": "not_found"}
    assert "Location" not in refused and "X-Amz" not in refused.content.decode()
    assert client_for(None).get(url).status_code in (401, 403)
    for member in (teammate, viewer):
        assert client_for(member).get(url).status_code == 302


def test_a_missing_bucket_fails_the_run_naming_the_bucket_and_why(
    moto, run_settings, team, owner, repository, django_user_model
):
    use_bucket(run_settings, moto, "deputies-no-such-bucket")
    run = run_fix(run_settings, team, owner, repository)

    host = urlsplit(moto).netloc
    assert run.status == Run.Status.FAILED
    assert re.match(r"could not store (diff|checkpoint) artifact 'session-", run.error), run.error
    assert run.error.endswith(
        f"in bucket 'deputies-no-such-bucket' at http://{host} (region us-east-1): "
        "the bucket does not exist (NoSuchBucket)"
    )
    assert "Traceback" not in run.error and SECRET_KEY not in run.error
    assert Event.objects.get(run=run, type="run_failed").payload["error"] == run.error
    assert not Artifact.objects.filter(run=run).exists()

    ready = Client().get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["failed"] == ["storage"]

    admin = django_user_model.objects.create_user("admin", "a@example.com", "pw", is_staff=True)
    browser = Client()
    browser.force_login(admin)
    page = browser.get(reverse("setup")).content.decode()
    assert "Artifact storage" in page
    assert (
        f"bucket &#x27;deputies-no-such-bucket&#x27; at http://{host} "
        "(region us-east-1): the bucket does not exist (404)"
    ) in page
    assert "Create the bucket, or fix DEPUTIES_S3_BUCKET" in page
    assert SECRET_KEY not in page and ACCESS_KEY not in page


def test_it_reports_a_bucket_that_answers(bucket, django_user_model):
    assert Client().get("/readyz").json()["checks"]["storage"] == {"status": "ok"}
    admin = django_user_model.objects.create_user("admin", "a@example.com", "pw", is_staff=True)
    browser = Client()
    browser.force_login(admin)
    page = browser.get(reverse("setup")).content.decode()
    assert f"bucket &#x27;{bucket}&#x27; at http://127.0.0.1:" in page and " answers." in page
    assert PREFIX in page and SECRET_KEY not in page


def test_it_reports_an_endpoint_that_does_not_answer(run_settings, django_user_model):
    use_bucket(run_settings, f"http://127.0.0.1:{free_port()}", "deputies-anything")
    started = time.monotonic()
    ready = Client().get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["storage"]["status"] == "error"
    assert time.monotonic() - started < 10  # one attempt with short timeouts, not botocore's minutes


def test_files_on_disk_keep_streaming_and_need_no_bucket(
    run_settings, team, owner, repository, django_user_model
):
    run = run_fix(run_settings, team, owner, repository)
    diff = Artifact.objects.get(run=run, kind="diff")
    assert (run_settings.MEDIA_ROOT / diff.file.name).exists()

    response = client_for(owner).get(reverse("api-artifact-download", args=[diff.pk]))
    assert response.status_code == 200
    assert b"+    return a + b" in b"".join(response.streaming_content)
    assert "storage" not in Client().get("/readyz").json()["checks"]
    admin = django_user_model.objects.create_user("admin", "a@example.com", "pw", is_staff=True)
    browser = Client()
    browser.force_login(admin)
    page = browser.get(reverse("setup")).content.decode()
    assert "Artifact storage" in page and "Files on this host&#x27;s disk (Simple mode)." in page


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_configured_by_environment_writes_to_the_bucket(
    moto, tmp_path, settings, team, owner, sample_repo
):
    """DEPUTIES_S3_* as an operator sets them (the secret through ``_FILE``), in a real worker."""
    bucket = f"deputies-{secrets.token_hex(4)}"
    s3_client(moto).create_bucket(Bucket=bucket)
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(SECRET_KEY + "\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")

    with start_in_thread(FIX) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="k",
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
            DEPUTIES_LOG_LEVEL="DEBUG",
            DEPUTIES_S3_BUCKET=bucket,
            DEPUTIES_S3_PREFIX=f"/{PREFIX}/",
            DEPUTIES_S3_ENDPOINT_URL=moto,
            DEPUTIES_S3_REGION="us-east-1",
            DEPUTIES_S3_ACCESS_KEY_ID=ACCESS_KEY,
            DEPUTIES_S3_SECRET_ACCESS_KEY_FILE=str(secret_file),
        )
        with worker_process(env):
            session = start_session(
                team=team, repository=repository, prompt="Fix add()", model="scripted/demo", created_by=owner
            )
            run = wait_for(
                lambda: session.runs.filter(status__in=[Run.Status.COMPLETED, Run.Status.FAILED]).first(),
                timeout=60,
                what="the run to finish",
            )
    assert run.status == Run.Status.COMPLETED, run.error
    diff = Artifact.objects.get(run=run, kind="diff")
    body = s3_client(moto).get_object(Bucket=bucket, Key=f"{PREFIX}/{diff.file.name}")["Body"].read()
    assert b"+    return a + b" in body
    assert not (data_dir / "media").exists()

    log = (data_dir / "worker.log").read_text()
    assert "botocore" in log and ACCESS_KEY in log  # boto's DEBUG output, signed requests and all...
    assert SECRET_KEY not in log  # ...never the secret
    events = json.dumps(list(Event.objects.filter(session=session).values_list("payload", flat=True)))
    assert SECRET_KEY not in events


def test_it_signs_for_the_public_endpoint_when_browsers_reach_the_store_elsewhere(
    moto, bucket, run_settings, team, owner, repository
):
    public = moto.replace("127.0.0.1", "localhost")  # e.g. http://minio:9000 inside, localhost:9000 outside
    run_settings.STORAGES = {
        **run_settings.STORAGES,
        "default": {
            **run_settings.STORAGES["default"],
            "OPTIONS": {**run_settings.STORAGES["default"]["OPTIONS"], "public_endpoint_url": public},
        },
    }
    run = run_fix(run_settings, team, owner, repository)
    assert run.status == Run.Status.COMPLETED, run.error  # workers still write through the inside endpoint
    diff = Artifact.objects.get(run=run, kind="diff")

    location = client_for(owner).get(reverse("api-artifact-download", args=[diff.pk]))["Location"]
    assert location.startswith(f"{public}/{bucket}/{PREFIX}/")
    assert b"+    return a + b" in httpx.get(location, timeout=5).content


def settings_in_child(**env: str) -> subprocess.CompletedProcess:
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        "print(json.dumps([settings.STORAGES['default'], settings.S3_URL_TTL]))"
    )
    child = {k: v for k, v in child_env(Path("/nonexistent")).items() if k != "DEPUTIES_DATA_DIR"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**child, **env}, capture_output=True, text=True, timeout=60
    )


def test_it_builds_the_bucket_backend_from_the_environment(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET_KEY + "\n")
    done = settings_in_child(
        DEPUTIES_DATA_DIR=str(tmp_path),
        DEPUTIES_S3_BUCKET="artifacts",
        DEPUTIES_S3_PREFIX="/team-a/",
        DEPUTIES_S3_ENDPOINT_URL="http://minio:9000",
        DEPUTIES_S3_PUBLIC_ENDPOINT_URL="https://files.example.com",
        DEPUTIES_S3_ACCESS_KEY_ID=ACCESS_KEY,
        DEPUTIES_S3_SECRET_ACCESS_KEY_FILE=str(secret_file),
        DEPUTIES_S3_URL_TTL="60",
    )
    assert done.returncode == 0, done.stderr
    storage, ttl = json.loads(done.stdout)
    assert storage["BACKEND"] == "sessions.s3.ArtifactS3Storage"
    options = storage["OPTIONS"]
    assert (options["location"], options["querystring_expire"], ttl) == ("team-a", 60, 60)
    assert options["secret_key"] == SECRET_KEY and options["signature_version"] == "s3v4"
    assert options["public_endpoint_url"] == "https://files.example.com"

    plain = json.loads(settings_in_child(DEPUTIES_DATA_DIR=str(tmp_path)).stdout)[0]
    assert plain == {"BACKEND": "django.core.files.storage.FileSystemStorage"}


@pytest.mark.parametrize("ttl", ["0", "604801", "soon"])
def test_it_refuses_a_download_ttl_s3_cannot_sign(tmp_path, ttl):
    done = settings_in_child(DEPUTIES_DATA_DIR=str(tmp_path), DEPUTIES_S3_URL_TTL=ttl)
    assert done.returncode != 0
    assert f"DEPUTIES_S3_URL_TTL={ttl!r}" in done.stderr.splitlines()[-1]


def test_it_says_which_keys_are_missing_and_answers_503_when_it_cannot_sign(
    moto, bucket, run_settings, team, owner, repository, monkeypatch
):
    # No keys anywhere boto3 looks (and no instance-metadata lookup: that would leave loopback).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    options = {**run_settings.STORAGES["default"]["OPTIONS"], "access_key": None, "secret_key": None}
    run_settings.STORAGES = {
        **run_settings.STORAGES,
        "default": {**run_settings.STORAGES["default"], "OPTIONS": options},
    }

    run = run_fix(run_settings, team, owner, repository)
    assert run.status == Run.Status.FAILED
    assert run.error.endswith(
        ": no credentials: set DEPUTIES_S3_ACCESS_KEY_ID and DEPUTIES_S3_SECRET_ACCESS_KEY"
    ), run.error

    artifact = Artifact.objects.create(
        session_id=run.session_id, kind="log", name="x.log", file="artifacts/x.log"
    )
    response = client_for(owner).get(reverse("api-artifact-download", args=[artifact.pk]))
    assert response.status_code == 503
    assert response.json() == {
        "detail": "The artifact store cannot sign a download link; see /setup.",
        "code": "storage_unavailable",
    }
