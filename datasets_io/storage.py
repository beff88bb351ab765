"""Where data and results live: a local (or mounted) folder, or object storage, through ``pyarrow.fs``.

Every place that takes a folder for shards, runs or checkpoints takes either a local path or a URI that
``pyarrow.fs.FileSystem.from_uri`` resolves (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``). No
``os.path`` / ``pathlib`` operation is applied to a URI: paths are joined, read and written here.
Endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ...), so any S3-compatible
store works. Standard library and pyarrow only.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Union

import pyarrow.fs as pafs

PathOrURI = Union[str, os.PathLike]

__all__ = ["is_uri", "filesystem", "join", "name", "parent", "local", "exists", "is_file", "is_dir", "list_files",
           "read_bytes", "write_bytes", "read_text", "write_text", "makedirs", "delete_dir", "download", "upload",
           "LocalCopy", "ENV_VARS", "environment"]

# The environment that says where object storage is and how to reach it (endpoint, credentials,
# region), and MLflow's own S3 artifact settings: what every process that reads or writes a URI needs.
ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
            "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS")


def is_uri(path: PathOrURI) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local or mounted folder."""
    return "://" in str(path) and not str(path).startswith("file://")


def environment() -> dict[str, str]:
    """The storage settings of this process's environment (those of :data:`ENV_VARS` that are set)."""
    return {key: os.environ[key] for key in ENV_VARS if key in os.environ}


def local(path: PathOrURI) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return text if is_uri(text) else str(Path(text).expanduser().absolute())


def filesystem(path: PathOrURI) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI."""
    path = local(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def join(base: PathOrURI, *parts: str) -> str:
    base = local(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(base, *parts))


def name(path: PathOrURI) -> str:
    """The last component (``s3://b/data/FI`` -> ``FI``)."""
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else Path(path).name


def parent(path: PathOrURI) -> str:
    path = local(path)
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else str(Path(path).parent)


def _info(path: PathOrURI) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def exists(path: PathOrURI) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_file(path: PathOrURI) -> bool:
    return _info(path).type == pafs.FileType.File


def is_dir(path: PathOrURI) -> bool:
    """A folder; on object storage, any prefix that holds an object."""
    info = _info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if is_uri(path) and info.type == pafs.FileType.NotFound:
        fs, inner = filesystem(path)
        return bool(fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))
    return False


def list_files(folder: PathOrURI, suffix: str = "", recursive: bool = False) -> list[tuple[str, int]]:
    """``(path, size in bytes)`` of the files in ``folder`` ending in ``suffix``, sorted by path; paths are
    URIs when ``folder`` is one."""
    folder = local(folder)
    fs, inner = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=recursive))
    found = [(i.path, i.size or 0) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    if is_uri(folder):
        scheme = folder.split("://", 1)[0]
        found = [(f"{scheme}://{p}", size) for p, size in found]
    return sorted(found)


def read_bytes(path: PathOrURI) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def write_bytes(path: PathOrURI, data: bytes) -> None:
    """Write a whole file: atomically on a local disk (a temporary file renamed onto it), as one object
    on object storage (a PUT replaces an object whole)."""
    path = local(path)
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def read_text(path: PathOrURI) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: PathOrURI, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: PathOrURI) -> None:
    """A local folder made (object storage has no folders to make)."""
    if not is_uri(path):
        Path(local(path)).mkdir(parents=True, exist_ok=True)


def delete_dir(path: PathOrURI) -> None:
    fs, inner = filesystem(path)
    if is_dir(path):
        fs.delete_dir(inner)


def download(folder: PathOrURI, destination: PathOrURI) -> str:
    """A folder's files copied to the local ``destination`` (made); returns it."""
    destination = local(destination)
    Path(destination).mkdir(parents=True, exist_ok=True)
    fs, inner = filesystem(folder)
    pafs.copy_files(inner, destination, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def upload(folder: PathOrURI, destination: PathOrURI) -> None:
    """A local folder's files copied under ``destination`` (a local folder or a URI)."""
    fs, inner = filesystem(destination)
    pafs.copy_files(local(folder), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class LocalCopy:
    """``with LocalCopy(folder) as path:`` a local folder holding ``folder``'s files: the folder itself when
    it is local, else a temporary download removed afterwards."""

    def __init__(self, folder: PathOrURI):
        self.folder, self._tmp = folder, None

    def __enter__(self) -> str:
        if not is_uri(self.folder):
            return local(self.folder)
        self._tmp = tempfile.mkdtemp(prefix="emotion-ray-")
        return download(self.folder, self._tmp)

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
