"""A small stand-in for the Hugging Face Hub on 127.0.0.1, answering the HTTP requests huggingface_hub 2.4 makes.

Downloads (``hf_hub_download``, ``snapshot_download``, ``FDM.from_pretrained``): model info, the recursive tree
listing and ``/resolve`` with the ``ETag`` / ``X-Repo-Commit`` / ``Content-Length`` headers the client checks.
Uploads (``create_repo``, ``create_branch``, ``upload_folder``, ``push_to_hub``): ``/api/repos/create``, README
YAML validation, ``preupload``, the git-LFS batch API (basic transfer: PUT, then verify) and the ndjson
``commit`` endpoint. Xet storage is not offered (no ``X-Xet-Hash`` headers); with ``hf_xet`` installed the client
still tries Xet for uploads unless ``HF_HUB_DISABLE_XET=1``, so clients of this server must set it.

Run it as a context manager (``with LocalHub() as hub: hub.url``) or as a script for manual use:
``python tests/hub_server.py`` prints the endpoint and serves until interrupted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["Blob", "LocalHub", "Repo"]

TOKEN = "hf_localtesttoken"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
]


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (sha1 over ``blob <size>\\0`` + content), what the Hub reports as ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file's content; LFS files are reported with their sha256 and a pointer-file git id, like the Hub."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Repo:
    """A model repo: branches pointing at commits, each commit a full ``{path: Blob}`` snapshot."""

    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def add_commit(self, branch: str, files: dict[str, Blob], message: str) -> str:
        parent = self.branches.get(branch, "")
        payload = json.dumps([parent, message, sorted((p, b.oid) for p, b in files.items()), time.time_ns()])
        commit = hashlib.sha1(payload.encode()).hexdigest()
        self.commits[commit], self.messages[commit] = dict(files), message
        self.branches[branch] = commit
        return commit


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """The server: ``repos`` and ``lfs_objects`` are its state, ``requests`` logs ``(method, path)`` of each call.

    Args:
        token: the only token that may write (and read private repos); sent as ``Authorization: Bearer``.
        user: namespace for repo ids given without one.
    """

    def __init__(self, token: str = TOKEN, user: str = USER):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() first.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers for tests ------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (branch or commit id)."""
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in repo.commits[repo.resolve(revision)].items()}

    # -- request handling -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> tuple:
        with self._lock:
            self.requests.append((method, path))
            lookup = "GET" if method == "HEAD" else method
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if route_method == lookup and match:
                    authorized = headers.get("authorization") == f"Bearer {self.token}"
                    return getattr(self, f"_{name}")(authorized=authorized, query=query, body=body, **match.groupdict())
            raise _HubError(404, f"no route for {method} {path}")

    def _repo(self, repo_id: str, authorized: bool, write: bool = False) -> Repo:
        if write and not authorized:
            raise _HubError(401, "Invalid credentials in Authorization header", headers={
                "X-Error-Message": "Invalid credentials in Authorization header"})
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise _HubError(401 if repo is not None else 404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, rev: str) -> str:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HubError(404, f"Revision {unquote(rev)} not found", "RevisionNotFound")
        return commit

    def _model_info(self, repo: str, rev: str | None = None, authorized: bool = False, **_: Any) -> tuple:
        r = self._repo(repo, authorized)
        commit = self._revision(r, rev or "main")
        siblings = [{"rfilename": p} for p in sorted(r.commits[commit])]
        return 200, {"_id": commit[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit,
                     "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                     "tags": [], "siblings": siblings}, {}

    def _tree(self, repo: str, rev: str, path: str | None = None, authorized: bool = False,
              query: dict[str, list[str]] | None = None, **_: Any) -> tuple:
        r = self._repo(repo, authorized)
        files = r.commits[self._revision(r, rev)]
        prefix = f"{unquote(path).strip('/')}/" if path else ""
        recursive = (query or {}).get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for name, blob in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": name}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            entries.append(entry)
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        entries += [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        return 200, entries, {}

    def _resolve(self, repo: str, rev: str, path: str, authorized: bool = False, **_: Any) -> tuple:
        r = self._repo(repo, authorized)
        commit = self._revision(r, rev)
        blob = r.commits[commit].get(unquote(path))
        if blob is None:
            raise _HubError(404, f"Entry {path} not found", "EntryNotFound", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{blob.etag}"', "Content-Type": "application/octet-stream"}
        return 200, blob.data, headers

    def _create_repo(self, body: bytes, authorized: bool, **_: Any) -> tuple:
        if not authorized:
            raise _HubError(401, "Invalid credentials in Authorization header", headers={
                "X-Error-Message": "Invalid credentials in Authorization header"})
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise _HubError(400, "this test server only hosts model repos")
        if repo_id in self.repos:
            raise _HubError(409, f"You already created this model repo: {repo_id}")
        repo = Repo(private=payload.get("visibility") == "private")
        repo.add_commit("main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit")
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, body: bytes, **_: Any) -> tuple:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}, {}
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        errors = [{"message": f'"{key}" must be a string'} for key in ("license", "library_name")
                  if isinstance(metadata, dict) and key in metadata and not isinstance(metadata[key], str)]
        return (400 if errors else 200), {"errors": errors, "warnings": warnings}, {}

    def _create_branch(self, repo: str, rev: str, body: bytes, authorized: bool, **_: Any) -> tuple:
        r = self._repo(repo, authorized, write=True)
        branch = unquote(rev)
        if branch in r.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        r.branches[branch] = self._revision(r, start)
        return 200, {}, {}

    def _preupload(self, repo: str, rev: str, body: bytes, authorized: bool, **_: Any) -> tuple:
        r = self._repo(repo, authorized, write=True)
        current = r.commits[self._revision(r, rev)]
        files = []
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] > 10 * 2**20
            remote = current.get(entry["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.oid)
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return 200, {"files": files}, {}

    def _lfs_batch(self, repo: str, body: bytes, authorized: bool, **_: Any) -> tuple:
        self._repo(repo, authorized, write=True)
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise _HubError(400, "only uploads with the basic transfer are supported")
        objects = []
        for obj in request["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_upload(self, oid: str, body: bytes, **_: Any) -> tuple:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match the LFS oid {oid}")
        self.lfs_objects[oid] = body
        return 200, {}, {}

    def _lfs_verify(self, repo: str, body: bytes, authorized: bool, **_: Any) -> tuple:
        self._repo(repo, authorized, write=True)
        obj = json.loads(body)
        data = self.lfs_objects.get(obj["oid"])
        if data is None or len(data) != obj["size"]:
            raise _HubError(404, f"LFS object {obj['oid']} was not uploaded")
        return 200, {}, {}

    def _commit(self, repo: str, rev: str, body: bytes, authorized: bool, query: dict, **_: Any) -> tuple:
        r = self._repo(repo, authorized, write=True)
        if query.get("create_pr"):
            raise _HubError(400, "pull requests are not supported by this test server")
        branch = unquote(rev)
        if branch not in r.branches:
            raise _HubError(404, f"Revision {branch} not found (commits go to branches)", "RevisionNotFound")
        files = dict(r.commits[r.branches[branch]])
        header: dict[str, Any] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise _HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise _HubError(400, f"unknown commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and parent != r.branches[branch]:
            raise _HubError(412, f"parent commit {parent} is not the head of {branch}")
        commit = r.add_commit(branch, files, header.get("summary", ""))
        return 200, {"success": True, "commitOid": commit, "commitUrl": f"{self.url}/{repo}/commit/{commit}"}, {}


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the hub keeps its own request log
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            status, payload, headers = self.hub.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
        except _HubError as err:
            status, payload = err.status, {"error": err.message}
            headers = dict(err.headers, **({"X-Error-Code": err.code} if err.code else {}))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = _serve


if __name__ == "__main__":
    with LocalHub() as hub:
        print(f"HF_ENDPOINT={hub.url} HF_TOKEN={hub.token} HF_HUB_DISABLE_XET=1", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
