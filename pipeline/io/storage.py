"""Where data lives: a local path, a shared mount (NFS) or an object store URI, one interface.

On a cluster, shards, checkpoints and images must be where every node can read them. Ray
Train's ``storage_path`` already takes URIs through pyarrow; these helpers give the rest of the
pipeline the same reach. pyarrow handles paths, ``file://``, ``s3://``, ``gs://`` and
``hdfs://``; any other protocol that fsspec knows (``az://``, ``memory://``, ...) goes through
fsspec, wrapped as a pyarrow filesystem so that Ray Data and pyarrow.parquet accept it too.

Object stores have no atomic rename: ``upload_dir`` writes the files named ``last`` (the
manifest) after all the others, so a reader that waits for the manifest never sees half a split.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

PYARROW_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs"})

Location = str | os.PathLike


class NotFound(FileNotFoundError, ValueError):
    """No file at a location: callers catch it as FileNotFoundError, or as bad input."""


def is_uri(location: Location) -> bool:
    """True for ``scheme://…``; False for a path (a Windows drive letter is a path)."""
    scheme = urlparse(str(location)).scheme
    return "://" in str(location) and len(scheme) > 1


def absolute(location: Location, *, root: Path | None = None) -> str:
    """A URI unchanged; a path made absolute against ``root`` (default: the current directory),
    as Ray workers run elsewhere and must be handed locations that mean the same to them."""
    if is_uri(location):
        return str(location).rstrip("/")
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (Path(root or Path.cwd()) / path).resolve())


def locate(location: Location) -> Path | str:
    """A ``Path`` for local storage (a path, or a ``file://`` URI), else the URI.

    Local files keep pathlib's direct handling (and a ``file://`` URI never becomes a directory
    named ``file:``); only other storage goes through a filesystem object.
    """
    if not is_uri(location):
        return Path(location)
    if urlparse(str(location)).scheme == "file":
        return Path(filesystem(location)[1])
    return absolute(location)


def join(location: Location, *parts: str) -> str:
    """``location/part/…`` for a path or a URI (``s3://b/x`` + ``train`` -> ``s3://b/x/train``)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(location: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``location`` and the path to use with it."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), absolute(text)
    scheme = urlparse(text).scheme
    if scheme in PYARROW_SCHEMES:
        return pafs.FileSystem.from_uri(text)
    import fsspec  # only for the protocols pyarrow lacks

    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as error:
        raise ValueError(f"{text}: no filesystem for {scheme}:// ({error})") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(location: Location) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: Location) -> bytes:
    """The bytes of one file; NotFound when there is none."""
    return _read(*filesystem(location), where=location)


@functools.lru_cache(maxsize=64)
def _directory_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(location)


def read_under(directory: Location, name: str) -> bytes:
    """The bytes of file ``name`` under ``directory``; NotFound when there is none.

    ``name`` is a '/'-separated relative path taken literally (a space, ``#`` or ``%`` in it is
    never parsed as part of a URI). The directory's filesystem is resolved once per process:
    connecting (on S3: looking up the bucket's region) for each of many small files would cost
    more than reading them.
    """
    fs, root = _directory_filesystem(str(directory))
    return _read(fs, f"{root.rstrip('/')}/{name}", where=join(directory, name))


def _read(fs: pafs.FileSystem, path: str, *, where: Location) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as error:
        raise NotFound(f"{where}: no such file") from error


def read_json(location: Location) -> Any:
    try:
        return json.loads(read_bytes(location))
    except json.JSONDecodeError as error:
        raise ValueError(f"{location}: not valid JSON: {error}") from None


def write_bytes(location: Location, data: bytes) -> None:
    """Write one file, creating its directory. Locally via a temporary name and a rename; an
    object store's single PUT is atomic by itself."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = Path(f"{path}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_dir(local_dir: Location, location: Location, *, last: Sequence[str] = ()) -> list[str]:
    """Copy the files of ``local_dir`` (not recursive) to ``location``, those named in
    ``last`` at the end; returns the destinations in the order written."""
    files = sorted(p for p in Path(local_dir).iterdir() if p.is_file())
    files.sort(key=lambda p: p.name in last)  # stable: the rest keep their order
    fs, root = filesystem(location)
    fs.create_dir(root, recursive=True)
    written = []
    for file in files:
        pafs.copy_files(
            str(file.resolve()),
            f"{root.rstrip('/')}/{file.name}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
        written.append(join(location, file.name))
    return written
