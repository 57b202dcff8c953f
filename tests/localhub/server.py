"""A small, real HTTP server speaking the part of the Hugging Face Hub API that `huggingface_hub` uses.

Tests point the unpatched client at it to exercise uploads, downloads and failure handling without network
access. Stdlib only. Set ``HF_ENDPOINT=hub.endpoint`` before importing huggingface_hub: ``endpoint=`` is
enough for reads, but the client parses commit URLs against ``HF_ENDPOINT`` and fails every commit otherwise
(bind a known port with ``LocalHub(..., port=N)`` for that).

Tests read what reached it (``hub.requests``: every request as (method, path), refused ones included;
``hub.connections``; ``hub.calls(route)``) and steer it (``fail``, ``slow``, ``hold``/``release``).

Storage lives under ``data_dir`` so state survives a killed client (or a restarted server)::

    repos/<model|dataset|space>/<ns>/<name>/
        meta.json               private flag, creation date
        refs/heads/<branch>     commit sha; replaced atomically, the only thing that makes a commit visible
        commits/<sha>.json      immutable: parents, message, full {path: entry} tree
        objects/<git-sha1>      content of regular files
        lfs/<sha256>            content of LFS files, only ever renamed into place after the hash was checked
        tmp/                    partial uploads
"""

import argparse
import base64
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import socket
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# Route labels accepted by LocalHub.fail / LocalHub.slow / LocalHub.hold and POST /_test/fail.
ROUTES = (
    "whoami",
    "create_repo",
    "validate_yaml",
    "repo_info",
    "tree",
    "paths_info",
    "commits",
    "preupload",
    "commit",
    "lfs_batch",
    "lfs_upload",
    "lfs_verify",
    "lfs_download",
    "resolve",
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_BODY = 256 * 1024 * 1024  # JSON/NDJSON bodies are held in memory; LFS uploads are streamed
_DRAIN_LIMIT = 16 * 1024 * 1024  # beyond this an unread body is not worth draining: close the connection
_CHUNK = 64 * 1024


class HubError(Exception):
    """An HTTP error the way the Hub reports it: JSON body plus X-Error-Code/X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _atomic_write(path: Path, data: bytes) -> None:
    # Readers never see a half-written file: they get the old version or the new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_path(path: Any) -> str:
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or "\0" in path or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _check_repo_id(ns: str, name: str) -> str:
    valid = _NAME_RE.fullmatch(ns) and _NAME_RE.fullmatch(name)
    if not valid or ".." in ns + name or name.endswith(".git"):
        raise HubError(400, f"Invalid repo id: {ns}/{name}")
    return f"{ns}/{name}"


class _Store:
    """Repositories on disk. Mutations take one lock; reads rely on immutable files and atomic ref swaps."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()

    def dir(self, rtype: str, repo_id: str) -> Path:
        return self.root / "repos" / rtype / repo_id

    def exists(self, rtype: str, repo_id: str) -> bool:
        return (self.dir(rtype, repo_id) / "refs" / "heads" / "main").is_file()

    def meta(self, rtype: str, repo_id: str) -> dict:
        if not self.exists(rtype, repo_id):
            raise _repo_not_found()
        return json.loads((self.dir(rtype, repo_id) / "meta.json").read_text())

    def create(self, rtype: str, repo_id: str, private: bool, user: str, extra: dict) -> bool:
        with self.lock:
            if self.exists(rtype, repo_id):
                return False
            _atomic_write(
                self.dir(rtype, repo_id) / "meta.json",
                json.dumps({"private": private, "createdAt": _now(), **extra}).encode(),
            )
            # Like the real Hub, a new repo starts with one commit holding a .gitattributes file.
            ops = [
                {
                    "key": "file",
                    "value": {
                        "path": ".gitattributes",
                        "encoding": "base64",
                        "content": base64.b64encode(INITIAL_GITATTRIBUTES).decode(),
                    },
                }
            ]
            self._commit_locked(rtype, repo_id, "main", None, {"summary": "initial commit"}, ops, user)
            return True

    def branch_head(self, rtype: str, repo_id: str, branch: str) -> str | None:
        ref = self.dir(rtype, repo_id) / "refs" / "heads" / branch
        return ref.read_text().strip() if _BRANCH_RE.fullmatch(branch) and ref.is_file() else None

    def resolve(self, rtype: str, repo_id: str, rev: str) -> str:
        if not self.exists(rtype, repo_id):
            raise _repo_not_found()
        sha = self.branch_head(rtype, repo_id, rev)
        if sha is None and _SHA1_RE.fullmatch(rev) and self._commit_file(rtype, repo_id, rev).is_file():
            sha = rev
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _commit_file(self, rtype: str, repo_id: str, sha: str) -> Path:
        return self.dir(rtype, repo_id) / "commits" / f"{sha}.json"

    def commit_obj(self, rtype: str, repo_id: str, sha: str) -> dict:
        return json.loads(self._commit_file(rtype, repo_id, sha).read_text())

    def log(self, rtype: str, repo_id: str, sha: str | None) -> list[dict]:
        out = []
        while sha:
            commit = self.commit_obj(rtype, repo_id, sha)
            out.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return out

    def content_path(self, rtype: str, repo_id: str, entry: dict) -> Path:
        if entry["lfs"]:
            return self.lfs_path(rtype, repo_id, entry["lfs"]["sha256"])
        return self.dir(rtype, repo_id) / "objects" / entry["oid"]

    def lfs_path(self, rtype: str, repo_id: str, sha256: str) -> Path:
        return self.dir(rtype, repo_id) / "lfs" / sha256

    def has_lfs(self, rtype: str, repo_id: str, sha256: str, size: int | None = None) -> bool:
        path = self.lfs_path(rtype, repo_id, sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def commit(self, rtype: str, repo_id: str, branch: str, header: dict, ops: list[dict], user: str) -> str:
        with self.lock:
            parent = self.branch_head(rtype, repo_id, branch)
            if parent is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            return self._commit_locked(rtype, repo_id, branch, parent, header, ops, user)

    def _commit_locked(
        self,
        rtype: str,
        repo_id: str,
        branch: str,
        parent: str | None,
        header: dict,
        ops: list[dict],
        user: str,
    ) -> str:
        tree = dict(self.commit_obj(rtype, repo_id, parent)["tree"]) if parent else {}
        blobs: dict[str, bytes] = {}
        # Stage: validate every operation in memory first, so a bad one leaves nothing behind.
        for op in ops:
            key, value = op.get("key"), op.get("value")
            if not isinstance(value, dict):
                raise HubError(400, f"Commit operation without a value: {op!r:.200}")
            path = value.get("path")
            if key == "deletedFolder" and isinstance(path, str):
                path = path.rstrip("/")  # the client keeps the trailing "/" that marks a folder
            _check_path(path)
            if key == "file":
                raw = value.get("content", "")
                try:
                    b64 = value.get("encoding") == "base64"
                    data = base64.b64decode(raw, validate=True) if b64 else raw.encode()
                except (ValueError, TypeError, AttributeError) as e:
                    raise HubError(400, f"Invalid content for {path}") from e
                oid = _git_blob_sha1(data)
                blobs[oid] = data
                tree[path] = {"oid": oid, "size": len(data), "lfs": None}
            elif key == "lfsFile":
                sha256 = value.get("oid")
                if (
                    value.get("algo", "sha256") != "sha256"
                    or not isinstance(sha256, str)
                    or not _SHA256_RE.fullmatch(sha256)
                    or not self.has_lfs(rtype, repo_id, sha256)
                ):
                    raise HubError(
                        400,
                        "Your push was rejected because an LFS pointer pointed to a file "
                        f"that does not exist: {path} ({sha256})",
                    )
                size = self.lfs_path(rtype, repo_id, sha256).stat().st_size
                if value.get("size", size) != size:
                    raise HubError(400, f"LFS object size mismatch for {path}")
                pointer = _lfs_pointer(sha256, size)
                tree[path] = {
                    "oid": _git_blob_sha1(pointer),
                    "size": size,
                    "lfs": {"sha256": sha256, "size": size, "pointerSize": len(pointer)},
                }
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [p for p in tree if p.startswith(path + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        repo_dir = self.dir(rtype, repo_id)
        for oid, data in blobs.items():  # content-addressed, so unreachable until the ref moves
            if not (repo_dir / "objects" / oid).is_file():
                _atomic_write(repo_dir / "objects" / oid, data)
        commit = {
            "parents": [parent] if parent else [],
            "title": header.get("summary") or "",
            "message": header.get("description") or "",
            "date": _now(),
            "authors": [user],
            "tree": dict(sorted(tree.items())),
        }
        sha = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        _atomic_write(self._commit_file(rtype, repo_id, sha), json.dumps({"id": sha, **commit}).encode())
        _atomic_write(repo_dir / "refs" / "heads" / branch, sha.encode())  # the commit point
        return sha


class _Faults:
    """Injected failures and delays, keyed by route label."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fail: dict[str, list] = {}
        self._delay: dict[str, float] = {}
        self._gates: dict[str, threading.Event] = {}
        self._calls: Counter = Counter()

    def fail(self, route: str, times: int, mode: str) -> None:
        mode = str(mode)
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
        if mode != "drop" and not (mode.isdigit() and 400 <= int(mode) <= 599):
            raise ValueError(f"mode must be 'drop' or an HTTP error status, got {mode!r}")
        with self._lock:
            self._fail[route] = [int(times), mode]

    def slow(self, route: str, delay_s: float) -> None:
        if route not in ROUTES or not 0 <= float(delay_s) <= 600:
            raise ValueError(f"bad slow() arguments: {route!r}, {delay_s!r}")
        with self._lock:
            self._delay[route] = float(delay_s)

    def hold(self, route: str) -> None:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
        with self._lock:
            self._gates.setdefault(route, threading.Event())

    def release(self, route: str | None = None) -> None:
        """Open the gate of `route` (every gate when None): held requests go on, new ones pass."""
        with self._lock:
            gates = list(self._gates.values()) if route is None else [self._gates.get(route)]
            self._gates = {} if route is None else {r: g for r, g in self._gates.items() if r != route}
        for gate in gates:
            if gate is not None:
                gate.set()

    def gate(self, route: str) -> threading.Event | None:
        with self._lock:
            return self._gates.get(route)

    def hit(self, route: str) -> str | None:
        """Count a request and return the failure mode to inject into it, if any."""
        with self._lock:
            self._calls[route] += 1
            plan = self._fail.get(route)
            if not plan or plan[0] <= 0:
                return None
            plan[0] -= 1
            return plan[1]

    def delay(self, route: str) -> float:
        with self._lock:
            return self._delay.get(route, 0.0)

    def calls(self, route: str) -> int:
        with self._lock:
            return self._calls[route]


_API_REPO = r"/api/(?P<t>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"/(?:(?P<t>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)"
# (methods, path regex, route label, auth) where auth is "write" (token required), "read" (token optional,
# needed for private repos) or "signed" (the URL carries an HMAC, like a presigned S3 URL, because the client
# sends no token with LFS transfers).
_TABLE = [
    ("GET", r"/api/whoami-v2", "whoami", "write"),
    ("POST", r"/api/repos/create", "create_repo", "write"),
    ("POST", r"/api/validate-yaml", "validate_yaml", "read"),
    ("POST", r"/_test/(?:fail|slow)", "_test", "write"),
    ("GET", _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info", "read"),
    ("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", "read"),
    ("GET", _API_REPO + r"/commits/(?P<rev>[^/]+)", "commits", "read"),
    ("POST", _API_REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info", "read"),
    ("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)", "preupload", "write"),
    ("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)", "commit", "write"),
    ("POST", _GIT_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch", "write"),
    ("POST", _GIT_REPO + r"\.git/info/lfs/objects/verify", "lfs_verify", "write"),
    ("PUT", _GIT_REPO + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_upload", "signed"),
    ("GET HEAD", _GIT_REPO + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_download", "signed"),
    ("GET HEAD", _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "read"),
]
_TABLE_RE = [(methods.split(), re.compile(rx), label, auth) for methods, rx, label, auth in _TABLE]


def _route(method: str, path: str) -> tuple[str, str, dict[str, str]]:
    """(label, auth, captured URL parts) of the route serving this request."""
    for methods, rx, label, auth in _TABLE_RE:
        match = rx.fullmatch(path)
        if match and method in methods:
            return label, auth, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
    raise HubError(404, f"No route for {method} {path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        port: int,
        data_dir: Path,
        token: str,
        user: str,
        lfs_threshold: int,
        page_size: int,
        verbose: bool,
    ):
        super().__init__(("127.0.0.1", port), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.store = _Store(data_dir)
        self.faults = _Faults()
        self.token, self.user, self.verbose = token, user, verbose
        self.lfs_threshold, self.page_size = lfs_threshold, page_size
        self.secret = secrets.token_bytes(32)  # signs LFS URLs; never leaves the process
        self.stopping = threading.Event()  # wakes up injected delays at shutdown
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        # What reached this hub, for tests that assert a client made no request (or exactly these)
        self.accepted = 0  # connections accepted
        self.request_log: list[tuple[str, str]] = []  # (method, path without query) of every request read

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def log_request_line(self, method: str, path: str) -> None:
        with self._conns_lock:
            self.request_log.append((method, path))

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        # Kept-alive connections would otherwise go on being served by this stopped hub, e.g. after a new
        # hub took over the same port.
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.verbose:
            traceback.print_exc(file=sys.stderr)

    def sign(self, *parts: object) -> str:
        return hmac.new(self.secret, ":".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def _file_item(tree: dict, path: str) -> dict:
    """A file as the tree and paths-info routes describe it."""
    entry = tree[path]
    item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        lfs = entry["lfs"]
        item["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return item


def _folder_item(tree: dict, path: str) -> dict:
    # Not git's tree hash, but like it, it changes exactly when something below the folder changes.
    below = [(p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/")]
    oid = hashlib.sha1(json.dumps(below).encode()).hexdigest()
    return {"type": "directory", "size": 0, "path": path, "oid": oid}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60  # per-socket-operation bound: a stalled or vanished peer frees its thread
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        # Never log headers (they carry the token) nor queries (they carry URL signatures).
        if self.server.verbose:
            status = args[1] if len(args) > 1 else ""
            sys.stderr.write(f"hub: {self.command} {urlsplit(self.path).path} {status}\n")

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # unrouted ones get a 404

    # ---- plumbing -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.server.log_request_line(self.command, url.path)  # before any check: refused requests count too
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = self.headers.get("Content-Length") or "0"
        self._unread = int(length) if length.isdigit() else 0
        self._route, self._started = "", False
        try:
            if not length.isdigit() or self.headers.get("Transfer-Encoding"):
                self.close_connection = True  # the body's extent is unknown: the stream can't be reused
                raise HubError(411, "A valid Content-Length is required")
            label, auth, args = _route(self.command, url.path)
            self._route = label
            self._authorize(auth, args)
            mode = self.server.faults.hit(label) if label != "_test" else None
            if mode == "drop":
                return self._drop()
            if mode is not None:
                self._read_body()
                raise HubError(int(mode), f"Injected failure on {label}")
            if self._unread == 0:
                self._pause()
            getattr(self, "_h_" + label.lstrip("_"))(**args)
        except HubError as e:
            if self._started:  # too late for an error response: hang up so the client sees a broken transfer
                self.close_connection = True
                return
            body = json.dumps({"error": e.message}).encode()
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._reply(e.status, body, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug in this server: answer 500 rather than hang up silently
            traceback.print_exc(file=sys.stderr)
            if self._started:
                self.close_connection = True
            else:
                self._reply(500, b'{"error": "internal server error"}')

    def _authorize(self, auth: str, args: dict) -> None:
        sent = self.headers.get("Authorization")
        good = sent is not None and hmac.compare_digest(sent.encode(), f"Bearer {self.server.token}".encode())
        if sent is not None and not good and auth != "signed":
            raise HubError(401, "Invalid credentials in Authorization header")
        if auth == "write" and not good:
            raise HubError(401, "Authentication required: pass a token in the Authorization header")
        if "t" in args or "ns" in args:
            args["rtype"] = REPO_TYPES.get(args.pop("t", None) or "", "model")
            args["repo_id"] = _check_repo_id(args.pop("ns"), args.pop("name"))
            if (
                auth == "read"
                and not good
                and self.server.store.exists(args["rtype"], args["repo_id"])
                and self.server.store.meta(args["rtype"], args["repo_id"])["private"]
            ):
                raise _repo_not_found()  # as the Hub does: a private repo is invisible without a token
        if auth == "signed":
            size, upload = self.query.get("size", ""), self.command == "PUT"
            expected = self.server.sign(upload, args["rtype"], args["repo_id"], args["oid"], size)
            if not hmac.compare_digest(self.query.get("sig", ""), expected):
                raise HubError(403, "Invalid or missing URL signature")

    def _pause(self) -> None:
        gate = self.server.faults.gate(self._route)
        if gate is not None:
            gate.wait()  # opened by LocalHub.release, or by stop()
        delay = self.server.faults.delay(self._route)
        if delay:
            self.server.stopping.wait(delay)

    def _body_chunks(self, pause: bool = True) -> Iterator[bytes]:
        # An injected delay lands half-way through the body, so a test can kill a client mid-upload.
        total, half = self._unread, self._unread // 2
        while self._unread:
            done = total - self._unread
            if pause and done >= half:
                self._pause()
                pause = False
            chunk = self.rfile.read(min(_CHUNK, self._unread, half - done if pause else _CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            self._unread -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        if self._unread > _MAX_BODY:
            raise HubError(413, "Request body too large")
        return b"".join(self._body_chunks())

    def _json_body(self) -> dict:
        try:
            body = json.loads(self._read_body() or b"{}")
        except ValueError as e:
            raise HubError(400, "Body is not valid JSON") from e
        if not isinstance(body, dict):
            raise HubError(400, "Body must be a JSON object")
        return body

    def _drop(self) -> None:
        # Read part of the body, then hang up without answering, like a connection lost mid-transfer.
        self.rfile.read(min(self._unread // 2, _DRAIN_LIMIT))
        self.close_connection = True

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self._start(status, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, headers: dict | None = None, content_type: str = "application/json") -> None:
        self._reply(200, json.dumps(obj).encode(), headers, content_type)

    def _start(self, status: int, headers: dict) -> None:
        # Leftover body bytes would be parsed as the next request on this keep-alive connection.
        if 0 < self._unread <= _DRAIN_LIMIT:
            try:
                for _ in self._body_chunks(pause=False):
                    pass
            except (ConnectionError, TimeoutError):
                pass
        if self._unread or self.close_connection:
            self.close_connection = True
            headers = {**headers, "Connection": "close"}
        self._started = True
        self.send_response(status)
        for key, value in headers.items():
            # Messages echo client input (paths): keep CR/LF and non-Latin-1 text out of the header block.
            self.send_header(key, re.sub(r"[^\x20-\x7e]", "?", str(value)))
        self.end_headers()

    def _send_file(self, path: Path, headers: dict) -> None:
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range") if self.command == "GET" else None
        if rng:  # single ranges only, which is all the client asks for when resuming
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m and m[2]:
                start = max(0, size - int(m[2]))
            if not m or not (m[1] or m[2]) or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, headers = 206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        self._start(
            status,
            {
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
                "Content-Length": str(end - start + 1),
                **headers,
            },
        )
        if self.command == "GET":
            with path.open("rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _repo_url(self, rtype: str, repo_id: str) -> str:
        return f"{self.server.endpoint}/{URL_PREFIX[rtype]}{repo_id}"

    def _lfs_href(self, rtype: str, repo_id: str, oid: str, upload: bool, size: int | str = "") -> str:
        query = {"size": size} if upload else {}
        query["sig"] = self.server.sign(upload, rtype, repo_id, oid, size)
        return f"{self._repo_url(rtype, repo_id)}.git/info/lfs/objects/{oid}?{urlencode(query)}"

    def _paginate(self, items: list) -> None:
        # The Link header pagination of the real Hub, so the client's paginate() is exercised too.
        offset = int(self.query.get("cursor", "0")) if self.query.get("cursor", "0").isdigit() else 0
        page, headers = items[offset : offset + self.server.page_size], {}
        if offset + self.server.page_size < len(items):
            query = urlencode({**self.query, "cursor": offset + self.server.page_size})
            headers["Link"] = f'<{self.server.endpoint}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._json(page, headers)

    def _flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true")

    # ---- routes -----------------------------------------------------------------------------------------

    def _h_whoami(self) -> None:
        self._read_body()
        user = self.server.user
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": "write"},
                },
            }
        )

    def _h_test(self) -> None:
        body = self._json_body()
        try:
            if "delay_s" in body:
                self.server.faults.slow(body.get("route", ""), body["delay_s"])
            else:
                self.server.faults.fail(body.get("route", ""), body.get("times", 1), body.get("mode", "500"))
        except (ValueError, TypeError) as e:
            raise HubError(400, str(e)) from e
        self._json({"ok": True})

    def _h_validate_yaml(self) -> None:
        self._json_body()
        self._json({"errors": [], "warnings": []})

    def _h_create_repo(self) -> None:
        body = self._json_body()
        rtype = body.get("type") or "model"
        if rtype not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {rtype}")
        repo_id = _check_repo_id(body.get("organization") or self.server.user, str(body.get("name", "")))
        extra = {"sdk": body["sdk"]} if rtype == "space" and body.get("sdk") else {}
        url = self._repo_url(rtype, repo_id)
        if not self.server.store.create(rtype, repo_id, bool(body.get("private")), self.server.user, extra):
            # The client reads "url" from this 409 body when exist_ok=True.
            message = f"You already created this {rtype} repo"
            return self._reply(
                409, json.dumps({"error": message, "url": url}).encode(), {"X-Error-Message": message}
            )
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _h_repo_info(self, rtype: str, repo_id: str, rev: str = "main") -> None:
        store = self.server.store
        sha = store.resolve(rtype, repo_id, rev)
        meta, commit = store.meta(rtype, repo_id), store.commit_obj(rtype, repo_id, sha)
        siblings = []
        for path, entry in commit["tree"].items():
            sibling: dict[str, Any] = {"rfilename": path}
            if self._flag("blobs"):
                sibling.update(size=entry["size"], blobId=entry["oid"], lfs=entry["lfs"])
            siblings.append(sibling)
        self._json(
            {
                "_id": hashlib.sha1(f"{rtype}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": meta["createdAt"],
                "private": meta["private"],
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
                **({"sdk": meta["sdk"]} if "sdk" in meta else {}),
            }
        )

    def _h_tree(self, rtype: str, repo_id: str, rev: str, path: str = "") -> None:
        store = self.server.store
        sha = store.resolve(rtype, repo_id, rev)
        tree = store.commit_obj(rtype, repo_id, sha)["tree"]
        base = path.strip("/")
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": sha})
        recursive = self._flag("recursive")
        files, dirs = [], set()
        for p in tree:
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(_file_item(tree, p))
        self._paginate([_folder_item(tree, d) for d in sorted(dirs)] + files)

    def _h_paths_info(self, rtype: str, repo_id: str, rev: str) -> None:
        form = parse_qs(self._read_body().decode(errors="replace"))
        store = self.server.store
        tree = store.commit_obj(rtype, repo_id, store.resolve(rtype, repo_id, rev))["tree"]
        items = []
        for path in dict.fromkeys(p.strip("/") for p in form.get("paths", [])):
            if path in tree:
                items.append(_file_item(tree, path))
            elif path and any(p.startswith(path + "/") for p in tree):
                items.append(_folder_item(tree, path))
        self._json(items)  # paths that do not exist are left out, as on the Hub

    def _h_commits(self, rtype: str, repo_id: str, rev: str) -> None:
        store = self.server.store
        items = []
        for c in store.log(rtype, repo_id, store.resolve(rtype, repo_id, rev)):
            item = {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": a, "avatar": None} for a in c["authors"]],
            }
            if "formatted" in self.query.get("expand[]", ""):
                item["formatted"] = {"title": html.escape(c["title"]), "message": html.escape(c["message"])}
            items.append(item)
        self._paginate(items)

    def _h_preupload(self, rtype: str, repo_id: str, rev: str) -> None:
        body = self._json_body()
        store = self.server.store
        tree = store.commit_obj(rtype, repo_id, store.resolve(rtype, repo_id, rev))["tree"]
        files = []
        for f in body.get("files") or []:
            path, size = _check_path(f.get("path")), f.get("size")
            if not isinstance(size, int) or size < 0:
                raise HubError(400, f"Invalid size for {path}")
            item = {
                "path": path,
                "uploadMode": "lfs" if size > self.server.lfs_threshold else "regular",
                "shouldIgnore": False,
            }
            if path in tree:  # lets the client skip unchanged files (sha256 for LFS, git sha1 otherwise)
                entry = tree[path]
                item["oid"] = entry["lfs"]["sha256"] if entry["lfs"] else entry["oid"]
            files.append(item)
        self._json({"files": files})

    def _h_commit(self, rtype: str, repo_id: str, rev: str) -> None:
        body = self._read_body()
        if not self.server.store.exists(rtype, repo_id):
            raise _repo_not_found()
        if self._flag("create_pr"):
            raise HubError(400, "This local hub does not support pull requests")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, "Body is not valid NDJSON") from e
        if (
            not lines
            or not isinstance(lines[0], dict)
            or lines[0].get("key") != "header"
            or not all(isinstance(line, dict) for line in lines)
        ):
            raise HubError(400, "The first NDJSON line must be the commit header")
        sha = self.server.store.commit(
            rtype, repo_id, rev, lines[0].get("value") or {}, lines[1:], self.server.user
        )
        url = f"{self._repo_url(rtype, repo_id)}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _h_lfs_batch(self, rtype: str, repo_id: str) -> None:
        body = self._json_body()
        store = self.server.store
        if not store.exists(rtype, repo_id):
            raise _repo_not_found()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            valid = isinstance(oid, str) and _SHA256_RE.fullmatch(oid)
            if not (valid and isinstance(size, int) and size >= 0):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
            elif store.has_lfs(rtype, repo_id, oid, size):
                objects.append({"oid": oid, "size": size})  # no "actions": already uploaded
            else:
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": self._lfs_href(rtype, repo_id, oid, True, size)},
                            "verify": {
                                "href": f"{self._repo_url(rtype, repo_id)}.git/info/lfs/objects/verify"
                            },
                        },
                    }
                )
        # Omitting "xet" from "transfer" makes an hf_xet-enabled client fall back to this basic transfer.
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _h_lfs_upload(self, rtype: str, repo_id: str, oid: str) -> None:
        store = self.server.store
        size = int(self.query["size"])
        if self._unread != size:
            raise HubError(400, f"Expected {size} bytes, got Content-Length {self._unread}")
        tmp = store.dir(rtype, repo_id) / "tmp" / f"{oid}.{secrets.token_hex(4)}.part"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            digest = hashlib.sha256()
            with tmp.open("wb") as f:
                for chunk in self._body_chunks():
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != oid:
                raise HubError(400, "Uploaded content does not match its sha256 oid")
            store.lfs_path(rtype, repo_id, oid).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, store.lfs_path(rtype, repo_id, oid))
        finally:
            tmp.unlink(missing_ok=True)
        self._reply(200, headers={"ETag": f'"{oid}"'})

    def _h_lfs_verify(self, rtype: str, repo_id: str) -> None:
        body = self._json_body()
        oid = body.get("oid")
        valid = isinstance(oid, str) and _SHA256_RE.fullmatch(oid)
        if not valid or not self.server.store.has_lfs(rtype, repo_id, oid, body.get("size")):
            raise HubError(404, "LFS object not found or size mismatch")
        self._json({"success": True})

    def _h_lfs_download(self, rtype: str, repo_id: str, oid: str) -> None:
        if not self.server.store.has_lfs(rtype, repo_id, oid):
            raise HubError(404, "LFS object not found")
        self._send_file(self.server.store.lfs_path(rtype, repo_id, oid), {"ETag": f'"{oid}"'})

    def _h_resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        store = self.server.store
        sha = store.resolve(rtype, repo_id, rev)
        entry = store.commit_obj(rtype, repo_id, sha)["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            # Like the Hub: LFS content redirects to a signed "CDN" URL. The client takes etag and size from
            # X-Linked-* on this response, as it does not follow absolute redirects on HEAD.
            lfs = entry["lfs"]
            headers.update(
                {
                    "Location": self._lfs_href(rtype, repo_id, lfs["sha256"], False),
                    "X-Linked-Etag": f'"{lfs["sha256"]}"',
                    "X-Linked-Size": str(lfs["size"]),
                }
            )
            return self._reply(302, b"", headers)
        self._send_file(store.content_path(rtype, repo_id, entry), headers)


class LocalHub:
    """A local Hub on 127.0.0.1 (port 0: the OS picks one), served from a daemon thread. Usage::

    with LocalHub(tmp_path, token="hf_test", lfs_threshold=1_000_000) as hub:
        HfApi(endpoint=hub.endpoint, token="hf_test").whoami()
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        token: str,
        *,
        user: str = "test-user",
        lfs_threshold: int = 1_000_000,
        port: int = 0,
        page_size: int = 1000,
        verbose: bool = False,
    ):
        if not token:
            raise ValueError("a non-empty token is required")
        self._server = _Server(port, Path(data_dir), token, user, lfs_threshold, page_size, verbose)
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # deliberately without the token
        return f"LocalHub({self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.faults.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.1)

    def fail(self, route: str, times: int = 1, mode: str = "500") -> None:
        """Fail the next `times` requests to `route`: "drop" hangs up mid-body, "500" (or 4xx/5xx) answers."""
        self._server.faults.fail(route, times, mode)

    def slow(self, route: str, delay_s: float) -> None:
        """Stall every request to `route` for `delay_s` seconds half-way through its body (0 turns it off)."""
        self._server.faults.slow(route, delay_s)

    def hold(self, route: str) -> None:
        """Hold every request to `route` half-way through its body (or before answering one without a body) until
        `release(route)` or stop(): a test inspects the hub, or kills the client, while the request is in flight."""
        self._server.faults.hold(route)

    def release(self, route: str) -> None:
        self._server.faults.release(route)

    def calls(self, route: str) -> int:
        """How many authorised requests reached `route`, injected failures included."""
        return self._server.faults.calls(route)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request this hub has read, in order, as (method, path): routed or not, authorised or not.
        Paths only: queries carry URL signatures."""
        with self._server._conns_lock:
            return list(self._server.request_log)

    @property
    def connections(self) -> int:
        """How many connections this hub has accepted (a client that never connected leaves it at 0)."""
        with self._server._conns_lock:
            return self._server.accepted

    def head(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> str | None:
        return self._server.store.branch_head(repo_type, repo_id, branch)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        store = self._server.store
        if not store.exists(repo_type, repo_id):
            return {}
        tree = store.commit_obj(repo_type, repo_id, store.resolve(repo_type, repo_id, revision))["tree"]
        return {path: store.content_path(repo_type, repo_id, e).read_bytes() for path, e in tree.items()}

    def commits(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> list[dict]:
        """Commits newest first, each with id, parents, title, message, date, authors and tree."""
        return self._server.store.log(repo_type, repo_id, self.head(repo_id, repo_type, branch))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="storage folder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", default="HF_TOKEN", help="name of the env var holding the token")
    parser.add_argument("--user", default="test-user")
    parser.add_argument("--lfs-threshold", type=int, default=1_000_000)
    parser.add_argument("--verbose", action="store_true", help="log method and path of each request")
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        parser.error(f"environment variable {args.token_env} is not set")
    hub = LocalHub(
        args.data,
        token,
        user=args.user,
        lfs_threshold=args.lfs_threshold,
        port=args.port,
        verbose=args.verbose,
    )
    print(f"listening on {hub.endpoint}", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
