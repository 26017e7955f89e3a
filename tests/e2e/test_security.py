"""Security of the stack, checked against the MLflow server we ship.

The server is started the way the image starts it, by docker/mlflow-server.sh (its ENTRYPOINT),
here as a subprocess on a free loopback port with its state in a tmp folder: the same
`mlflow server` flags, no Docker needed. Two servers are started once for the module, in
parallel: the default one (no auth) and one with TINYTALE_MLFLOW_AUTH=1.

Requests are written with http.client and a hand-set Host header, so that no client library
normalises `..`, percent-escapes or the host before the server sees them.
"""

from __future__ import annotations

import builtins
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from support.configs import TINY
from support.server import free_port
from support.shipped_server import (
    ARTIFACTS,
    REPO,
    SCRIPT,
    Shipped,
    _has_auth_extra,
    _script_env,
    _spawn,
    needs_auth_extra,
    started_together,
)

from tinytale.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Shipped]]:
    spawns = {"plain": lambda: _spawn(tmp_path_factory.mktemp("shipped-plain"))}
    if _has_auth_extra():
        spawns["auth"] = lambda: _spawn(tmp_path_factory.mktemp("shipped-auth"),
                                        password=secrets.token_urlsafe(18))
    with started_together(spawns) as started:
        yield started


@pytest.fixture(scope="module")
def plain(servers: dict[str, Shipped]) -> Shipped:
    return servers["plain"]


@pytest.fixture(scope="module")
def authed(servers: dict[str, Shipped]) -> Shipped:
    if "auth" not in servers:
        pytest.fail("Flask-WTF is missing: the basic-auth server cannot start")
    return servers["auth"]


@pytest.fixture(scope="module")
def canary(plain: Shipped) -> bytes:
    """A file one level above the artifact root: what a `../` would reach."""
    text = f"tinytale-canary-{uuid.uuid4().hex}".encode()
    (plain.artifact_root.parent / "canary.txt").write_bytes(text)
    return text


# ---- Host header ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}"]
)
def test_a_forged_host_header_is_refused(plain: Shipped, host: str) -> None:
    endpoint = "/api/2.0/mlflow/experiments/search?max_results=1"
    status, body = plain.request("GET", endpoint, host=host.format(port=plain.port))
    assert status == 403, body[:200]
    status, body = plain.request("GET", endpoint)  # Host: 127.0.0.1:PORT
    assert status == 200, body[:200]


@pytest.mark.parametrize(
    "env",
    [
        {"MLFLOW_SERVER_ALLOWED_HOSTS": ""},
        {"MLFLOW_SERVER_ALLOWED_HOSTS": "*"},
        {"MLFLOW_SERVER_ALLOWED_HOSTS": "localhost:*, *"},
        {"MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "true"},
        {"MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "*"},
    ],
)
def test_the_script_refuses_to_turn_the_host_check_off(tmp_path: Path, env: dict[str, str]) -> None:
    full = _script_env(tmp_path, free_port(), **env)
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, (env, done.stderr)
    assert next(iter(env)) in done.stderr
    assert not (tmp_path / "mlflow").exists(), "a refused start must not create the store"


# ---- artifact path traversal ---------------------------------------------------------------


def test_artifacts_round_trip_through_the_server(plain: Shipped) -> None:
    """The control: plain paths work, so the refusals below are not a missing route."""
    status, body = plain.request("PUT", f"{ARTIFACTS}/control/hello.txt", b"hello")
    assert status == 200, body[:200]
    status, body = plain.request("GET", f"{ARTIFACTS}/control/hello.txt")
    assert (status, body) == (200, b"hello")
    assert (plain.artifact_root / "control" / "hello.txt").read_bytes() == b"hello"


TRAVERSALS = [
    "../canary.txt",
    "control/../../canary.txt",
    "%2e%2e/canary.txt",
    "%2e%2e%2fcanary.txt",
    "..%2fcanary.txt",
    "%252e%252e%252fcanary.txt",  # double-encoded
    "..%5ccanary.txt",  # backslash
    "../../../../../../../../etc/passwd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/etc/passwd",  # -> artifacts//etc/passwd
    "%2Fetc%2Fpasswd",
    "%252Fetc%252Fpasswd",
    "{root}/canary.txt",  # the absolute path of a real file outside the root
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_download_outside_the_artifact_root_is_refused(
    plain: Shipped, canary: bytes, path: str
) -> None:
    path = path.format(root=plain.artifact_root.parent)
    status, body = plain.request("GET", f"{ARTIFACTS}/{path}")
    assert canary not in body and b"root:" not in body, (status, body[:200])
    assert status >= 400, (status, body[:200])


@pytest.mark.parametrize("path", ["../", "%2e%2e", "..%2f..", "/etc", "%2Fetc", "{root}"])
def test_listing_outside_the_artifact_root_is_refused(
    plain: Shipped, canary: bytes, path: str
) -> None:
    path = path.format(root=plain.artifact_root.parent)
    status, body = plain.request("GET", f"{ARTIFACTS}?path={path}")
    assert b"canary.txt" not in body and b"passwd" not in body, (status, body[:200])
    assert status >= 400, (status, body[:200])


UPLOADS = [
    "../{name}",
    "control/../../{name}",
    "%2e%2e/{name}",
    "%2e%2e%2f{name}",
    "%252e%252e%252f{name}",  # double-encoded
    "..%5c{name}",  # backslash
    "/{outside}/{name}",  # absolute: artifacts//tmp/.../name
    "%2F{outside_encoded}%2F{name}",
]


@pytest.mark.parametrize("path", UPLOADS)
def test_upload_outside_the_artifact_root_is_refused(plain: Shipped, path: str) -> None:
    name = f"pwned-{uuid.uuid4().hex[:8]}"
    outside = str(plain.artifact_root.parent).strip("/")
    path = path.format(name=name, outside=outside, outside_encoded=outside.replace("/", "%2F"))
    status, body = plain.request("PUT", f"{ARTIFACTS}/{path}", b"pwned")
    written = list(plain.home.rglob(f"*{name}*"))
    outside_root = [p for p in written if plain.artifact_root not in p.parents]
    assert not outside_root, f"{path} wrote {outside_root} (status {status})"
    # On POSIX a doubly encoded name or a backslash is an odd but literal file name, which may
    # be stored inside the root; every `..` or absolute form must be answered with an error.
    if "%25" in path or "%5c" in path:
        assert status >= 400 or written, (status, body[:200])
    else:
        assert status >= 400, (status, body[:200])


def test_run_artifact_download_outside_the_run_is_refused(plain: Shipped, canary: bytes) -> None:
    status, created = plain.api("POST", "runs/create", {"experiment_id": "0"})
    assert status == 200, created
    run_id = created["run"]["info"]["run_id"]
    for path in ("../../../canary.txt", "%2e%2e%2f%2e%2e%2f%2e%2e%2fcanary.txt", "/etc/passwd"):
        status, body = plain.request("GET", f"/get-artifact?path={path}&run_uuid={run_id}")
        assert canary not in body and b"root:" not in body, (path, status, body[:200])
        assert status >= 400, (path, status, body[:200])


@pytest.mark.parametrize(
    "source", ["file:///etc", "/etc", "mlflow-artifacts:/../../etc", "runs:/x/../../../etc"]
)
def test_model_versions_from_outside_the_stores_are_refused(plain: Shipped, source: str) -> None:
    name = f"traversal-{uuid.uuid4().hex[:6]}"
    status, _ = plain.api("POST", "registered-models/create", {"name": name})
    assert status == 200
    status, body = plain.api("POST", "model-versions/create", {"name": name, "source": source})
    assert status >= 400, (status, body)


# ---- basic auth ----------------------------------------------------------------------------


@needs_auth_extra
def test_requests_without_credentials_are_refused(authed: Shipped) -> None:
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1", f"{ARTIFACTS}?path="):
        status, _ = authed.request("GET", path, auth=("", ""))
        assert status == 401, path
        status, _ = authed.request("GET", path, auth=("admin", "password1234"))
        assert status == 401, path
        status, body = authed.request("GET", path)  # the admin's credentials
        assert status == 200, (path, body[:200])


@needs_auth_extra
def test_health_needs_no_credentials(authed: Shipped) -> None:
    """The compose healthcheck calls /health without credentials."""
    assert authed.request("GET", "/health", auth=("", "")) == (200, b"OK")


@needs_auth_extra
def test_mlflow_clients_authenticate_from_the_environment(
    authed: Shipped, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What compose gives the trainer: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(f"http://127.0.0.1:{authed.port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        client.search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", authed.password or "")
    assert client.search_experiments()  # the Default experiment


@needs_auth_extra
def test_training_tracks_with_auth_on(authed: Shipped, tmp_path: Path) -> None:
    """`tinytale train` as the compose trainer runs it: the credentials only in the environment.

    Metrics and an artifact (the samples) go through the tracking and the artifact APIs; the
    registry is left out here for time (test_docker_e2e registers through the same client).
    """
    name = f"auth-{uuid.uuid4().hex[:8]}"
    overrides = [*TINY, "train.epochs=2", "data.n_stories=24", "train.num_threads=1"]
    overrides += ["tracking.register=false", "tracking.system_metrics=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=authed.password or "")
    argv = [sys.executable, "-m", "tinytale", "train", str(REPO / "experiments" / "lesson.yaml")]
    argv += [a for o in overrides for a in ("--set", o)]
    argv += ["--experiment", name, "--out", str(tmp_path), "--json"]
    argv += ["--tracking-uri", f"http://127.0.0.1:{authed.port}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    status, body = authed.api("GET", f"experiments/get-by-name?experiment_name={name}", {})
    assert status == 200, body
    experiment_id = body["experiment"]["experiment_id"]
    status, body = authed.api("POST", "runs/search", {"experiment_ids": [experiment_id]})
    (run,) = body["runs"]
    assert run["info"]["status"] == "FINISHED", run["info"]
    assert {m["key"] for m in run["data"]["metrics"]} >= {"train_loss", "val_loss"}
    status, body = authed.request(
        "GET", f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}"
    )
    assert status == 200 and b'"files"' in body, body[:300]
    anonymous, _ = authed.request(
        "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", auth=("", "")
    )
    assert anonymous == 401


@needs_auth_extra
def test_the_auth_config_is_not_world_readable(authed: Shipped) -> None:
    (config,) = (authed.home / "tmp").glob("tinytale-mlflow-auth.*/basic_auth.ini")
    assert config.stat().st_mode & 0o077 == 0
    assert config.parent.stat().st_mode & 0o077 == 0
    assert not list((authed.home / "mlflow").rglob("*.ini")), "no config in the volumes"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "needs an admin password"),
        ({"TINYTALE_MLFLOW_ADMIN_PASSWORD": "password1234"}, "default"),
        ({"TINYTALE_MLFLOW_ADMIN_PASSWORD": "Password1234"}, "default"),
        ({"TINYTALE_MLFLOW_ADMIN_PASSWORD": "short-pw"}, "at least 12"),
        ({"TINYTALE_MLFLOW_ADMIN_PASSWORD": " padded-password "}, "blank"),
        ({"TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE": "/nonexistent/pw"}, "not a readable file"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 20}, "MLFLOW_AUTH_ADMIN_PASSWORD is set"),
        ({"TINYTALE_MLFLOW_AUTH": "maybe"}, "is not 1 or 0"),
    ],
)
def test_the_script_refuses_to_start_without_a_safe_password(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    full = _script_env(tmp_path, free_port(), **{"TINYTALE_MLFLOW_AUTH": "1", **env})
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("mlflow-server: ERROR:") and done.stderr.count("\n") == 1
    assert not (tmp_path / "mlflow").exists(), "a refused start must not create the store"


def test_a_restart_with_another_admin_password_is_refused(authed: Shipped) -> None:
    """MLflow keeps the password its user database was created with: a changed secret must
    stop the start with one sentence, not turn into 401s in every trainer later."""
    assert (authed.home / "mlflow" / "db" / "basic_auth.db").exists()
    wrong = _script_env(authed.home, free_port(), TINYTALE_MLFLOW_AUTH="1",
                        TINYTALE_MLFLOW_ADMIN_PASSWORD=f"rotated-{secrets.token_hex(8)}")
    done = subprocess.run(["bash", str(SCRIPT)], env=wrong, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mlflow-server: ERROR: the admin password is not the one")
    assert done.stderr.count("\n") == 1

    # The right password passes the check and the server starts.
    right = _script_env(authed.home, free_port(), TINYTALE_MLFLOW_AUTH="1",
                        TINYTALE_MLFLOW_ADMIN_PASSWORD=authed.password)
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=right, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        assert any(line.startswith("mlflow-server: serving") for line in lines), lines
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_the_password_file_is_read(tmp_path: Path) -> None:
    """A secret file (compose `secrets:`) works like the variable; both at once are refused."""
    secret = tmp_path / "pw"
    secret.write_text("from-a-file-123\n")
    env = _script_env(
        tmp_path,
        free_port(),
        TINYTALE_MLFLOW_AUTH="1",
        TINYTALE_MLFLOW_ADMIN_PASSWORD="from-the-environment",
        TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE=str(secret),
    )
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "use one" in done.stderr, done.stderr
    # An empty file (compose mounts /dev/null when no secret is given) falls back to the variable.
    env["TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE"] = os.devnull
    env["TINYTALE_MLFLOW_ADMIN_PASSWORD"] = "short"
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "5 characters" in done.stderr, done.stderr


def test_the_trainer_entrypoint_reads_the_password_file(tmp_path: Path) -> None:
    """Compose hands the trainers the same secret file; MLflow clients read only the variable."""
    secret = tmp_path / "pw"
    secret.write_text("from-a-file-123\n")
    show = ["sh", "-c", 'echo "[$MLFLOW_TRACKING_PASSWORD][${MLFLOW_TRACKING_PASSWORD_FILE-}]"']
    entrypoint = ["sh", str(REPO / "docker" / "trainer-entrypoint.sh"), *show]
    base = {"PATH": os.environ["PATH"]}
    cases = [
        ({"MLFLOW_TRACKING_PASSWORD_FILE": str(secret)}, "[from-a-file-123][]"),
        ({"MLFLOW_TRACKING_PASSWORD_FILE": os.devnull}, "[][]"),  # compose's empty default
        (
            {"MLFLOW_TRACKING_PASSWORD": "env", "MLFLOW_TRACKING_PASSWORD_FILE": str(secret)},
            "[env][]",
        ),
    ]
    for env, expected in cases:
        done = subprocess.run(entrypoint, env={**base, **env}, capture_output=True, text=True)
        assert done.stdout.strip() == expected, (env, done.stdout, done.stderr)
    done = subprocess.run(
        entrypoint,
        env={**base, "MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "not readable" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the entrypoint as another uid")
def test_an_empty_secret_file_needs_no_reading() -> None:
    """A checkout made under umask 077 leaves compose's empty default secret unreadable to the
    containers' uid: with auth off that must not stop the trainer; a real secret still must."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        empty, secret = folder / "no-secret", folder / "pw"
        empty.write_text("")
        secret.write_text("from-a-file-123\n")
        for f in (empty, secret):
            f.chmod(0o600)  # owned by root: unreadable to uid 65534
        entrypoint = ["sh", str(REPO / "docker" / "trainer-entrypoint.sh"), "true"]
        run = lambda f: subprocess.run(  # noqa: E731
            entrypoint, env={"PATH": os.environ["PATH"], "MLFLOW_TRACKING_PASSWORD_FILE": str(f)},
            capture_output=True, text=True, user=65534, group=65534, cwd=folder)
        assert run(empty).returncode == 0, run(empty).stderr
        refused = run(secret)
        assert refused.returncode == 2 and "not readable" in refused.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- compose and images, statically -------------------------------------------------------


def test_compose_publishes_the_server_on_loopback_only() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    assert all(str(p).startswith("127.0.0.1:") for p in mlflow["ports"]), mlflow["ports"]
    for service in compose["services"].values():
        assert "privileged" not in service and "user" not in service


def test_compose_keeps_the_database_on_a_network_only_the_server_joins() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert "ports" not in services["db"] and "expose" not in services["db"]
    assert services["db"]["networks"] == ["database"]
    assert compose["networks"]["database"]["internal"] is True
    joined = {name for name, s in services.items() if "database" in s.get("networks", [])}
    assert joined == {"db", "mlflow"}, joined
    # Its password is a secret file, never a value in the compose file or an image.
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "POSTGRES_PASSWORD" not in services["db"]["environment"]
    uri = services["mlflow"]["environment"]["TINYTALE_MLFLOW_DATABASE_URI"]
    user_info = uri.split("://", 1)[1].rpartition("@")[0]
    assert ":" not in user_info, uri  # user@host, no user:password@host


def test_images_run_as_non_root_with_nothing_secret_baked_in() -> None:
    # The images users run: the trainer's cpu and cuda targets and the server's last stage.
    finals = {"Dockerfile": ("runtime AS cpu", "runtime AS cuda"), "mlflow.Dockerfile": ("",),
              "postgres.Dockerfile": ("",)}
    for name, targets in finals.items():
        text = (REPO / "docker" / name).read_text()
        stages = text.split("\nFROM ")
        for target in targets:
            (stage,) = [s for s in stages if s.startswith(target)] if target else [stages[-1]]
            users = [line for line in stage.splitlines() if line.startswith("USER ")]
            assert users and users[-1] != "USER root", (name, target)
        lowered = text.lower()
        assert "password=" not in lowered and "secret_key=" not in lowered, name
    # The build context is an allow-list: no .env, secret files or runs can reach an image.
    assert "*" in (REPO / ".dockerignore").read_text().splitlines()


# ---- checkpoints ---------------------------------------------------------------------------


class _Payload:
    """Pickles to a call of exec(): what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_checkpoints_load_without_running_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(evil)
    assert not marker.exists(), "load_checkpoint executed pickled code"
    # The control: an unrestricted unpickler does run it, so the file is a real payload.
    torch.load(evil, weights_only=False)
    assert marker.exists()
