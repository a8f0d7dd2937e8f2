"""Where stored paths live: local folders and object-store URIs, through `pyarrow.fs`.

A config string names a location: a local path (`runs`, `/data/x`, `~/x`), `file:///abs/path`,
`s3://bucket/prefix` or `gs://bucket/prefix` (`gcs://` too). `location(text, key)` turns it into
a `Location`: an absolute local path or a normalised URI, plus the config key it came from, so
every error names the key and the fix. Anything else (another scheme, `s3:/x`, a query string)
is an error: a URI is never taken for a local folder name.

Credentials and endpoints come from the standard environment, which pyarrow's S3 client (the
AWS SDK) reads itself: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_PROFILE`, `AWS_REGION`/`AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL` (`AWS_ENDPOINT_URL_S3`)
for S3-compatible servers (MinIO, Ceph, a test server); GCS: `GOOGLE_APPLICATION_CREDENTIALS`.
Ray workers must see the same variables: set them on every node or in the job's runtime_env
`env_vars` (a local cluster that `lofi` starts inherits the driver's environment).

Commit protocol. Local folders keep rename-based commits (write beside, `os.replace` into
place). Object stores have no rename, but one object upload is atomic (readers see the whole
new object or none). So every output is written as: data objects under their final names
(names that a retry rewrites identically), then one small record object written last; readers
trust only what a record lists. `write_bytes`/`write_json` are atomic per file everywhere.
Per output: shards (pipelines.data.shards) part files, then the part record, then the manifest;
training stages (`<run>/<stage>/`) their files, then the pipeline's stage record; Ray Train
checkpoints are committed by Ray Train itself (its checkpoint snapshot).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from lofi.errors import LofiError

OBJECT_SCHEMES = ("s3", "gs", "gcs")
# The environment the filesystems are built from: a change (a test's server, new credentials)
# builds new ones.
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
             "GOOGLE_APPLICATION_CREDENTIALS")
_GCS_RETRY_SEC = 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# Set by Ray's job supervisor in the environment of a submitted job's entrypoint (and only there:
# Ray's own workers and a driver started by hand do not have it).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class StorageError(LofiError):
    """A location that cannot be used: bad URI, missing bucket, unreachable store, refused access."""


def uri_problem(text: str) -> str | None:
    """Why `text` is not a usable location (syntax only: no network), else None."""
    if not text.strip():
        return "is empty"
    match = _SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # a plain path (a one-letter "scheme" is a drive)
        return None
    scheme = match.group(1).lower()
    if not text[match.end():].startswith("//"):
        return (f"{text!r} looks like a URI but lacks '//' after '{scheme}:'; write {scheme}://bucket/prefix "
                "(or ./" + text + " for a local folder of that name)")
    if scheme not in ("file", *OBJECT_SCHEMES):
        return (f"scheme {scheme}:// is not supported; use a local path, file:///abs/path, s3://bucket/prefix or "
                "gs://bucket/prefix")
    if "?" in text or "#" in text:
        return (f"{text!r}: options in the URI are not supported; set them in the environment "
                "(AWS_ENDPOINT_URL, AWS_REGION, ...)")
    rest = text[match.end() + 2:]
    if scheme == "file":
        if not rest.startswith("/"):
            return f"{text!r}: a file:// URI needs an absolute path, file:///abs/path"
        return None
    if not rest.split("/", 1)[0]:
        return f"{text!r} names no bucket; write {scheme}://bucket/prefix"
    return None


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a submitted Ray job (`ray job submit`)."""
    return RAY_JOB_ENV in os.environ


def location(text: str, key: str, output: bool = False) -> Location:
    """The Location a config value names; `key` (e.g. "run.storage") goes into every error.

    `output`: the location is written to. Inside a submitted Ray job the working directory is a
    copy Ray makes (and deletes), so an output there, e.g. the default relative `runs`, is an
    error rather than a result that silently disappears with the job.
    """
    problem = uri_problem(text)
    if problem:
        raise StorageError(f"{key}: {problem}")
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else ""
    if scheme in OBJECT_SCHEMES:
        bucket_and_key = text.split("://", 1)[1].strip("/")
        return Location(f"{'gs' if scheme == 'gcs' else scheme}://{re.sub('/+', '/', bucket_and_key)}", key)
    path = Path(text.split("://", 1)[1]) if scheme == "file" else Path(text).expanduser()
    resolved = path.resolve()
    if output and in_ray_job() and (not path.is_absolute() or resolved.is_relative_to(Path.cwd().resolve())):
        raise StorageError(
            f"{key}: {text!r} resolves to {resolved}, inside the working directory of this Ray job, which Ray "
            f"deletes when the job ends; set {key} to an absolute path on storage every node shares (e.g. "
            "/mnt/shared/lofi) or to an object-store URI (s3://bucket/prefix)")
    return Location(str(resolved), key)


@dataclass(frozen=True)
class Location:
    """A folder or file: an absolute local path, or `s3://bucket/key` / `gs://bucket/key`.

    Plain strings only, so it pickles to Ray workers, which rebuild the filesystem from their
    own environment."""

    uri: str
    key: str = ""  # the config key it came from: errors name it

    # ---- naming ----

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else ""

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def path(self) -> str:
        """The path on `fs`: the local path, or bucket/key."""
        return self.uri.split("://", 1)[1] if self.scheme else self.uri

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.scheme else ""

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def fs(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        try:
            return _filesystem(self.scheme, self.bucket, _env_snapshot())
        except (OSError, pa.ArrowException) as err:
            raise storage_error(self, "open", err) from err

    def __truediv__(self, part: str) -> Location:
        part = str(part).strip("/")
        if not part:
            return self
        if self.is_local:
            return Location(str(Path(self.uri) / part), self.key)
        return Location(f"{self.uri.rstrip('/')}/{part}", self.key)

    def __str__(self) -> str:
        return self.uri

    def local_path(self) -> Path:
        """The local Path; an error naming the key for an object-store location."""
        if not self.is_local:
            raise StorageError(f"{self.key or 'path'}: {self.uri} is an object-store URI, but this step still needs a "
                               "local (or shared) folder; set it to a path")
        return Path(self.uri)

    # ---- reading ----

    def info(self) -> pafs.FileInfo:
        with self._errors("look at"):
            return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A local folder, or an object-store prefix with at least one object under it."""
        return self.info().type == pafs.FileType.Directory

    @contextlib.contextmanager
    def open_input(self) -> Iterator[Any]:
        """A binary input stream (read in blocks for large files), errors naming the key."""
        with self._errors("read"), self.fs.open_input_stream(self.path) as stream:
            yield stream

    def read_bytes(self) -> bytes:
        with self.open_input() as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def files(self, pattern: str = "*", recursive: bool = False) -> list[Location]:
        """The files directly in (or, recursive, under) this folder whose name matches `pattern`, sorted."""
        from fnmatch import fnmatch

        with self._errors("list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))
        root = self.path.rstrip("/") + "/"
        found = [info.path[len(root):] for info in infos
                 if info.type == pafs.FileType.File and fnmatch(info.base_name, pattern)]
        return [self / rel for rel in sorted(found)]

    @contextlib.contextmanager
    def as_local_file(self) -> Iterator[Path]:
        """The file at a local path: itself, or a scratch copy of an object removed afterwards."""
        if self.is_local:
            yield Path(self.uri)
            return
        with tempfile.TemporaryDirectory(prefix="lofi-storage-") as tmp:
            path = Path(tmp) / self.name
            path.write_bytes(self.read_bytes())
            yield path

    def local_copy(self) -> Path:
        """A local path of this file for code that only opens paths (torch checkpoints in lofi): the
        file itself, or a copy cached per URI and size in the temp folder, downloaded once per node."""
        if self.is_local:
            return Path(self.uri)
        size = self.info().size
        digest = hashlib.sha1(f"{self.uri}:{size}".encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / "lofi-storage-cache" / digest / self.name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            scratch.write_bytes(self.read_bytes())
            os.replace(scratch, path)
        return path

    # ---- writing ----

    def makedirs(self) -> None:
        """Create the local folder; object stores have no folders (a bucket must exist: `check_bucket`)."""
        if self.is_local:
            with self._errors("create"):
                Path(self.uri).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """The whole file at once: a local scratch file renamed into place, or one object upload
        (atomic on object stores), so a reader never sees half of it."""
        with self._errors("write"):
            if self.is_local:
                path = Path(self.uri)
                path.parent.mkdir(parents=True, exist_ok=True)
                scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                scratch.write_bytes(data)
                os.replace(scratch, path)
                return
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, data: Any, indent: int | None = 1) -> None:
        self.write_bytes(json.dumps(data, indent=indent).encode())

    def upload(self, source: str | Path) -> None:
        """Copy a local file to this location (one object upload; locally, copy then rename)."""
        with self._errors("write"):
            if self.is_local:
                path = Path(self.uri)
                path.parent.mkdir(parents=True, exist_ok=True)
                scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                pafs.copy_files(str(source), str(scratch))
                os.replace(scratch, path)
                return
            pafs.copy_files(str(source), self.path, destination_filesystem=self.fs)

    def delete(self) -> None:
        """Remove the file, or the folder (prefix) with everything under it; nothing if absent."""
        info = self.info()
        with self._errors("delete"):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
            elif info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)

    def check_bucket(self) -> None:
        """For an object-store location, an error naming the key unless its bucket can be reached
        and exists (one request): found before any work starts, not at the first write."""
        if self.is_local:
            return
        with self._errors("reach"):
            info = self.fs.get_file_info(self.bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.key or 'location'}: bucket {self.bucket!r} of {self.uri} does not exist"
                               f"{_endpoint_note(self.scheme)}; create it, or set {self.key or 'the location'} to "
                               "an existing bucket")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as err:
            raise storage_error(self, action, err) from err


def storage_error(loc: Location, action: str, err: BaseException) -> StorageError:
    """A filesystem error as one line that names the key, what failed and the likely fix."""
    text = str(err)
    key = loc.key or "location"
    lowered = text.lower()
    if loc.is_local:
        hint = ""
    elif "no_such_bucket" in lowered or "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        hint = f"; bucket {loc.bucket!r} does not exist{_endpoint_note(loc.scheme)}: create it or fix {key}"
    elif any(s in lowered for s in ("network_connection", "could not connect", "could not resolve", "curlcode")):
        hint = (f"; the object store cannot be reached{_endpoint_note(loc.scheme)}: check the network, or set "
                "AWS_ENDPOINT_URL to your S3-compatible server's URL")
    elif any(s in lowered for s in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                                    "forbidden", "credentials", "unauthenticated", "permission", "access token")) \
            or re.search(r"\b403\b", lowered):
        hint = ("; access refused: set credentials in the environment (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://) on the driver and "
                "every Ray node")
    else:
        hint = ""
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return StorageError(f"{key}: cannot {action} {loc.uri}: {first}{hint}")


def _endpoint_note(scheme: str) -> str:
    if scheme != "s3":
        return ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint} from the environment)" if endpoint else " (AWS's endpoint: AWS_ENDPOINT_URL is unset)"


def _env_snapshot() -> tuple[tuple[str, str], ...]:
    return tuple((k, os.environ[k]) for k in _ENV_KEYS if k in os.environ)


@lru_cache(maxsize=32)
def _filesystem(scheme: str, bucket: str, env: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    """One filesystem per bucket and environment (`env`: the key of the cache): building an S3 one
    asks the bucket's region."""
    if scheme == "gs":  # GCS retries a missing credential for minutes by default
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=_GCS_RETRY_SEC))
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def local_file(text: str | None, key: str) -> str | None:
    """A path for code that opens only local files (lofi's checkpoint loaders): `text` itself, or the
    node-local copy of an object-store URI (`Location.local_copy`); None stays None."""
    if not text:
        return text
    loc = location(text, key)
    if loc.is_local:
        return text
    if not loc.is_file():
        raise StorageError(f"{key}: {loc.uri} does not exist; set {key} to an existing file")
    return str(loc.local_copy())


def read_parquet(path: str | Path, columns: list[str] | None = None, key: str = "data.shards",
                 schema: pa.Schema | None = None) -> pa.Table:
    """One Parquet file (a path or URI) with plain pyarrow, through the bucket's cached filesystem;
    `schema`: the file's expected schema (e.g. extension types to read the columns as)."""
    import pyarrow.parquet as pq

    loc = location(str(path), key)
    with loc._errors("read"):
        return pq.read_table(loc.path, columns=columns, filesystem=loc.fs, schema=schema)
