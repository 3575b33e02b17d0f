"""An in-memory server that speaks enough of the Hugging Face Hub HTTP API for tests.

The real ``huggingface_hub`` client (and therefore timm's ``hf-hub:`` loader and transformers'
``from_pretrained`` / ``push_to_hub``) talks to it over real HTTP on 127.0.0.1, so push/pull code
paths are exercised end to end without any traffic leaving the machine.

What it implements (model, dataset and space repos):

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml`` (README metadata check done by ``create_commit``).
* ``GET /api/{type}s/{repo}`` and ``/api/{type}s/{repo}/revision/{rev}``: repo info with ``sha`` and
  ``siblings`` (``size`` / ``blobId`` with ``?blobs=true``).
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is answered with upload mode ``"regular"``,
  so the client sends contents base64-encoded inside the commit and never takes the LFS or Xet path;
  ``oid`` is the git blob id of the file already at that revision, which lets the client drop unchanged
  files exactly as it does against the real Hub.
* ``POST /api/{type}s/{repo}/commit/{branch}``: the NDJSON commit (``header``, ``file``,
  ``deletedFile``, ``deletedFolder``), with ``parentCommit`` checking.
* ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``, ``GET .../refs``,
  ``GET .../commits/{rev}``, ``POST/DELETE .../branch/{name}``, ``POST .../tag/{rev}``,
  ``DELETE .../tag/{name}``.
* ``HEAD``/``GET /[{type}s/]{repo}/resolve/{rev}/{path}`` with the headers the client relies on
  (``ETag`` = git blob id, ``X-Repo-Commit``, ``Content-Length``) and byte ranges.

Every commit is kept: a revision is a branch name, a tag, or a (prefix of a) commit sha, so
``revision=<old sha>`` keeps returning the old content after later commits. Errors carry the
``X-Error-Code`` header the client maps to ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
``EntryNotFoundError``.

Out of scope: LFS / Xet storage (not needed for test-sized files: preupload never asks for it), pull
requests (``create_pr`` is answered with 501), README card metadata in the repo info, pagination.

Only the standard library is used. The server binds 127.0.0.1 on a free port, serves each connection on
a daemon thread, and shuts itself down after ``max_lifetime_s`` even if nobody calls :meth:`stop`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["Commit", "HubError", "LocalHub", "LocalHubServer", "RecordedRequest", "Repo", "git_blob_sha1"]

DEFAULT_TOKEN = "hf_local_hub_test_token"
DEFAULT_USER = "local-user"

# URL prefix of a repo's web/resolve paths, and the plural used in API paths.
REPO_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}

REPO_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
FULL_SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")
SHORT_SHA_PATTERN = re.compile(r"^[0-9a-f]{7,40}$")

# What the real Hub puts in the first commit of a new repo.
INITIAL_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in ("7z", "bin", "ckpt", "gz", "h5", "msgpack", "npy", "onnx", "pt", "pth", "safetensors", "tar", "zip")
)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ``oid`` / ``blobId`` / ``ETag`` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _iso(moment: datetime) -> str:
    # huggingface_hub's parse_datetime only accepts this exact shape.
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class HubError(Exception):
    """An error answered to the client the way the Hub does (status, JSON body, X-Error-* headers)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields for the JSON body


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    author: str
    date: datetime
    files: Mapping[str, bytes]  # the full snapshot of the repo at this commit: path -> content


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    space_sdk: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # sha -> commit

    @property
    def url_path(self) -> str:
        return REPO_URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> Commit:
        """Branch, tag, full sha, or unambiguous sha prefix -> commit; RevisionNotFound otherwise."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        if sha is None and SHORT_SHA_PATTERN.match(revision):
            matches = [s for s in self.commits if s.startswith(revision)]
            if len(matches) == 1:
                sha = matches[0]
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def history(self, revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commit: Commit | None = self.resolve(revision)
        result = []
        while commit is not None:
            result.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return result


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # percent-decoded URL path
    query: dict[str, list[str]]
    route: str  # which handler answered: "create_repo", "preupload", "commit", "info", "tree", "resolve", ...
    status: int
    authorized: bool  # a valid token was sent


class LocalHubServer:
    """In-memory Hub. ``start()`` binds 127.0.0.1 on a free port; ``endpoint`` is its base URL.

    Args:
        token: the only token accepted for writes and private reads (sent as ``Authorization: Bearer``).
        user: the account name that token belongs to (namespace used when ``create_repo`` gets no owner).
        max_lifetime_s: the server stops by itself after this many seconds, so a test that forgets to stop
            it cannot leave it running.
        max_body_bytes: larger request bodies are refused with 413 (bounds memory use).
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        max_lifetime_s: float = 900.0,
        max_body_bytes: int = 256 * 2**20,
    ):
        if not token:
            raise ValueError("token must be a non-empty string")
        if not REPO_NAME_PATTERN.match(user):
            raise ValueError(f"user {user!r} is not a valid Hub namespace")
        if max_lifetime_s <= 0:
            raise ValueError(f"max_lifetime_s must be positive, got {max_lifetime_s}")
        self.token = token
        self.user = user
        self.max_lifetime_s = max_lifetime_s
        self.max_body_bytes = max_body_bytes
        self.repos: dict[tuple[str, str], Repo] = {}
        self.errors: list[str] = []  # tracebacks of unexpected exceptions (a bug in this server)
        self._requests: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lifetime_timer: threading.Timer | None = None
        self._connections: set[socket.socket] = set()
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LocalHubServer":
        if self._httpd is not None:
            raise RuntimeError("server already started")
        handler = type("BoundHubHandler", (_HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        self._lifetime_timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._lifetime_timer.daemon = True
        self._lifetime_timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections, and free the port. Idempotent."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
            timer, self._lifetime_timer = self._lifetime_timer, None
            connections, self._connections = list(self._connections), set()
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._stopped.set()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "LocalHubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ inspection helpers for tests

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, route: str | None = None, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of requests served, optionally only those of one route / HTTP method / path substring."""
        return sum(
            1
            for r in self.requests
            if (route is None or r.route == route)
            and (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
        )

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the local hub") from None

    def file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            return self.repo(repo_id, repo_type).resolve(revision).files[path]

    # ------------------------------------------------------------------ state changes (called with the lock held)

    def _new_commit(
        self, repo: Repo, parent: Commit | None, files: dict[str, bytes], title: str, message: str
    ) -> Commit:
        self._commit_counter += 1
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_type}/{repo.repo_id}\n{parent.sha if parent else ''}\n".encode())
        digest.update(f"{self._commit_counter}\n{title}\n{message}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        commit = Commit(
            sha=digest.hexdigest(),
            parent=parent.sha if parent else None,
            title=title,
            message=message,
            author=self.user,
            date=datetime.now(timezone.utc),
            files=dict(files),
        )
        repo.commits[commit.sha] = commit
        return commit

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _track_connection(self, conn: socket.socket, opened: bool) -> None:
        with self._lock:
            if opened:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


@dataclass(frozen=True)
class LocalHub:
    """What the ``local_hub`` pytest fixture yields (see tests/conftest.py)."""

    server: LocalHubServer
    endpoint: str  # base URL, e.g. http://127.0.0.1:PORT
    token: str  # accepted for writes and private reads; also exported as HF_TOKEN during the test
    user: str  # namespace owned by ``token``
    home: Path  # HF_HOME used during the test
    cache_dir: Path  # HF_HUB_CACHE used during the test (where hf_hub_download/snapshot_download put files)

    def subprocess_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment in which a child process's huggingface_hub targets this server."""
        env = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_TOKEN=self.token,
            HF_HOME=str(self.home),
            HF_HUB_CACHE=str(self.cache_dir),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        return env


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _header_safe(text: str) -> str:
    # Header values must be latin-1 and single-line.
    return " ".join(text.split()).encode("ascii", "replace").decode("ascii")[:500]


def _validate_repo_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LocalHubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled session expects
    timeout = 30  # an idle keep-alive connection is dropped after this many seconds

    # -------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self.hub._track_connection(self.connection, opened=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.hub._track_connection(self.connection, opened=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        pass  # requests are recorded in hub.requests instead of printed

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        raw_segments = url.path.split("/")[1:]
        segments = [unquote(s) for s in raw_segments]
        query = parse_qs(url.query, keep_blank_values=True)
        route = "unknown"
        status = 500
        authorized = False
        try:
            # Read the whole body first: an error answered with the body unread would corrupt the next
            # request on this keep-alive connection.
            self._body = self._read_body()
            authorized = self._check_token()
            route, handler, args = self._route(segments)
            status = handler(*args, query=query, authorized=authorized)
        except HubError as error:
            status = error.status
            self._send_error(error)
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            status = 500
            self._send_error(HubError(500, "Internal error in the local hub server (see hub.errors)"))
        finally:
            self.hub._record(
                RecordedRequest(
                    method=self.command,
                    path=unquote(url.path),
                    query=query,
                    route=route,
                    status=status,
                    authorized=authorized,
                )
            )

    def _check_token(self) -> bool:
        header = self.headers.get("Authorization")
        if header is None:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or value.strip() != self.hub.token:
            # What the Hub answers to a wrong token, whatever the route.
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_body_bytes:
                    self.close_connection = True
                    raise HubError(413, "Request body too large for the local hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            self.close_connection = True  # the body stays unread: the connection cannot be reused
            raise HubError(413, "Request body too large for the local hub")
        return self.rfile.read(length) if length else b""

    def _read_json(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from None

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json", content_length: int | None = None) -> int:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        return status

    def _send_json(self, value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> int:
        return self._send(status, _json_bytes(value), headers)

    def _send_error(self, error: HubError) -> None:
        headers = dict(error.headers)
        headers["X-Error-Message"] = _header_safe(error.message)
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        try:
            self._send(error.status, _json_bytes({**error.extra, "error": error.message}), headers)
        except OSError:
            pass  # client went away

    # -------------------------------------------------------------- routing

    def _route(self, s: list[str]):
        m = self.command
        if len(s) >= 2 and s[0] == "api":
            if s[1:] == ["whoami-v2"] and m == "GET":
                return "whoami", self._whoami, ()
            if s[1:] == ["validate-yaml"] and m == "POST":
                return "validate_yaml", self._validate_yaml, ()
            if s[1:] == ["repos", "create"] and m == "POST":
                return "create_repo", self._create_repo, ()
            if s[1:] == ["repos", "delete"] and m == "DELETE":
                return "delete_repo", self._delete_repo, ()
            if s[1] == "telemetry":
                return "telemetry", self._ok, ()
            if s[1:] == ["agent-harnesses"] and m == "GET":
                # Fetched once per process by the client's user-agent detection; an empty registry.
                return "agent_harnesses", self._agent_harnesses, ()
            if s[1] in API_REPO_TYPES and len(s) >= 4:
                repo_type, repo_id, rest = API_REPO_TYPES[s[1]], f"{s[2]}/{s[3]}", s[4:]
                key = (repo_type, repo_id)
                if not rest and m == "GET":
                    return "info", self._info, (key, "main")
                if len(rest) == 2 and rest[0] == "revision" and m == "GET":
                    return "info", self._info, (key, rest[1])
                if len(rest) == 2 and rest[0] == "preupload" and m == "POST":
                    return "preupload", self._preupload, (key, rest[1])
                if len(rest) == 2 and rest[0] == "commit" and m == "POST":
                    return "commit", self._commit, (key, rest[1])
                if len(rest) >= 2 and rest[0] == "tree" and m == "GET":
                    return "tree", self._tree, (key, rest[1], "/".join(rest[2:]))
                if len(rest) == 2 and rest[0] == "paths-info" and m == "POST":
                    return "paths_info", self._paths_info, (key, rest[1])
                if rest == ["refs"] and m == "GET":
                    return "refs", self._refs, (key,)
                if len(rest) == 2 and rest[0] == "commits" and m == "GET":
                    return "commits", self._commits, (key, rest[1])
                if len(rest) == 2 and rest[0] == "branch" and m in ("POST", "DELETE"):
                    return "branch", self._branch, (key, rest[1])
                if len(rest) == 2 and rest[0] == "tag" and m in ("POST", "DELETE"):
                    return "tag", self._tag, (key, rest[1])
            raise HubError(404, f"Route not implemented by the local hub: {m} /{'/'.join(s)}")
        # File resolution: /[datasets|spaces/]{namespace}/{name}/resolve/{revision}/{path}
        repo_type = "model"
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = API_REPO_TYPES[s[0]], s[1:]
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return "resolve", self._resolve, ((repo_type, f"{s[0]}/{s[1]}"), s[3], "/".join(s[4:]))
        raise HubError(404, f"Route not implemented by the local hub: {m} /{'/'.join(s)}")

    # -------------------------------------------------------------- access control

    def _readable_repo(self, key: tuple[str, str], authorized: bool) -> Repo:
        repo = self.hub.repos.get(key)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and not authorized:
            # The Hub does not reveal that a private repo exists.
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, key: tuple[str, str], authorized: bool) -> Repo:
        if not authorized:
            raise HubError(401, "You must be authenticated to write to a repo (missing token)")
        return self._readable_repo(key, authorized)

    # -------------------------------------------------------------- handlers

    def _ok(self, *, query, authorized) -> int:
        return self._send_json({})

    def _agent_harnesses(self, *, query, authorized) -> int:
        return self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, *, query, authorized) -> int:
        if not authorized:
            raise HubError(401, "Invalid username or password.")
        return self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(self.hub.user.encode()).hexdigest()[:24],
                "name": self.hub.user,
                "fullname": self.hub.user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
            }
        )

    def _validate_yaml(self, *, query, authorized) -> int:
        payload = self._read_json()
        if not isinstance(payload.get("content"), str):
            raise HubError(400, "validate-yaml expects a 'content' string")
        return self._send_json({"errors": [], "warnings": []})

    def _create_repo(self, *, query, authorized) -> int:
        if not authorized:
            raise HubError(401, "You must be authenticated to create a repo (missing token)")
        payload = self._read_json()
        name, owner = payload.get("name"), payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        for part in (name, owner):
            if not isinstance(part, str) or not REPO_NAME_PATTERN.match(part) or "--" in part or ".." in part:
                raise HubError(400, f"Invalid repo name {owner}/{name}: use letters, digits, '-', '_', '.'")
        if repo_type == "space" and payload.get("sdk") is None:
            raise HubError(400, "A space needs an sdk")
        visibility = payload.get("visibility")
        private = bool(payload.get("private")) if visibility is None else visibility != "public"
        repo_id = f"{owner}/{name}"
        with self.hub._lock:
            existing = self.hub.repos.get((repo_type, repo_id))
            if existing is not None:
                # create_repo(exist_ok=True) reads the url from this answer.
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}",
                               extra={"url": f"{self.hub.endpoint}/{existing.url_path}"})
            repo = Repo(repo_type, repo_id, private, datetime.now(timezone.utc), space_sdk=payload.get("sdk"))
            initial = self.hub._new_commit(repo, None, {".gitattributes": INITIAL_GITATTRIBUTES}, "initial commit", "")
            repo.branches["main"] = initial.sha
            self.hub.repos[(repo_type, repo_id)] = repo
        return self._send_json({"url": f"{self.hub.endpoint}/{repo.url_path}", "name": repo_id, "id": initial.sha[:24]})

    def _delete_repo(self, *, query, authorized) -> int:
        payload = self._read_json()
        owner = payload.get("organization") or self.hub.user
        key = (payload.get("type") or "model", f"{owner}/{payload.get('name')}")
        with self.hub._lock:
            self._writable_repo(key, authorized)
            del self.hub.repos[key]
        return self._send_json({})

    def _info(self, key, revision, *, query, authorized) -> int:
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            commit = repo.resolve(revision)
        with_blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.url_path.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(content) for content in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info.update(sdk=repo.space_sdk, runtime={"stage": "NO_APP_FILE", "hardware": None})
        return self._send_json(info)

    def _preupload(self, key, revision, *, query, authorized) -> int:
        payload = self._read_json()
        if query.get("create_pr"):
            raise HubError(501, "Pull requests are not supported by the local hub")
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload expects a 'files' list")
        with self.hub._lock:
            repo = self._writable_repo(key, authorized)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
        answers = []
        for entry in files:
            path = _validate_repo_path(entry.get("path") if isinstance(entry, dict) else None)
            existing = head.files.get(path)
            answers.append(
                {
                    "path": path,
                    # Regular git blobs only: keeps the client off the LFS/Xet upload protocols.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        return self._send_json({"files": answers, "commitOid": head.sha})

    def _commit(self, key, revision, *, query, authorized) -> int:
        if query.get("create_pr"):
            raise HubError(501, "Pull requests are not supported by the local hub")
        try:
            lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        except ValueError as error:
            raise HubError(400, f"Commit payload is not valid NDJSON: {error}") from None
        if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "Commit summary must be a non-empty string")
        with self.hub._lock:
            repo = self._writable_repo(key, authorized)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            expected_parent = header.get("parentCommit")
            if expected_parent is not None and expected_parent != parent.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                kind = line.get("key") if isinstance(line, dict) else None
                value = (line.get("value") if isinstance(line, dict) else None) or {}
                if kind not in ("file", "deletedFile", "deletedFolder", "lfsFile"):
                    raise HubError(400, f"Unknown commit operation {kind!r}")
                raw_path = value.get("path")
                if kind == "deletedFolder" and isinstance(raw_path, str):
                    raw_path = raw_path.rstrip("/")  # folders may be sent with a trailing slash
                path = _validate_repo_path(raw_path)
                if kind == "file":
                    if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                        raise HubError(400, f"File {path!r}: only base64-encoded 'content' is supported")
                    try:
                        files[path] = base64.b64decode(value["content"], validate=True)
                    except ValueError:
                        raise HubError(400, f"File {path!r}: content is not valid base64") from None
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif kind == "deletedFolder":
                    inside = [p for p in files if p.startswith(path + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
                else:  # lfsFile
                    raise HubError(400, f"File {path!r}: LFS files are not supported (preupload answers 'regular')")
            commit = self.hub._new_commit(repo, parent, files, title, header.get("description") or "")
            repo.branches[revision] = commit.sha
        return self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.endpoint}/{repo.url_path}/commit/{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _entries(self, repo: Repo, commit: Commit, prefix: str, recursive: bool, expand: bool) -> list[dict]:
        """Tree entries under ``prefix`` (files and directories), as the tree/paths-info endpoints return them."""
        base = prefix + "/" if prefix else ""
        files, folders = {}, set()
        for path, content in commit.files.items():
            if not path.startswith(base):
                continue
            relative = path[len(base):].split("/")
            for depth in range(1, len(relative)):
                if recursive or depth == 1:
                    folders.add(base + "/".join(relative[:depth]))
            if recursive or len(relative) == 1:
                files[path] = content
        entries = [self._folder_entry(repo, commit, folder, expand) for folder in sorted(folders)]
        entries += [self._file_entry(repo, commit, path, expand) for path in sorted(files)]
        return entries

    def _file_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        content = commit.files[path]
        entry = {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, lambda c: c.files.get(path))
        return entry

    def _folder_entry(self, repo: Repo, commit: Commit, folder: str, expand: bool) -> dict:
        def listing(c: Commit) -> tuple:
            return tuple(sorted((p, git_blob_sha1(v)) for p, v in c.files.items() if p.startswith(folder + "/")))

        tree_id = hashlib.sha1(repr(listing(commit)).encode()).hexdigest()
        entry = {"type": "directory", "oid": tree_id, "size": 0, "path": folder}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, listing)
        return entry

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, state) -> dict:
        """The newest commit at or before ``commit`` that changed ``state`` (like git log -1 -- path)."""
        current = commit
        while current.parent is not None and state(repo.commits[current.parent]) == state(current):
            current = repo.commits[current.parent]
        return {"id": current.sha, "title": current.title, "date": _iso(current.date)}

    def _tree(self, key, revision, path, *, query, authorized) -> int:
        recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[-1].lower() in ("1", "true")
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            commit = repo.resolve(revision)
            entries = self._entries(repo, commit, path.strip("/"), recursive, expand)
        if path.strip("/") and not entries:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return self._send_json(entries)

    def _paths_info(self, key, revision, *, query, authorized) -> int:
        form = parse_qs(self._body.decode(), keep_blank_values=True)
        expand = form.get("expand", ["False"])[-1].lower() in ("1", "true")
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            commit = repo.resolve(revision)
            result = []
            for path in form.get("paths", []):
                path = path.strip("/")
                if path in commit.files:
                    result.append(self._file_entry(repo, commit, path, expand))
                elif any(p.startswith(path + "/") for p in commit.files):
                    result.append(self._folder_entry(repo, commit, path, expand))
        return self._send_json(result)

    def _refs(self, key, *, query, authorized) -> int:
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items())
            ]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
        return self._send_json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _commits(self, key, revision, *, query, authorized) -> int:
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            history = repo.history(revision)
        return self._send_json(
            [
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.date),
                }
                for c in history
            ]
        )

    def _branch(self, key, branch, *, query, authorized) -> int:
        payload = self._read_json() if self.command == "POST" else None
        with self.hub._lock:
            repo = self._writable_repo(key, authorized)
            if self.command == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json({})
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
        return self._send_json({})

    def _tag(self, key, name, *, query, authorized) -> int:
        payload = self._read_json() if self.command == "POST" else None
        with self.hub._lock:
            repo = self._writable_repo(key, authorized)
            if self.command == "DELETE":
                if repo.tags.pop(name, None) is None:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                return self._send_json({})
            # POST .../tag/{revision} with {"tag": name}: `name` is the revision being tagged here.
            tag = payload.get("tag")
            if not isinstance(tag, str) or not tag:
                raise HubError(400, "create tag expects a 'tag' name")
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = repo.resolve(name).sha
        return self._send_json({})

    def _resolve(self, key, revision, path, *, query, authorized) -> int:
        with self.hub._lock:
            repo = self._readable_repo(key, authorized)
            commit = repo.resolve(revision)
        content = commit.files.get(path)
        if content is None:
            # The client caches the miss per commit, so the commit header matters here too.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        status, start, end = 200, 0, len(content)
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if match is None or not (match.group(1) or match.group(2)):
                raise HubError(400, f"Unsupported Range header: {wanted}")
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, len(content)) if match.group(2) else len(content)
            else:  # suffix range: the last N bytes
                start = max(len(content) - int(match.group(2)), 0)
            if start >= len(content) and len(content) > 0:
                raise HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{len(content)}"
        return self._send(status, content[start:end], headers, content_type="application/octet-stream")
