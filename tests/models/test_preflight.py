"""The model preflight (`voice-agent models`, and the check `serve`, `say`, `run` and
`call` run first), offline: local checkouts, huggingface_hub's cache, HF_HUB_OFFLINE, a
closed port as the Hub, and a small local server that answers like the Hub's API (so
huggingface_hub's own client raises its real GatedRepoError and downloads for real)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

from agent.config import load_settings
from agent.errors import ModelInitializationError
from agent.models.preflight import Hub, check_model, check_models, download, require_models, wanted_files

SHA = "0123456789abcdef0123456789abcdef01234567"
GATED = "canopylabs/orpheus-3b-0.1-ft"
OPEN = "hubertsiuzdak/snac_24khz"
SHARDED = "mistralai/Voxtral-Mini-3B-2507"
REPOS = {  # repo -> {file: content}
    GATED: {"config.json": b"{}", "model.safetensors": b"w" * 1000},
    OPEN: {"config.json": b'{"sampling_rate": 24000}', "pytorch_model.bin": b"s" * 500, "README.md": b"# snac"},
    # Voxtral's layout: sharded safetensors, plus Mistral's own format that transformers never reads.
    SHARDED: {
        "config.json": b"{}", "tekken.json": b"{}", "preprocessor_config.json": b"{}",
        "model.safetensors.index.json": json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode(),
        "model-00001-of-00002.safetensors": b"1" * 300, "model-00002-of-00002.safetensors": b"2" * 200,
        "consolidated.safetensors": b"c" * 5000, "params.json": b"{}", "original/weights.pth": b"o" * 700,
    },
}


def free_port() -> int:
    """A port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"X-Error-Code": code, "X-Error-Message": message})


def fake_hub_app() -> web.Application:
    """The few Hub routes huggingface_hub uses for model_info, auth_check and snapshot_download."""

    def repo_of(request: web.Request) -> str | None:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        return repo if repo in REPOS else None

    def gate(request: web.Request, repo: str) -> web.Response | None:
        if repo != GATED:
            return None
        # The Hub: 401 without a token, 403 with one whose account has not accepted the licence.
        status = 403 if request.headers.get("Authorization") else 401
        return hub_error(status, "GatedRepo", f"Access to model {repo} is restricted.")

    async def info(request: web.Request) -> web.Response:
        repo = repo_of(request)
        if repo is None:
            return hub_error(404, "RepoNotFound", "Repository not found")
        siblings = [{"rfilename": n, "size": len(b)} for n, b in REPOS[repo].items()]
        return web.json_response({"id": repo, "sha": SHA, "siblings": siblings, "gated": repo == GATED and "manual"})

    async def auth_check(request: web.Request) -> web.Response:
        repo = repo_of(request)
        if repo is None:
            return hub_error(404, "RepoNotFound", "Repository not found")
        return gate(request, repo) or web.json_response({})

    async def tree(request: web.Request) -> web.Response:
        repo = repo_of(request)
        return gate(request, repo) or web.json_response([
            {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
            for n, b in REPOS[repo].items()])

    async def resolve(request: web.Request) -> web.Response:
        repo = repo_of(request)
        if repo is None:
            return hub_error(404, "RepoNotFound", "Repository not found")
        denied = gate(request, repo)
        if denied:
            return denied
        body = REPOS[repo].get(request.match_info["path"])
        if body is None:
            return hub_error(404, "EntryNotFound", "Entry not found")
        return web.Response(body=body, headers={"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})

    app = web.Application()
    base = "/api/models/{owner}/{name}"
    app.router.add_get(base, info)
    app.router.add_get(base + "/revision/{rev}", info)
    app.router.add_get(base + "/auth-check", auth_check)
    app.router.add_get(base + "/tree/{rev}", tree)
    app.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.+}", resolve)
    return app


@pytest.fixture(scope="module")
def fake_hub():
    """The fake Hub's endpoint, served from a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake_hub_app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def default_settings(**models: str):
    settings = load_settings("default", env={})
    for section, model in models.items():
        settings = settings.replace(section, model=model)
    return settings


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VOICE_AGENT_PROFILE"))}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**full, **env})


# --- what a complete copy is ------------------------------------------------------------

def test_only_the_files_the_loaders_read_are_wanted():
    assert wanted_files(REPOS[SHARDED]) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "params.json", "preprocessor_config.json", "tekken.json"]
    assert wanted_files(REPOS[OPEN]) == ["config.json", "pytorch_model.bin"]


def test_built_in_models_ask_nothing():
    for source in ("tiny", "random:orpheus-3b"):
        check = check_model("Orpheus", "orpheus.model", source, Hub(endpoint=f"http://127.0.0.1:{free_port()}"))
        assert check.ok and check.kind == "built-in"
    require_models(load_settings("tiny", env={}))  # no Hub, no network


# --- local checkouts --------------------------------------------------------------------

def test_a_local_directory_stands_in_for_a_hub_checkout(tmp_path):
    checkout = tmp_path / "orpheus"
    checkout.mkdir()
    for name, body in REPOS[SHARDED].items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_bytes(body)
    unreachable = Hub(endpoint=f"http://127.0.0.1:{free_port()}", cache_dir=str(tmp_path / "cache"))
    check = check_model("Voxtral", "voxtral.model", str(checkout), unreachable)
    assert check.ok and check.kind == "local" and check.status == "local"
    assert check.size_bytes == sum(len(b) for b in REPOS[SHARDED].values())

    (checkout / "model-00002-of-00002.safetensors").unlink()  # an interrupted copy
    check = check_model("Voxtral", "voxtral.model", str(checkout), unreachable)
    assert not check.ok and "no complete weights" in check.problem and str(checkout) in check.problem
    (checkout / "config.json").unlink()
    assert "has no config.json" in check_model("Voxtral", "voxtral.model", str(checkout), unreachable).problem
    missing = check_model("SNAC", "snac.model", str(tmp_path / "no" / "such"), unreachable)
    assert missing.status == "missing" and "snac.model" in missing.problem


def test_the_tiny_checkpoints_pass_as_local_checkouts():
    from agent.models.tiny import tiny_orpheus_dir, tiny_snac_dir

    settings = default_settings(orpheus=str(tiny_orpheus_dir()), snac=str(tiny_snac_dir()))
    checks = check_models(settings, ("Orpheus", "SNAC"), Hub(endpoint=f"http://127.0.0.1:{free_port()}"))
    assert [c.status for c in checks] == ["local", "local"] and all(c.size_bytes > 0 for c in checks)
    require_models(settings, listen=False)


# --- the Hub: unreachable, offline, gated, unknown, downloads -------------------------------

def test_an_unreachable_hub_names_the_model_and_the_cause(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    check = check_model("Orpheus", "orpheus.model", GATED, Hub(endpoint=endpoint, cache_dir=str(tmp_path), token=""))
    assert check.status == "unreachable" and not check.cached
    assert check.problem.startswith(f"{GATED} (Orpheus, orpheus.model) is not cached and the Hub ({endpoint}) "
                                    "cannot be reached")
    offline = check_model("Orpheus", "orpheus.model", GATED, Hub(cache_dir=str(tmp_path), offline=True, token=""))
    assert offline.status == "offline" and "HF_HUB_OFFLINE" in offline.problem


def test_gated_repositories_say_how_to_get_access(fake_hub, tmp_path):
    no_token = check_model("Orpheus", "orpheus.model", GATED, Hub(endpoint=fake_hub, cache_dir=str(tmp_path), token=""))
    assert no_token.status == "gated" and no_token.size_bytes == 1002  # the listing is public, the files are not
    assert no_token.problem == (f"{GATED} (Orpheus, orpheus.model) is gated: accept its licence at {fake_hub}/{GATED} "
                                "and log in (hf auth login or HF_TOKEN); or use --profile tiny")
    with_token = check_model("Orpheus", "orpheus.model", GATED,
                             Hub(endpoint=fake_hub, cache_dir=str(tmp_path), token="hf_notgranted"))
    assert with_token.status == "gated" and "this token's account has no access" in with_token.problem
    unknown = check_model("Orpheus", "orpheus.model", "nobody/no-such-model", Hub(endpoint=fake_hub, token=""))
    assert unknown.status == "not-found" and "check orpheus.model" in unknown.problem
    with pytest.raises(ModelInitializationError, match="is gated"):
        download([no_token], Hub(endpoint=fake_hub, cache_dir=str(tmp_path), token=""))
    assert not any(tmp_path.iterdir())  # refused before the first byte


def test_download_fetches_what_is_loaded_and_the_cache_then_passes_offline(fake_hub, tmp_path):
    hub = Hub(endpoint=fake_hub, cache_dir=str(tmp_path), token="")
    before = [check_model("Voxtral", "voxtral.model", SHARDED, hub), check_model("SNAC", "snac.model", OPEN, hub)]
    assert [c.status for c in before] == ["available", "available"] and before[0].size_bytes == sum(
        len(REPOS[SHARDED][n]) for n in wanted_files(REPOS[SHARDED]))
    download(before, hub)
    snapshot = tmp_path / "models--mistralai--Voxtral-Mini-3B-2507" / "snapshots" / SHA
    assert sorted(p.name for p in snapshot.iterdir()) == wanted_files(REPOS[SHARDED])  # no consolidated, no original/
    after = check_model("Voxtral", "voxtral.model", SHARDED, hub)
    assert after.status == "cached" and after.cached and after.ok
    (snapshot / "params.json").unlink()  # a small file transformers does not read: still complete
    assert check_model("Voxtral", "voxtral.model", SHARDED, hub).cached

    offline = Hub(cache_dir=str(tmp_path), offline=True, token="")
    for repo in (SHARDED, OPEN):
        check = check_model("Voxtral", "voxtral.model", repo, offline)
        assert check.ok and check.cached and check.status == "cached", check
    closed = Hub(endpoint=f"http://127.0.0.1:{free_port()}", cache_dir=str(tmp_path), token="")
    assert check_model("SNAC", "snac.model", OPEN, closed).ok
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # a partial copy does not pass offline
    partial = check_model("Voxtral", "voxtral.model", SHARDED, offline)
    assert not partial.cached and partial.status == "offline"


# --- the command line ---------------------------------------------------------------------

def test_models_command_reports_json_offline(tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    p = run_cli("models", "--profile", "default", "--json", env=env)
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["profile"] == "default" and report["ok"] is False
    assert [m["role"] for m in report["models"]] == ["Voxtral", "Orpheus", "SNAC"]
    assert {m["status"] for m in report["models"]} == {"offline"}
    p = run_cli("models", "--profile", "tiny", env=env)
    assert p.returncode == 0 and "built-in" in p.stdout, p.stderr


@pytest.mark.parametrize("hub_env", ["offline", "closed-port", "gated"])
def test_say_stops_at_once_with_one_line(hub_env, fake_hub, tmp_path):
    env = {"HF_HOME": str(tmp_path)}
    if hub_env == "offline":
        env["HF_HUB_OFFLINE"] = "1"
        expected = "HF_HUB_OFFLINE is set"
    elif hub_env == "closed-port":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        expected = "cannot be reached"
    else:
        env["HF_ENDPOINT"] = fake_hub
        expected = f"is gated: accept its licence at {fake_hub}/{GATED} and log in (hf auth login or HF_TOKEN)"
    start = time.monotonic()
    p = run_cli("say", "Hello.", "--profile", "default", "-o", str(tmp_path / "out.wav"), env=env)
    assert p.returncode == 1, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("voice-agent: error:")]
    assert len(errors) == 1 and GATED in errors[0] and expected in errors[0], p.stderr
    assert "loading" not in p.stderr  # nothing was loaded (or downloaded)
    assert time.monotonic() - start < 60
