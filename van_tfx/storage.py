"""Paths that may be object storage (gs://, s3://, ...): read and written through tf.io.gfile.

On Kubeflow/Vertex every artifact URI is a bucket path. Python's own file calls (open, glob,
shutil, os.path, h5py) only see this machine's disk; these helpers go through tf.io.gfile, and
hand a local copy to code that can only work on local files (h5py, a server subprocess).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import threading
import uuid

# Calls in flight at once for per-file work over many files: on object storage each open,
# read or rename is a round trip (~0.1 s; a rename is a copy and a delete), so ImageNet-1k's
# ~1,300 shards took minutes one after another.
CONCURRENT_CALLS = 16


def for_each_file(function, *iterables) -> list:
    """`function` over the zipped `iterables`, CONCURRENT_CALLS at a time; the results in order."""
    # The first failure in that order is re-raised.
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CALLS) as pool:
        return list(pool.map(function, *iterables))


# Bytes a ranged read fetches per request: a TFRecord header and an ImageNet record (~110 KB)
# in one request, more only for a larger record.
RANGE_BYTES = 256 << 10


def open_ranged(path: str, chunk: int = RANGE_BYTES):
    """(stream, size) of gs:// `path` read in byte ranges; None if not gs:// or no client."""
    # TF's GCS file system fills a GCS_READ_CACHE_BLOCK_SIZE_MB buffer (64 MiB by default) with
    # one ranged GET on the first read of every open (tsl gcs_file_system.cc,
    # BufferedGcsRandomAccessFile::FillBuffer), so reading a shard's first record fetched up to
    # 64 MiB of it. google-cloud-storage's BlobReader (Beam 2.59's gcsio reads with it too, 16 MiB
    # at a time) fetches what is read.
    if not str(path).startswith("gs://"):
        return None
    client = _gcs_client()
    if client is None:
        return None
    bucket, _, name = str(path)[len("gs://") :].partition("/")
    blob = client.bucket(bucket).get_blob(name)  # one metadata request: the size
    if blob is None:
        raise FileNotFoundError(f"{path} does not exist")
    return blob.open("rb", chunk_size=chunk), blob.size


_GCS_CLIENT_LOCK = threading.Lock()
_GCS = {}  # "client": this process's google-cloud-storage client, or None when none can be had


def _gcs_client():
    # Made once, under a lock: the threads of for_each_file all ask at once, and each lookup of
    # credentials may be a request to the metadata server.
    with _GCS_CLIENT_LOCK:
        if "client" not in _GCS:
            _GCS["client"] = _new_gcs_client()
        return _GCS["client"]


def _new_gcs_client():
    # None without google-cloud-storage or credentials: the caller reads through tf.io.gfile,
    # which also reads public buckets without credentials.
    try:
        import google.auth.exceptions
        from google.cloud import storage as gcs
    except ImportError:
        return None
    try:
        return gcs.Client(project=None)  # no project: reads need none
    except google.auth.exceptions.DefaultCredentialsError:
        return None


def is_remote(path: str) -> bool:
    """Whether `path` names a file system other than this machine's (it has a URI scheme)."""
    return "://" in str(path)


def copy_tree(source: str, destination: str, last: tuple[str, ...] = ()) -> None:
    """Copy the directory tree `source` to `destination` (either may be object storage)."""
    # Empty directories are recreated too (a SavedModel's `assets/`). Files already at the
    # destination are overwritten, so a retried step can write the same output URI again. The files
    # at the relative paths `last` are copied after every other one: a model server takes a version
    # directory as complete once its `saved_model.pb` is there.
    import tensorflow as tf

    source = str(source).rstrip("/")
    if not tf.io.gfile.isdir(source):
        raise FileNotFoundError(f"{source} is not a directory")
    deferred = []
    for directory, _subdirs, files in tf.io.gfile.walk(source):
        # Object stores may list directories with a trailing '/': strip it before joining.
        relative = directory.rstrip("/")[len(source) :].strip("/")
        target = os.path.join(destination, relative) if relative else str(destination)
        tf.io.gfile.makedirs(target)
        for name in files:
            path = os.path.join(directory, name)
            # TensorFlow's ram:// (the tests' stand-in for a bucket) lists `assets.extra` under
            # `assets/` too, as a file `.extra` that does not exist: skip what is not there.
            if not tf.io.gfile.exists(path):
                continue
            if os.path.join(relative, name) in last:
                deferred.append((path, os.path.join(target, name)))
            else:
                tf.io.gfile.copy(path, os.path.join(target, name), overwrite=True)
    for path, target in deferred:
        tf.io.gfile.copy(path, target, overwrite=True)


def write_text(path: str, text: str) -> None:
    """Write a small text file (directory created), local or on object storage, all or nothing."""
    # Whole or not at all: readers (the NewDataGate, next run) never see half a record.
    if not is_remote(path):
        write_local_text(path, text)
        return
    import tensorflow as tf

    path = str(path)
    tf.io.gfile.makedirs(os.path.dirname(path))
    partial = f"{path}.partial-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(partial, "w") as handle:
        handle.write(text)
    tf.io.gfile.rename(partial, path, overwrite=True)


def write_local_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file on this machine as UTF-8, whole or not at all (its directory created)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    # Hidden and unique: a glob over the directory never matches it, and two writers of one file
    # (two builds, two processes saving a config) never share it.
    partial = os.path.join(directory, f".{name}.partial-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory or ".", exist_ok=True)
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(partial, path)
    except OSError as exc:
        if exc.filename:
            raise
        # A failed write (a full disk) names no file.
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


@contextlib.contextmanager
def local_copy(path: str):
    """Yield a local path holding the file `path`: `path` itself when local, else a temp copy."""
    # The copy keeps the file's name (libraries pick formats from suffixes such as .weights.h5).
    if not is_remote(path):
        yield str(path)
        return
    import tensorflow as tf

    with _local_twin(path) as local:
        tf.io.gfile.copy(path, local, overwrite=True)
        yield local


@contextlib.contextmanager
def local_output(path: str):
    """Yield a local path to write the file `path` to; a remote `path` gets it uploaded after."""
    # Nothing is uploaded when the block raises.
    if not is_remote(path):
        yield str(path)
        return
    import tensorflow as tf

    with _local_twin(path) as local:
        yield local
        tf.io.gfile.makedirs(os.path.dirname(str(path)))
        tf.io.gfile.copy(local, path, overwrite=True)


@contextlib.contextmanager
def _local_twin(path: str):
    """A path with the file name of `path` in a fresh local temp dir, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="van-tfx-")
    try:
        yield os.path.join(directory, os.path.basename(str(path).rstrip("/")))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
