"""URIs -> pyarrow filesystems. A URI is a local path, `file://...` or `s3://bucket/prefix`.

S3 is configured only from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3), so the
same code reaches AWS, MinIO or a test endpoint. Credentials are never logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(OSError):
    """A URI that cannot be read or written; the message names the URI (never credentials)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def is_local(uri: str) -> bool:
    return not is_s3(uri)


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(_local_path(uri), *parts)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI."""
    if is_s3(uri):
        parsed = urlparse(str(uri))
        if not parsed.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))


def _local_path(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://") :] if uri.startswith("file://") else uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"{uri}: cannot reach storage ({_short(exc)})") from None


def read_bytes(uri: str) -> bytes:
    """A whole object. Opened as a random-access file so its size is known up front: on S3 this
    is one ranged GET, where reading an `open_input_stream` to its end fetches it in small, growing
    pieces (measured 20x slower against a local endpoint, bench/RESULTS.md)."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({_short(exc)})") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed (atomic);
    S3 PUTs are atomic by nature."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({_short(exc)})") from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot create ({_short(exc)})") from None


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot delete ({_short(exc)})") from None


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Files directly under (or recursively below) a directory URI, as URIs, sorted."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list ({_short(exc)})") from None
    out = []
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = posixpath.relpath(info.path, path) if is_s3(uri) else os.path.relpath(info.path, path)
            out.append(join(uri, rel))
    return sorted(out)


def check_writable(uri: str) -> None:
    """Fail early, before any work, when a destination cannot be written (bucket missing,
    credentials missing or refused, read-only directory)."""
    probe = join(uri, f".crossdim-write-probe-{uuid.uuid4().hex[:8]}")
    if is_s3(uri):
        _check_s3_credentials(uri)
        _probe_s3(probe)
        return
    write_bytes(probe, b"ok")
    delete(probe)


def _probe_s3(probe: str) -> None:
    """PUT then DELETE one object with boto3: pyarrow's delete_file re-creates the parent's
    directory marker (`prefix/`), which would leave an empty key behind in the user's bucket."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(probe)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint(),
                          region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"))
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StorageError(f"{probe.rsplit('/', 1)[0]}: cannot write ({code})") from None
    except BotoCoreError as exc:
        raise StorageError(f"{probe.rsplit('/', 1)[0]}: cannot write ({_short(exc)})") from None


def _check_s3_credentials(uri: str) -> None:
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        if not (os.environ.get("AWS_PROFILE") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
                or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
            raise StorageError(
                f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_ENDPOINT_URL for a non-AWS endpoint)"
            )


def download(uri: str, local_path: str) -> str:
    """Copy a file URI to a local path (atomic). Returns local_path."""
    if is_local(uri):
        src = os.path.abspath(_local_path(uri))
        if src == os.path.abspath(local_path):
            return local_path
    write_bytes(local_path, read_bytes(uri))
    return local_path


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file below a directory URI into local_dir (keeping relative paths)."""
    files = list_files(uri, recursive=True)
    if not files:
        raise StorageError(f"{uri}: no files found")
    base = str(uri).rstrip("/")
    for f in files:
        rel = f[len(base) :].lstrip("/")
        download(f, os.path.join(local_dir, rel))
    return local_dir


def upload_dir(local_dir: str, uri: str) -> str:
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(uri, rel), f.read())
    return uri


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Never echo credentials that a library may have put into a message.
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text[:300]
