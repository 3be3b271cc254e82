"""Download and checksum helpers shared by the dataset loaders.

Loaders look for their files in a few places, and when they are missing download them with
:func:`fetch`, which verifies the published checksum of every file it downloads and, when it cannot
download (offline, ``download=False``, a mirror serving something else), raises a
``FileNotFoundError`` that names the files, the directory to put them in and where to get them.
Only the standard library is used (``urllib``), so nothing beyond the core dependencies is needed.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl_lightning.progress import byte_progress

_CHUNK = 1 << 20
USER_AGENT = "fl-lightning-dataset-downloader"


class DownloadError(OSError):
    """A file could not be downloaded (network error, HTTP error, checksum mismatch)."""


class ChecksumError(DownloadError):
    """A downloaded file's digest differs from the published one."""


@dataclass(frozen=True)
class RemoteFile:
    """A file that can be downloaded: its name on disk, the mirrors that serve it, its published digest."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """The hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_url(
    url: str, dest: str | Path, *, md5: str | None = None, sha256: str | None = None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` and check its digest; the file appears only once complete and verified.

    Raises:
        DownloadError: the URL could not be fetched.
        ChecksumError: the downloaded bytes do not have the expected md5 / sha256 (the partial file is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    hashes = {name: hashlib.new(name) for name, want in (("md5", md5), ("sha256", sha256)) if want}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out, byte_progress(
                dest.name, total=int(response.headers.get("Content-Length") or 0) or None) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
                for h in hashes.values():
                    h.update(chunk)
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, timeouts, bad URL, short reads
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {err}") from err
    for name, want in (("md5", md5), ("sha256", sha256)):
        if want and hashes[name].hexdigest() != want.lower():
            tmp.unlink(missing_ok=True)
            raise ChecksumError(
                f"{url}: {name} {hashes[name].hexdigest()} differs from the published {want}; "
                "the download is corrupt or the mirror serves another file"
            )
    tmp.replace(dest)
    return dest


def download_first(remote: RemoteFile, directory: Path, *, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``directory`` from the first of its mirrors that works."""
    errors = []
    for url in remote.urls:
        try:
            return download_url(url, directory / remote.filename, md5=remote.md5, sha256=remote.sha256, timeout=timeout)
        except DownloadError as err:
            errors.append(str(err))
    raise DownloadError("; ".join(errors) or f"no URL known for {remote.filename}")


def fetch(
    dataset: str,
    directory: Path,
    missing: Sequence[RemoteFile],
    *,
    download: bool,
    instructions: str,
    searched: Sequence[Path] = (),
) -> list[Path]:
    """Download the ``missing`` files into ``directory``, or explain how to get them.

    Args:
        dataset: the dataset's name, for messages.
        directory: where the files go (and where the error message tells the user to put them).
        missing: the files to download.
        download: False: do not try; fail with the message at once.
        instructions: where to get the files by hand (URLs), appended to the message.
        searched: other directories that were looked in, listed in the message.

    Raises:
        FileNotFoundError: the files could not be downloaded; the message names each file, the
            directory and where to get them.
    """
    if not missing:
        return []
    if download:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return [download_first(remote, directory) for remote in missing]
        except DownloadError as err:
            reason = f"download failed: {err}"
    else:
        reason = "download=False"
    still = [r.filename for r in missing if not (directory / r.filename).exists()]
    raise FileNotFoundError(missing_files_message(dataset, directory, still, reason, instructions, searched))


def missing_files_message(
    dataset: str,
    directory: Path,
    files: Sequence[str],
    reason: str,
    instructions: str,
    searched: Sequence[Path] = (),
) -> str:
    """The text of the error raised when a dataset's files are missing and cannot be downloaded."""
    where = f" (also looked in {', '.join(str(p) for p in searched)})" if searched else ""
    return (
        f"{dataset}: missing {', '.join(files)} in {directory}{where}; {reason}. "
        f"Put {', '.join(files)} into {directory}/ — {instructions}"
    )


def locate_archive_dataset(
    dataset: str,
    *,
    folders: Sequence[Path],
    is_complete: Callable[[Path], bool],
    archives: Sequence[Path],
    remote: RemoteFile,
    extract: Callable[[Path], Path],
    download: bool,
    instructions: str,
    contents: str,
) -> Path:
    """The folder of a dataset distributed as one archive: found extracted, extracted from a local archive, or
    downloaded (checksum verified) and extracted.

    Args:
        dataset: the dataset's name, for messages.
        folders: where the extracted files may already be; the first one ``is_complete`` accepts is returned.
        is_complete: whether a folder holds every file the loader reads.
        archives: where the archive may already be, in order of preference; a download goes to
            ``archives[0]``, whose name must be ``remote.filename``.
        remote: the archive's mirrors and published digest.
        extract: extracts an archive and returns the folder its files landed in.
        download: False: never download.
        instructions: where to get the archive by hand, for the error message.
        contents: what the archive should hold, for the error raised when it does not.

    Raises:
        FileNotFoundError: the archive is missing and cannot be downloaded (the message names it, where to
            put it and where to get it), or the archive does not hold ``contents``.
    """
    folder = next((f for f in folders if is_complete(f)), None)
    if folder is not None:
        return folder
    archive = next((a for a in archives if a.is_file()), None)
    if archive is None:
        target = archives[0].parent
        if archives[0].name != remote.filename:
            raise ValueError(f"{dataset}: archives[0] must be named {remote.filename}, got {archives[0]}")
        searched = list(dict.fromkeys(p for p in (*folders, *(a.parent for a in archives)) if p != target))
        fetch(dataset, target, [remote], download=download, instructions=instructions, searched=searched)
        archive = archives[0]
    folder = extract(archive)
    if not is_complete(folder):
        raise FileNotFoundError(
            f"{dataset}: {archive} did not contain {contents}; delete it and download {remote.urls[0]} again"
        )
    return folder


def extract_tar(archive: Path, directory: Path) -> None:
    """Extract a (gzip'd) tar archive into ``directory``, refusing members that would land outside it."""
    directory = directory.resolve()
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 and patched 3.8-3.11
            tar.extractall(directory, filter="data")
            return
        for member in tar.getmembers():  # pragma: no cover - old interpreters only
            target = (directory / member.name).resolve()
            if not target.is_relative_to(directory) or member.issym() or member.islnk():
                raise ValueError(f"{archive}: refusing to extract {member.name!r} (outside {directory} or a link)")
        tar.extractall(directory)  # pragma: no cover


def extract_zip_members(archive: Path, directory: Path, pattern: str) -> list[Path]:
    """Extract the members of a zip (and of zips nested in it) whose base name matches ``pattern``.

    Members are written flat into ``directory`` under their base name, so no path in the archive
    can escape it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def walk(zf: zipfile.ZipFile) -> None:
        for info in zf.infolist():
            if info.is_dir():
                continue
            base = Path(info.filename).name
            if base.lower().endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(zf.read(info))) as nested:
                    walk(nested)
            elif Path(base).match(pattern):
                with zf.open(info) as src, open(directory / base, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                written.append(directory / base)

    with zipfile.ZipFile(archive) as zf:
        walk(zf)
    return written


__all__ = [
    "ChecksumError",
    "DownloadError",
    "RemoteFile",
    "download_first",
    "download_url",
    "extract_tar",
    "extract_zip_members",
    "fetch",
    "file_digest",
    "locate_archive_dataset",
    "missing_files_message",
]
