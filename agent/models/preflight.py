"""Model preflight: where each model of a profile comes from, how big it is, whether it
is cached, and whether the Hugging Face Hub will let us have it, checked with metadata
calls before anything is downloaded (`voice-agent models`, and first thing in `serve`,
`say`, `run` and `call`).

A first run would otherwise download about 9 GB of Voxtral and only then find that
Orpheus is gated. A model whose files are all in huggingface_hub's cache passes
without the network, as transformers loads it from there.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Settings
from agent.engine.generation import first_line
from agent.errors import ModelInitializationError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

# role -> (settings section, what `resolve_source` calls it)
ROLES = {"Voxtral": "voxtral", "Orpheus": "orpheus", "SNAC": "snac"}
SPEAKING = ("Orpheus", "SNAC")  # what `say` loads
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weight formats other than the one we load; subfolders (original/, onnx/) hold those too.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt")
SMALL_FILES = (".json", ".txt", ".model", ".tiktoken", ".jinja")


@dataclass
class Hub:
    """How to reach the Hub: huggingface_hub's settings unless a test says otherwise."""

    endpoint: str = ""
    cache_dir: str = ""
    offline: bool | None = None
    token: str | None = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        from huggingface_hub import constants, get_token

        self.endpoint = (self.endpoint or constants.ENDPOINT).rstrip("/")
        self.cache_dir = self.cache_dir or constants.HF_HUB_CACHE
        if self.offline is None:
            self.offline = constants.is_offline_mode()
        if self.token is None:
            self.token = get_token()

    def api(self) -> HfApi:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False)


@dataclass
class ModelCheck:
    """What `voice-agent models` reports for one model; `problem` is None when it will load."""

    role: str
    setting: str
    source: str
    kind: str  # "hub", "local" or "built-in" (tiny, random:)
    size_bytes: int | None = None
    cached: bool | None = None  # hub only: every file we load is in huggingface_hub's cache
    status: str = "ok"  # built-in, local, cached, available, gated, not-found, offline, unreachable, missing
    problem: str | None = None
    note: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("files")
        d["ok"] = self.ok
        return d


def roles_for(listen: bool) -> tuple[str, ...]:
    return tuple(ROLES) if listen else SPEAKING


def check_models(settings: Settings, roles: Iterable[str] = tuple(ROLES), hub: Hub | None = None) -> list[ModelCheck]:
    """One ModelCheck per role, in order; the Hub is only asked about Hub ids."""
    checks = []
    for role in roles:
        section = ROLES[role]
        source = getattr(settings, section).model
        checks.append(check_model(role, f"{section}.model", source, hub))
    return checks


def require_models(settings: Settings, listen: bool = True, hub: Hub | None = None) -> None:
    """Raise ModelInitializationError (one line: the model, the cause, the fix) for the
    first model that cannot be had, before anything is downloaded or loaded."""
    for check in check_models(settings, roles_for(listen), hub):
        if check.problem is not None:
            raise ModelInitializationError(check.problem)
        if check.kind == "hub" and not check.cached:
            log.info("%s (%s) is not cached: the first load downloads %s", check.role, check.source,
                     format_size(check.size_bytes))


def check_model(role: str, setting: str, source: str, hub: Hub | None = None) -> ModelCheck:
    kind = _kind(source)
    check = ModelCheck(role, setting, source, kind)
    if kind == "built-in":
        check.status = "built-in"
        check.note = "built offline" if source == "tiny" else "random weights made on the device"
        return check
    if kind == "local":
        return _check_local(check, Path(source))
    return _check_hub(check, hub or Hub())


def _kind(source: str) -> str:
    if source == "tiny" or source.startswith("random:"):
        return "built-in"
    # from_pretrained takes an existing directory over a Hub id of the same name.
    if Path(source).is_dir() or not REPO_ID.match(source) or source.startswith("."):
        return "local"
    return "hub"


def _check_local(check: ModelCheck, path: Path) -> ModelCheck:
    check.status = "local"
    if not path.is_dir():
        check.status = "missing"
        check.problem = (f"{check.role} model {str(path)!r} ({check.setting}) is no directory here and no Hub id: "
                         "give a Hub id or the path of a checkout (config.json and weights)")
        return check
    check.size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if not (path / "config.json").is_file():
        check.status = "missing"
        check.problem = (f"{check.role} model {str(path)!r} ({check.setting}) has no config.json: "
                         "point it at a checkout of the model (git clone or `hf download`)")
    elif not _weights_complete(path, [str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()]):
        check.status = "missing"
        check.problem = (f"{check.role} model {str(path)!r} ({check.setting}) has no complete weights "
                         "(*.safetensors or pytorch_model.bin, every shard its index names)")
    return check


def wanted_files(names: Iterable[str]) -> list[str]:
    """Of a repository's files, those the loaders read: top-level configs and tokenizers
    and one weight format. Voxtral's repository also holds its weights in Mistral's own
    format (consolidated.safetensors, 9 GB more), which transformers never reads."""
    top = [n for n in names if "/" not in n and not n.startswith("consolidated.")]
    safetensors = [n for n in top if n.endswith(".safetensors")]
    weights = safetensors or [n for n in top if n.endswith(".bin")]
    small = [n for n in top if n.endswith(SMALL_FILES)]
    if safetensors:
        small = [n for n in small if not n.startswith("pytorch_model.bin")]  # the .bin format's index
    return sorted(set(weights + small))


def _weights_complete(folder: Path, names: list[str]) -> bool:
    """Whether `folder` holds every weight file its index names (or one unsharded file)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index_name in names:
            try:
                shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError):
                return False
            return all((folder / s).is_file() for s in shards)
        if single in names and (folder / single).is_file():
            return True
    return False


def _cached_snapshot(repo_id: str, hub: Hub) -> Path | None:
    """The folder of the cached snapshot of `repo_id`'s main revision, if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub.cache_dir)
    return Path(found).parent if isinstance(found, str) else None


def _check_hub(check: ModelCheck, hub: Hub) -> ModelCheck:
    repo = check.source
    snapshot = _cached_snapshot(repo, hub)
    local = [str(f.relative_to(snapshot)) for f in snapshot.rglob("*") if f.is_file()] if snapshot else []
    listed: list[str] | None = None
    sizes: dict[str, int] = {}
    missing = 0
    error: BaseException | None = None
    if not hub.offline:
        try:
            api = hub.api()
            info = api.model_info(repo, files_metadata=True, timeout=hub.timeout_s)
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
            listed = wanted_files(sizes)
            api.auth_check(repo)  # model_info answers for gated repositories too
        except Exception as e:  # sorted out by _hub_problem; anything else is the Hub's answer
            error = e
    if listed is not None:  # the Hub's listing says what a complete copy is
        check.files = listed
        check.size_bytes = sum(sizes[n] for n in listed)
        # Complete when the config and every weight file are there: transformers leaves out
        # small files it does not read (Voxtral's params.json), so those do not count.
        needed = [n for n in listed if n == "config.json" or n.endswith((".safetensors", ".bin", ".index.json"))]
        check.cached = snapshot is not None and all((snapshot / n).is_file() for n in needed)
        missing = sum(sizes[n] for n in listed if snapshot is None or not (snapshot / n).is_file())
    else:  # offline: a complete copy has its config and every weight shard
        check.files = wanted_files(local)
        check.cached = snapshot is not None and "config.json" in local and _weights_complete(snapshot, local)
        if snapshot is not None:
            check.size_bytes = sum((snapshot / n).stat().st_size for n in check.files)

    if error is None and not hub.offline:
        check.status = "cached" if check.cached else "available"
        if not check.cached:
            check.note = f"downloads {format_size(missing)} on first use (voice-agent models --download)"
        return check
    status, cause = _hub_problem(check, hub, error)
    if check.cached:  # transformers loads a complete cached copy without the Hub
        check.status = "cached"
        check.note = f"loads from the cache; the Hub did not confirm access ({status})"
        return check
    check.status = status
    check.problem = f"{repo} ({check.role}, {check.setting}) {cause}; or use --profile tiny"
    return check


def _hub_problem(check: ModelCheck, hub: Hub, error: BaseException | None) -> tuple[str, str]:
    """(status, cause and fix) for a Hub model that cannot be had."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    page = f"{hub.endpoint}/{check.source}"  # https://huggingface.co/<id> unless HF_ENDPOINT says
    login = "log in (hf auth login or HF_TOKEN)"
    if hub.offline or isinstance(error, OfflineModeIsEnabled):
        return "offline", ("is not fully in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it, or run "
                           "`voice-agent models --download` where the Hub is reachable")
    assert error is not None  # _check_hub passes None only when offline, answered above
    if isinstance(error, GatedRepoError):
        if not hub.token:
            return "gated", f"is gated: accept its licence at {page} and {login}"
        return "gated", (f"is gated and this token's account has no access: accept its licence at {page} "
                         "with the account of HF_TOKEN (or of hf auth login)")
    if isinstance(error, RepositoryNotFoundError):
        return "not-found", f"was not found on the Hub ({hub.endpoint}): check {check.setting}, or {login} if it is private"
    if isinstance(error, HfHubHTTPError):
        return "error", f"cannot be checked: the Hub answered {first_line(error)}"
    # Connection refused, no DNS, a timeout, a proxy: huggingface_hub's httpx errors.
    return "unreachable", (f"is not cached and the Hub ({hub.endpoint}) cannot be reached ({first_line(error)}): "
                           "check the network, HF_ENDPOINT or the proxy")


def download(checks: list[ModelCheck], hub: Hub | None = None) -> None:
    """Fetch every Hub model that is not fully cached, with huggingface_hub's progress
    bars on stderr. Refuses (ModelInitializationError) before the first byte when any
    model of `checks` cannot be had."""
    from huggingface_hub import snapshot_download

    hub = hub or Hub()
    for check in checks:
        if check.problem is not None:
            raise ModelInitializationError(check.problem)
    todo = [c for c in checks if c.kind == "hub" and not c.cached]
    total = sum(c.size_bytes or 0 for c in todo)
    if todo:
        print(f"downloading {len(todo)} model(s), {format_size(total)}, into {hub.cache_dir}", file=sys.stderr)
    for check in todo:
        print(f"{check.role}: {check.source} ({format_size(check.size_bytes)})", file=sys.stderr)
        try:
            snapshot_download(check.source, allow_patterns=check.files or None, cache_dir=hub.cache_dir,
                              endpoint=hub.endpoint, token=hub.token or False)
        except Exception as e:
            raise ModelInitializationError(
                f"downloading {check.source} ({check.role}) failed: {first_line(e)}") from e


def format_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def report_lines(checks: list[ModelCheck]) -> list[str]:
    """The human-readable table of `voice-agent models`."""
    lines = []
    for c in checks:
        cached = "" if c.cached is None else (", cached" if c.cached else ", not cached")
        size = "" if c.size_bytes is None else f", {format_size(c.size_bytes)}"
        lines.append(f"{c.role:8} {c.source} ({c.kind}{size}{cached}): {c.status}")
        if c.problem:
            lines.append(f"         {c.problem}")
        elif c.note:
            lines.append(f"         {c.note}")
    return lines
