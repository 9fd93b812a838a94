"""Content-addressed, crash-safe store of compiled artifacts, one directory per cache key.

Layout under the root ($KVFLOW_CACHE_DIR/compile; KVFLOW_CACHE_DIR defaults to ~/.cache/kvflow):

    <key>/inductor/        inductor's own cache dir for this key, written while building (and
                           possibly later: inductor keys and atomically writes its files itself)
    <key>/factors.json     the factor dict the key was computed from (canonical JSON)
    <key>/artifacts.bin    torch.compiler.save_cache_artifacts() bytes (empty when unavailable)
    <key>/manifest.json    written LAST, the commit point: format, key, size + sha256 of the two
                           files above and of every file inductor had written at that time, meta
    .triton/               triton's kernel cache, shared by all keys (triton keys it itself)
    .locks/<key>.lock      fcntl lock: one builder / repairer per key at a time
    .tmp/                  discarded entries being deleted

An entry is built in place, not in a temporary directory renamed into place: inductor keeps
absolute paths into its cache dir in live objects (kernel autotuning results are written next
to the kernel later), so that dir must not move once compiled into. Atomicity comes from the
manifest instead: every file is written to a temporary name, fsync'ed and os.replace'd, and the
manifest goes last, so a reader sees either no manifest (not an entry yet) or a complete one.

Invariants:
- An entry is used only if its manifest parses and names this key, every listed file has the
  recorded size and sha256 (a listed inductor file may be missing: inductor regenerates it; a
  damaged generated module or shared library would otherwise crash the process), the stored
  factors hash to the key, and they equal the current factors exactly. Anything else is
  reported with the entry's path and never loaded.
- Only the holder of a key's lock builds, publishes or discards that key's entry, so a repair
  never deletes an entry another process has just published, and a directory without a
  manifest seen under the lock is a crashed build: garbage. Readers take no lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from kvflow.compilation.cache_key import canonical_json, diff_factors, key_of

try:
    import fcntl
except ImportError:  # not POSIX: builds still publish atomically, just without mutual exclusion
    fcntl = None

logger = logging.getLogger("kvflow")

FORMAT = 1
FACTORS = "factors.json"
ARTIFACTS = "artifacts.bin"
MANIFEST = "manifest.json"
INDUCTOR = "inductor"
_TMP = ".tmp"
_LOCKS = ".locks"
_TRITON = ".triton"


class CorruptEntry(Exception):
    """An entry that must not be loaded; the message says why."""


@dataclass
class Entry:
    key: str
    path: str
    factors: dict[str, Any]
    artifacts: bytes
    manifest: dict[str, Any] = field(repr=False)

    @property
    def inductor_dir(self) -> str:
        return os.path.join(self.path, INDUCTOR)


def default_root() -> str:
    base = os.environ.get("KVFLOW_CACHE_DIR") or "~/.cache/kvflow"
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "compile")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _list_files(root: str) -> dict[str, dict[str, Any]]:
    """rel path -> size and sha256 of every regular file under root (inductor's lock files,
    which carry no data, excluded)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:  # lock files carry no data; triton's cache has its own keys
            dirnames[:] = [d for d in dirnames if d not in ("locks", "triton")]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            with open(full, "rb") as f:
                data = f.read()
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            out[rel] = {"size": len(data), "sha256": _sha256(data)}
    return dict(sorted(out.items()))


class CompileStore:
    def __init__(self, root: Optional[str] = None):
        self.root = os.path.abspath(os.path.expanduser(root)) if root else default_root()

    def entry_path(self, key: str) -> str:
        return os.path.join(self.root, key)

    @property
    def triton_dir(self) -> str:
        return os.path.join(self.root, _TRITON)

    # ------------------------------------------------------------------ read
    def load(self, key: str, factors: dict[str, Any], *, repair: bool = False) -> Optional[Entry]:
        """The validated entry for `key`, or None. An unusable entry is logged with its path;
        with repair=True (caller holds the key's lock) it is also discarded."""
        path = self.entry_path(key)
        if not os.path.lexists(path):
            return None
        try:
            return self.read(key, factors)
        except CorruptEntry as e:
            if repair:
                logger.warning("compile cache: entry %s is unusable (%s); discarding it, the "
                               "model will be recompiled", path, e)
                self.discard(key)
            else:
                logger.debug("compile cache: entry %s is unusable (%s)", path, e)
            return None

    def read(self, key: str, factors: Optional[dict[str, Any]] = None) -> Entry:
        """Validate and read an entry; factors=None skips the equality check (for `info`).
        Raises CorruptEntry, never anything else for bad contents."""
        path = self.entry_path(key)
        try:
            if not os.path.isdir(path):
                raise CorruptEntry("not a directory")
            try:
                with open(os.path.join(path, MANIFEST), "rb") as f:
                    manifest = json.loads(f.read())
            except FileNotFoundError:
                raise CorruptEntry("no manifest (incomplete or damaged entry)") from None
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise CorruptEntry(f"manifest format is not {FORMAT}")
            if manifest.get("key") != key:
                raise CorruptEntry(f"manifest is for key {manifest.get('key')!r}")
            files = manifest.get("files")
            if not isinstance(files, dict) or set(files) != {FACTORS, ARTIFACTS}:
                raise CorruptEntry("manifest does not list exactly factors and artifacts")
            blobs = {}
            for name, meta in files.items():
                with open(os.path.join(path, name), "rb") as f:
                    data = f.read()
                if len(data) != meta["size"]:
                    raise CorruptEntry(f"{name} has {len(data)} bytes, manifest says {meta['size']}")
                if _sha256(data) != meta["sha256"]:
                    raise CorruptEntry(f"{name} fails its sha256 checksum")
                blobs[name] = data
            self._verify_inductor_files(path, manifest.get("inductor_files", {}))
            stored = json.loads(blobs[FACTORS])
            if not isinstance(stored, dict) or key_of(stored) != key:
                raise CorruptEntry("stored factors do not hash to this key")
            if factors is not None and canonical_json(stored) != canonical_json(factors):
                raise CorruptEntry("stored factors differ from this configuration: "
                                   + diff_factors(stored, factors))
        except CorruptEntry:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"{type(e).__name__}: {e}") from None
        return Entry(key, path, stored, blobs[ARTIFACTS], manifest)

    @staticmethod
    def _verify_inductor_files(path: str, listed: dict) -> None:
        root = os.path.join(path, INDUCTOR)
        for rel, meta in listed.items():
            if os.path.isabs(rel) or ".." in rel.split("/"):
                raise CorruptEntry(f"manifest lists a file outside the entry: {rel!r}")
            try:
                with open(os.path.join(root, rel), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            if len(data) != meta["size"] or _sha256(data) != meta["sha256"]:
                raise CorruptEntry(f"{INDUCTOR}/{rel} fails its size or sha256 check")

    # ------------------------------------------------------------------ write
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock across processes (blocks; released on exit or process death)."""
        with self._lock(key, blocking=True):
            yield

    @contextlib.contextmanager
    def _lock(self, key: str, blocking: bool) -> Iterator[bool]:
        lock_dir = os.path.join(self.root, _LOCKS)
        os.makedirs(lock_dir, exist_ok=True)
        # Lock files are never deleted: unlinking one while another process waits on it would
        # let two processes hold "the" lock.
        fd = os.open(os.path.join(lock_dir, key + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            acquired = True
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not blocking:
                        acquired = False
                    else:
                        logger.info("compile cache: waiting for another process building %s", key)
                        fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as e:  # e.g. a filesystem without flock: rename stays atomic
                    logger.warning("compile cache: cannot lock %s (%s); continuing unlocked",
                                   lock_dir, e)
            yield acquired
        finally:
            os.close(fd)  # releases the flock

    def begin_build(self, key: str) -> str:
        """The entry directory to build into (caller holds the key's lock and found no valid
        entry: whatever is there is a crashed build or a rejected entry, and is discarded).
        Returns the inductor cache dir to compile into."""
        self.discard(key)
        path = os.path.join(self.entry_path(key), INDUCTOR)
        os.makedirs(path)
        return path

    def abort_build(self, key: str) -> None:
        self.discard(key)

    def publish(self, key: str, factors: dict[str, Any], artifacts: bytes,
                meta: Optional[dict[str, Any]] = None) -> Entry:
        """Complete the entry built in place: factors, artifacts, then the manifest (the commit
        point), each written atomically. Caller holds the key's lock."""
        if key_of(factors) != key:
            raise ValueError("publish: factors do not hash to the key")
        path = self.entry_path(key)
        factors_bytes = canonical_json(factors).encode()
        _write_atomic(os.path.join(path, FACTORS), factors_bytes)
        _write_atomic(os.path.join(path, ARTIFACTS), artifacts)
        manifest = {
            "format": FORMAT, "key": key, "created": time.time(), "meta": meta or {},
            "files": {FACTORS: {"size": len(factors_bytes), "sha256": _sha256(factors_bytes)},
                      ARTIFACTS: {"size": len(artifacts), "sha256": _sha256(artifacts)}},
            "inductor_files": _list_files(os.path.join(path, INDUCTOR)),
        }
        _fsync_dir(path)  # the data files are durable before the manifest names them
        _write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
        _fsync_dir(path)
        return Entry(key, path, json.loads(factors_bytes), artifacts, manifest)

    def discard(self, key: str) -> None:
        """Remove an entry (caller holds the key's lock): renamed away first, so nobody sees
        it half-deleted, then deleted."""
        path = self.entry_path(key)
        if not os.path.lexists(path):
            return
        tmp = os.path.join(self.root, _TMP)
        os.makedirs(tmp, exist_ok=True)
        trash = os.path.join(tmp, f"{key}.discarded.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except OSError as e:
            logger.warning("compile cache: cannot move %s aside (%s); deleting in place", path, e)
            trash = path
        if os.path.isdir(trash) and not os.path.islink(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(trash)
        if os.path.lexists(path):
            logger.error("compile cache: could not remove %s; remove it by hand", path)

    # ------------------------------------------------------------------ maintenance
    def keys(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if not n.startswith("."))

    def info(self) -> dict[str, Any]:
        """Every entry with its size and status (checksums verified; factors are not compared,
        no configuration being given; a build in progress shows as incomplete), plus leftovers
        of interrupted deletions in .tmp."""
        entries = []
        for key in self.keys():
            path = self.entry_path(key)
            item: dict[str, Any] = {"key": key, "path": path, "size_bytes": _tree_size(path)}
            try:
                entry = self.read(key)
                item.update(status="ok", created=entry.manifest.get("created"),
                            meta=entry.manifest.get("meta", {}))
            except CorruptEntry as e:
                with self._lock(key, blocking=False) as free:
                    item.update(status=f"corrupt: {e}" if free else "being built")
            entries.append(item)
        tmp = os.path.join(self.root, _TMP)
        pending = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
        triton_bytes = _tree_size(self.triton_dir)
        return {"root": self.root, "entries": entries, "triton_bytes": triton_bytes,
                "total_bytes": sum(e["size_bytes"] for e in entries) + triton_bytes
                + sum(_tree_size(os.path.join(tmp, n)) for n in pending),
                "pending": pending}

    def clear(self, key: Optional[str] = None) -> dict[str, list[str]]:
        """Delete every entry (or one key) and leftovers of interrupted deletions, and (clearing
        all) the shared triton cache. Keys being built by a live process right now are skipped
        and reported busy."""
        removed, busy = [], []
        keys = [key] if key is not None else self.keys()
        tmp = os.path.join(self.root, _TMP)
        pending = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
        for k in sorted(set(keys) | {n.split(".", 1)[0] for n in pending
                                     if key is None or n.split(".", 1)[0] == key}):
            with self._lock(k, blocking=False) as acquired:
                if not acquired:
                    busy.append(k)
                    continue
                if os.path.lexists(self.entry_path(k)):
                    self.discard(k)
                    removed.append(k)
                for name in pending:
                    if name.split(".", 1)[0] == k:
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        if key is None and not busy:
            # Safe even while another process runs: triton recompiles a missing kernel.
            shutil.rmtree(self.triton_dir, ignore_errors=True)
        return {"removed": removed, "busy": busy}
