"""Downloading a file safely, for chapter 1's corpus: a progress line, a checksum, and nothing half-written.
Nothing here is about LLaMA."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from pathlib import Path


def download(url: str, path: Path, sha256: str) -> None:
    """Download `url` to `path`, check its SHA-256, and only then move it into place.

    The bytes go to a temporary file beside `path`; any failure removes it, so a broken download never leaves a
    partial file behind.

    Raises:
        ConnectionError: the download failed (HTTP errors, timeouts, a dropped connection).
        ValueError: the bytes are not the expected ones (checksum mismatch).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    hint = f"download it yourself from {url} and save it as {path}, or pass --data PATH"
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                print(f"\rdownloading {url}: {done:,} / {total:,} bytes", end="", file=sys.stderr)
            print(file=sys.stderr)
            if total and done != total:
                raise ConnectionError(f"connection dropped after {done:,} of {total:,} bytes")
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(f"checksum mismatch for {url}: got {digest}, expected {sha256}; {hint}")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # HTTP errors, timeouts, dropped connections
        raise ConnectionError(f"could not download the corpus ({e}); {hint}") from e
    finally:
        tmp.unlink(missing_ok=True)
