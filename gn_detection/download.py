"""Downloading checkpoints into a local cache: verified, atomic, resumable.

A file reaches its cache path only by a rename after it has arrived whole and passed its checks, so a
cached file is trusted and used without touching the network. An interrupted transfer leaves only
``<file>.part``, which is never trusted: the next attempt resumes it with an HTTP Range request and
verifies the whole file again. The resume is conditional (If-Range with the ETag or Last-Modified the server
gave when the part began, kept in ``<file>.part.validator``), so a file that changed on the server since is
sent whole instead of being spliced onto the old part.

Environment variables:
  GN_DETECTION_CACHE       cache directory (default: $XDG_CACHE_HOME/gn_detection, else ~/.cache/gn_detection)
  GN_DETECTION_MIRROR      replaces the https://dl.fbaipublicfiles.com prefix of every catalog URL
  GN_DETECTION_ALLOW_HTTP  set to 1 to allow plain-HTTP URLs (an internal mirror); HTTPS is required otherwise
  GN_DETECTION_RETRIES     connection attempts per file (default 5)
  GN_DETECTION_TIMEOUT     seconds without data before an attempt fails (default 30)
  GN_DETECTION_BACKOFF     seconds to wait before the 2nd attempt, doubling after each (default 1, at most 30)
"""
import fcntl
import hashlib
import http.client
import logging
import math
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional

from tqdm import tqdm

from .atomic_write import replace_durably

PUBLIC_HOST = "https://dl.fbaipublicfiles.com"  # where Detectron and Detectron2 publish their checkpoints
ENV_CACHE = "GN_DETECTION_CACHE"
ENV_MIRROR = "GN_DETECTION_MIRROR"
ENV_ALLOW_HTTP = "GN_DETECTION_ALLOW_HTTP"
PART = ".part"
VALIDATOR = ".validator"  # appended to the .part path: the version of the remote file the part is a prefix of
CHUNK = 1 << 20
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # HTTP errors worth another try; any other status is final

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message says which, why, and what to try."""


class IntegrityError(DownloadError):
    """A downloaded file does not match its recorded digest; it has been deleted."""


@dataclass(frozen=True)
class Checksums:
    """What a file must hash to. ``md5_prefix``: leading hex digits of its MD5 (Detectron2 puts them in
    model-zoo file names); ``sha256``: its full SHA-256. Empty means not recorded."""

    md5_prefix: str = ""
    sha256: str = ""

    def mismatch(self, path: str) -> Optional[str]:
        """None if the file at ``path`` matches; else a description of the expected and actual digests."""
        if not self.md5_prefix and not self.sha256:
            return None
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                md5.update(chunk)
                sha256.update(chunk)
        if self.md5_prefix and not md5.hexdigest().startswith(self.md5_prefix.lower()):
            return f"MD5 expected to start with {self.md5_prefix}, got {md5.hexdigest()}"
        if self.sha256 and sha256.hexdigest() != self.sha256.lower():
            return f"SHA-256 expected {self.sha256}, got {sha256.hexdigest()}"
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` connections at most, each read timing out after ``timeout`` seconds,
    waiting ``backoff * 2**k`` seconds (at most ``max_wait``) before attempt k + 2."""

    attempts: int = 5
    timeout: float = 30.0
    backoff: float = 1.0
    max_wait: float = 30.0

    def wait(self, attempt: int) -> float:
        return min(self.backoff * 2 ** attempt, self.max_wait)

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The defaults, overridden by GN_DETECTION_RETRIES / _TIMEOUT / _BACKOFF."""
        def number(var: str, default: float, kind=float):
            value = os.environ.get(var, "")
            try:
                return kind(value) if value else default
            except ValueError:
                raise ValueError(f"{var}={value!r} is not a number; unset it or give e.g. {var}={default}") from None

        policy = cls(number("GN_DETECTION_RETRIES", cls.attempts, int), number("GN_DETECTION_TIMEOUT", cls.timeout),
                     number("GN_DETECTION_BACKOFF", cls.backoff))
        if policy.attempts < 1 or not 0 < policy.timeout < math.inf or not 0 <= policy.backoff < math.inf:  # nan too
            raise ValueError(f"GN_DETECTION_RETRIES must be >= 1, GN_DETECTION_TIMEOUT a finite number > 0 and "
                             f"GN_DETECTION_BACKOFF a finite number >= 0; got {policy.attempts}, {policy.timeout:g} "
                             f"and {policy.backoff:g}")
        return policy


def cache_dir() -> str:
    """The directory downloads are cached in (``$GN_DETECTION_CACHE`` if set)."""
    if os.environ.get(ENV_CACHE):
        return os.path.expanduser(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gn_detection")


def mirrored(url: str) -> str:
    """``url`` with the public host replaced by ``$GN_DETECTION_MIRROR`` when that is set."""
    mirror = os.environ.get(ENV_MIRROR, "").rstrip("/")
    if mirror and url.startswith(PUBLIC_HOST + "/"):
        return mirror + url[len(PUBLIC_HOST):]
    return url


def cache_segments(url: str) -> List[str]:
    """The folders and file name ``url`` is cached under, inside the cache directory: its path (the public host's
    files, which mirrors serve too, at the top; any other host's in a folder of its own, so two hosts' same paths
    never meet)."""
    parsed = urllib.parse.urlparse(url)
    parts = parsed.path.lstrip("/").split("/")  # kept quoted: no ':' in local file names
    if not url.startswith(PUBLIC_HOST + "/"):
        parts.insert(0, parsed.netloc.replace(":", "_"))
    return parts


def cache_path(url: str) -> str:
    """Where ``url`` is cached: :func:`cache_segments` joined under the cache directory."""
    return os.path.join(cache_dir(), *cache_segments(url))


def download(url: str, checksums: Checksums = Checksums(), retry: Optional[RetryPolicy] = None,
             progress: bool = True, again: bool = False) -> str:
    """Return the local path of ``url`` (mirrored), downloading it into the cache unless a verified copy
    is there; with ``again``, downloading it anyway (a cached copy damaged since, say), which replaces the cached
    copy only once the new one has arrived whole and passed its checks: a failed try leaves it as it was.
    Raises :class:`DownloadError` (or :class:`IntegrityError`) with the URL and the cause."""
    segments = cache_segments(url)
    if ".." in segments or not segments[-1]:
        raise DownloadError(f"cannot cache {url}: it names no file, or its path holds '..' segments that would place "
                            f"the file outside the cache {cache_dir()}; give the URL of a file, without '..'")
    dest = cache_path(url)
    if os.path.isfile(dest) and not again:  # only verified files get this name: no network, no lock,
        return dest  # so read-only caches work
    if os.path.isdir(dest):  # the download could never be renamed into place
        raise DownloadError(f"cannot cache {url}: {dest} is a folder; remove it or point {ENV_CACHE} elsewhere.")
    retry = retry or RetryPolicy.from_env()
    url = checked_source(url)
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        lock = open(dest + ".lock", "w")
    except OSError as e:
        raise DownloadError(f"cannot write to the cache {cache_dir()} ({e.strerror}: {e.filename}); "
                            f"make it writable or point {ENV_CACHE} elsewhere.") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (ranks of one job) may ask for the same file
        if again or not os.path.isfile(dest):  # another process may have finished it while we waited
            _fetch_with_retries(url, dest + PART, retry, progress)
            _verify(url, dest, checksums)
            replace_durably(dest + PART, dest)
            _discard(dest + PART + VALIDATOR)
            logger.info("Downloaded %s to %s", url, dest)
    return dest


def _verify(url: str, dest: str, checksums: Checksums) -> None:
    problem = checksums.mismatch(dest + PART)
    if problem:
        _discard_part(dest + PART)
        raise IntegrityError(
            f"{os.path.basename(dest)} from {url} failed verification: {problem}. The file was deleted; "
            f"if {ENV_MIRROR} points to a mirror, check its copy, else run again to retry.")


def _check_url(url: str) -> None:
    try:
        parsed = urllib.parse.urlparse(url)
        parsed.port  # reading it raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise DownloadError(f"cannot download {url}: {e} (check {ENV_MIRROR}).") from e
    if parsed.scheme == "http" and os.environ.get(ENV_ALLOW_HTTP) != "1":
        raise DownloadError(f"refusing to download {url} over plain HTTP (it could be altered in transit); "
                            f"use an https:// mirror or set {ENV_ALLOW_HTTP}=1 to allow it.")
    if parsed.scheme not in ("http", "https"):
        allowed = "https:// and http:// URLs" if os.environ.get(ENV_ALLOW_HTTP) == "1" else "https:// URLs"
        raise DownloadError(f"cannot download {url}: only {allowed} are supported (check {ENV_MIRROR}).")
    if not parsed.hostname:
        raise DownloadError(f"cannot download {url}: the URL names no host (check {ENV_MIRROR}).")


def _fetch_with_retries(url: str, part: str, retry: RetryPolicy, progress: bool) -> None:
    for attempt in range(retry.attempts):
        try:
            _fetch(url, part, retry.timeout, progress)
            return
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS:
                raise DownloadError(_http_error_message(url, e)) from e
            cause = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            _raise_if_final(url, e)
            cause = _network_cause(e, retry.timeout)
        if attempt + 1 < retry.attempts:
            wait = retry.wait(attempt)
            logger.warning("Downloading %s: %s; attempt %d of %d in %.1f s", url, cause, attempt + 2,
                           retry.attempts, wait)
            time.sleep(wait)
    kept = f" {os.path.getsize(part)} bytes are kept in {part} to resume from." if os.path.exists(part) else ""
    raise DownloadError(f"could not download {url} after {retry.attempts} attempts: {cause}.{kept} "
                        f"Check the network (or {ENV_MIRROR}) and run again.")


def _raise_if_final(url: str, error: BaseException) -> None:
    """Errors another attempt cannot fix: a malformed URL, a server that speaks no TLS, a certificate that does not
    verify."""
    reason = getattr(error, "reason", error)
    if isinstance(error, http.client.InvalidURL):
        raise DownloadError(f"cannot download {url}: {error} (check {ENV_MIRROR}).") from error
    if isinstance(reason, ssl.SSLError) and reason.reason == "WRONG_VERSION_NUMBER":  # the server spoke no TLS
        raise DownloadError(f"cannot download {url}: the server does not speak TLS (HTTPS); is it a plain http:// "
                            f"mirror? (check {ENV_MIRROR})") from error
    if isinstance(reason, ssl.SSLCertVerificationError):
        raise DownloadError(f"cannot download {url}: its TLS certificate does not verify ({reason.verify_message}). "
                            "For a mirror with a private CA, point SSL_CERT_FILE at its certificate.") from error


def _http_error_message(url: str, error: urllib.error.HTTPError) -> str:
    if error.code == 404:
        return (f"{url} does not exist (HTTP 404). Check the model name (`python tools/model_zoo.py list`) "
                f"and, if set, that the mirror {ENV_MIRROR}={os.environ.get(ENV_MIRROR, '')} holds the file.")
    return f"the server refused {url}: HTTP {error.code} {error.reason}."


def _network_cause(error: BaseException, timeout: float) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror}; no network or DNS?)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server or mirror up?)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no data for {timeout:g} s (timed out)"
    if isinstance(error, http.client.IncompleteRead):
        return "the connection closed before the whole file arrived"
    return f"{type(reason).__name__}: {reason}"


def _fetch(url: str, part: str, timeout: float, progress: bool) -> None:
    """One attempt: extend ``part`` from where it ends (HTTP Range, if the remote file is still the one the
    part began from) to the size the server reports; start over when the server cannot resume it."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    validator = _recorded_validator(part) if have else None
    if not validator:
        have = 0  # a part of unknown version could be the start of an older file: start over
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-", "If-Range": validator} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the partial file is not a prefix the server can extend
            raise
        if e.headers.get("Content-Range") == f"bytes */{have}":  # ... because it is the whole file already
            return
        _discard_part(part)
        return _fetch(url, part, timeout, progress)
    with response:
        answered_range = response.headers.get("Content-Range", "")
        if have and response.status == 206 and not answered_range.startswith(f"bytes {have}-"):
            _discard_part(part)  # the server answered another range than asked: ask for the whole file
            return _fetch(url, part, timeout, progress)
        if response.status != 206:
            have = 0  # the server ignored the Range header, or the file changed: it sends the whole file
            _discard(part)  # before the new record, so that no part is ever paired with a newer file's record
            _record_validator(part, response)
        total = _total_size(response, have)
        _write(response, part, have, total, progress, os.path.basename(urllib.parse.urlparse(url).path))
    size = os.path.getsize(part)
    if total is None:
        _discard_part(part)
        raise DownloadError(f"{url}: the server did not say how large the file is, so a cut-short transfer "
                            "could not be told from a complete one; nothing was kept. Try another mirror.")
    if size > total:
        _discard_part(part)  # not a prefix of this file: start over next attempt
    if size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _record_validator(part: str, response: http.client.HTTPResponse) -> None:
    """Keep what identifies the version of the file the server is sending: a strong ETag, else its
    Last-Modified date (RFC 9110 If-Range accepts either); remove any older record when it gives neither."""
    etag = response.headers.get("ETag", "")
    validator = etag if etag.startswith('"') else response.headers.get("Last-Modified", "")  # W/"..." is weak
    if not validator:
        _discard(part + VALIDATOR)
        return
    try:
        with open(part + VALIDATOR, "w") as f:
            f.write(validator)
    except OSError as e:
        raise DownloadError(f"cannot write {part}{VALIDATOR} ({e.strerror}); check the cache directory or "
                            f"{ENV_CACHE}.") from e


def _recorded_validator(part: str) -> Optional[str]:
    try:
        with open(part + VALIDATOR) as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _discard_part(part: str) -> None:
    _discard(part)
    _discard(part + VALIDATOR)


def _write(response, part: str, have: int, total: Optional[int], progress: bool, label: str) -> None:
    """Stream the response body onto ``part`` (appending after ``have`` bytes); synced to disk when it is
    renamed into place."""
    try:
        out = open(part, "ab" if have else "wb")
    except OSError as e:
        raise DownloadError(f"cannot write {part} ({e.strerror}); check the cache directory or {ENV_CACHE}.") from e
    with out, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                   desc=label, leave=False) as bar:
        for chunk in iter(lambda: response.read(CHUNK), b""):
            try:
                out.write(chunk)
            except OSError as e:
                raise DownloadError(f"cannot write {part} ({e.strerror}); free space or move {ENV_CACHE}.") from e
            bar.update(len(chunk))


def _total_size(response: http.client.HTTPResponse, have: int) -> Optional[int]:
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) + have if length and length.isdigit() else None


def checked_source(url: str) -> str:
    """``url`` as it will be downloaded (mirrored); :class:`DownloadError` naming :data:`ENV_MIRROR` if it cannot be
    (plain HTTP without the opt-in, another scheme, no host, a malformed host or port)."""
    url = mirrored(url)
    _check_url(url)
    return url


def remote_size(url: str, timeout: Optional[float] = None) -> Optional[int]:
    """The size the server reports for ``url`` (mirrored) in a HEAD request, waiting ``timeout`` seconds (default
    GN_DETECTION_TIMEOUT's) for an answer; None if it does not say."""
    url = checked_source(url)
    timeout = RetryPolicy.from_env().timeout if timeout is None else timeout
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
        length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None
