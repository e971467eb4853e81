"""Scoring large image sets: sharded over torch.distributed ranks, streamed to disk, resumable.

`score_files(model, inputs, csv)` scores image files into one CSV, in input order, every image
exactly once. It runs the same in one process and in N processes started by torchrun (or by any
launcher that sets up `torch.distributed`); the CLI's `score` is a thin layer over it.

How a job runs (N ranks; one process is N = 1 without a process group):

1. Rank 0 lists the inputs once (folders sorted by name, globs sorted, duplicates dropped) and
   writes, per rank, the images still to score into the job's work folder. The other ranks read
   their own list from there: they never list anything, so nodes that see different files cannot
   disagree about the job; an image a rank cannot open is an unreadable image (reported, below).
2. Image j of the images to score goes to rank j % N (round robin: the shares differ by at most
   one image, also after a resume). Each rank decodes its images lazily (one batch ahead, in
   threads) and appends one line per image to its own part file, flushed per batch and fsynced
   every `FSYNC_SECONDS`, so memory stays flat in the number of images.
3. A rank that has finished writes a completion marker and waits at a barrier. Rank 0 then checks
   every marker and merges the parts (a streaming merge by input index) into the CSV, written to a
   temporary file and renamed over the destination: a CSV at that path is always complete. The
   work folder is then removed.

Resume (`resume=True`): rows already in the destination CSV or in the parts of an interrupted
run are kept when they belong to the current inputs and hold every column this run writes (a
heatmap file that is gone means the image is redone); every other image is scored. Unreadable
images are not "done": they are retried. Lines of a part are `<json>\\t<crc32 of the json>\\n`;
a line cut short by a kill, a full disk or a crash (no newline, a bad checksum, a bad field) is
dropped and its image redone, with a warning that counts them. A run is bound to its model: the
work folder records a fingerprint of the weights, config and thresholds, and resuming it with
another model is refused (a completed CSV carries no fingerprint: resuming from it, to score
images added since, trusts that the same model is used).

Work folder `<csv>.parts/` (beside the CSV: same filesystem, so the final rename is atomic; with
several nodes it must be on a filesystem every node sees, which is checked):

    job.json                  fingerprint and columns of the job
    todo-<run>-<rank>.jsonl   rank's images to score, in input order
    carried-<run>.jsonl       rows kept from earlier runs, in input order
    rank-<run>-<rank>.jsonl   rank's rows
    rank-<run>-<rank>.done    rank's completion marker

Faults: an unreadable image becomes an error row (path and reason, in `errors` when given) and
the job goes on, unless `strict`. A rank that fails or dies makes every other rank fail at the next
collective (gloo notices a closed connection at once; a rank that hangs is given up after
`timeout` seconds) with a message that says the parts are kept for `resume`; no CSV is written.
Under torchrun the whole job then exits non-zero, and its elastic restart (`--max-restarts`) with
`--resume` on the command line continues it.

Collectives: the default process group is gloo on CPUs and nccl on GPUs; the job's own control
messages (the run's id, the barrier with its timeout, the summary) go over a gloo group, which
notices a dead peer at once and never needs a GPU; each returns only once that group has let go
of the message's tensors (`_exchange`: else a process can abort as it exits).
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import heapq
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import weakref
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TextIO, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

DEFAULT_TIMEOUT_S = 1800.0
FSYNC_SECONDS = 10.0      # a power loss loses at most this much of a rank's work (then redone)
_WORK_SUFFIX = ".parts"
_JOB_FILE = "job.json"
_JOB_VERSION = 1
# Most a collective waits for gloo to free its tensors: ~500x the longest wait measured
# (bench/bench_let_go.py: 2 ranks on the 2-core VM beside a training run, 900 calls each,
# median 7 us, p99 0.4 ms, max 4.1 ms; bench/results/let_go_waits.log).
_LET_GO_S = 2.0
_WARN_ERRORS = 5          # unreadable images named on stderr before "... and N more"

__all__ = ["score_files", "JobSummary", "JobError", "UnreadableImageError", "World", "session",
           "list_inputs", "gather_in_order", "broadcast_state"]


class JobError(RuntimeError):
    """The job did not complete (a rank failed or died, or its parts are damaged); what it did is
    kept in the work folder for `resume`."""


class UnreadableImageError(ValueError):
    """An image could not be read and the job is `strict`."""


# ---------------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class World:
    """This process's place in the job. `group` is the gloo group for control messages (None:
    the default group, or no process group at all when `size == 1`)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, name: Union[str, torch.device, None] = None) -> torch.device:
        """The rank's device: `None` / "auto" is `cuda:LOCAL_RANK` when CUDA is available, else the
        CPU; "cuda" without an index is `cuda:LOCAL_RANK`; anything else is taken as given."""
        if name is None or str(name) == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank if self.distributed else
                                  torch.cuda.current_device())
        return device

    def fail(self, message: str) -> JobError:
        prefix = f"rank {self.rank} of {self.size}: " if self.distributed else ""
        return JobError(prefix + message)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _agent_shares_its_store() -> bool:
    """Whether torchrun's agent shares its rendezvous store with the workers (its default)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _warn_if_restarts_share_the_store() -> None:
    """Rank 0 warns when torchrun may restart workers that share its store: `_attempt_store`
    keeps the attempts' keys apart, but restarted workers can still fail to connect."""
    if _agent_shares_its_store() and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0 \
            and _env_int("RANK", 0) == 0:
        warnings.warn("torchrun shares its rendezvous store with the workers, and restarted "
                      "workers may still fail to connect (pytorch/pytorch#135712): for "
                      "--max-restarts, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                      "in its environment", RuntimeWarning, stacklevel=3)


def _attempt_store(dist, timeout: datetime.timedelta) -> dict:
    """init_process_group's store arguments: under a torchrun agent that shares its store with
    the workers, a key space of this restart attempt's own; else none (the env:// default).

    The agent's store outlives an elastic restart, and the process group's keys (each rank's
    address) are the same in every attempt: a restarted rank could read a dead rank's address
    from the attempt before and fail to connect, or hang (pytorch/pytorch#135712; seen here as
    "connectFullMesh failed ... Connection refused" after a rank died). Every worker of an
    attempt has the same TORCHELASTIC_RESTART_COUNT, so prefixing with it keeps attempts apart.
    """
    if not _agent_shares_its_store():
        return {}
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"simplenet_fast/attempt-{attempt}/", store), "rank": rank,
            "world_size": size}


@contextlib.contextmanager
def session(device: Union[str, torch.device, None] = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """The job's `World`, from an existing process group or from torchrun's environment.

    - A process group that the caller already initialised is used as it is (and left alone).
    - Otherwise, with `WORLD_SIZE` > 1 in the environment (torchrun sets it, with RANK,
      LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT), a process group is initialised
      (nccl when `device` is CUDA, else gloo) and destroyed on exit.
    - Otherwise this is a single process (`World()`).

    When it initialises the group on the CPU, each rank takes its share of the machine's cores
    for torch's (and the fused head's) threads, unless OMP_NUM_THREADS is set. torchrun sets
    OMP_NUM_THREADS=1 itself when it starts more than one process per node and the variable is
    unset: on a CPU machine, set it to cores / processes. With a group of your own, set the
    threads yourself (`torch.set_num_threads`).
    """
    import torch.distributed as dist

    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout_s!r}")
    timeout = datetime.timedelta(seconds=float(timeout_s))
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    elif _env_int("WORLD_SIZE", 1) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        kind = World(local_rank=local_rank, size=size).device(device).type
        if kind == "cuda":
            torch.cuda.set_device(local_rank)
        _warn_if_restarts_share_the_store()
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timeout,
                                **_attempt_store(dist, timeout))
        owned = True
    else:
        yield World(timeout_s=float(timeout_s))
        return
    try:
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                          timeout=timeout)
        world = World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", 0),
                      local_size=_env_int("LOCAL_WORLD_SIZE", size), group=group,
                      timeout_s=float(timeout_s))
        if owned and world.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // max(1, world.local_size)))
        yield world
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _collective(world: World, what: str, call, *args, **kwargs):
    """Run a torch.distributed call on the control group; a dead or hung peer becomes a JobError
    that says what to do."""
    try:
        return call(*args, group=world.group, **kwargs)
    except RuntimeError as error:  # gloo: "Connection closed by peer", timeouts
        raise world.fail(
            f"{what} failed: another rank stopped (crashed, was killed, or did not answer within "
            f"{world.timeout_s:g} s; see its own error). Completed work is kept: rerun with "
            f"--resume (resume=True) to finish the job. Details: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        ) from error


def _exchange(world: World, what: str, payload: bytes, kind: str) -> list:
    """Byte strings between the ranks over the control group: "broadcast" gives rank 0's payload
    on every rank ([payload]), "all_gather" every rank's in rank order, "gather" every rank's in
    rank order on rank 0 ([] elsewhere).

    torch's object collectives (broadcast_object_list, ...) would do this, but they hand the
    process group tensors that only they reference: gloo's worker thread lets go of a collective's
    tensors a moment after the call returns, and a tensor made in Python then frees its Python
    object from that thread. When the interpreter has begun to shut down by then, Python ends the
    thread in the middle of C++ destructors and the process aborts ("terminate called without an
    active exception", pytorch/pytorch#179291): rank 0 of a job that had completed, now and
    then. So the tensors are made here, and this returns only once the process group has let go
    of all of them (`_let_go`).
    """
    import torch.distributed as dist

    handed: list = []  # every tensor given to the process group

    def run() -> list:
        size = torch.tensor([len(payload)], dtype=torch.int64)
        if kind == "broadcast":
            handed.append(size)
            _collective(world, what, dist.broadcast, size, src=0)
            data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if world.is_main
                    else torch.empty(int(size), dtype=torch.uint8))
            handed.append(data)
            _collective(world, what, dist.broadcast, data, src=0)
            return [payload if world.is_main else data.numpy().tobytes()]
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(world.size)]
        handed.extend([size, *sizes])
        _collective(world, what, dist.all_gather, sizes, size)
        lengths = [int(s) for s in sizes]
        mine = torch.zeros(max(lengths), dtype=torch.uint8)  # gloo needs equal sizes: padded
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        parts = [torch.empty(max(lengths), dtype=torch.uint8) for _ in range(world.size)] \
            if kind == "all_gather" or world.is_main else None
        handed.extend([mine, *(parts or [])])
        if kind == "all_gather":
            _collective(world, what, dist.all_gather, parts, mine)
        else:
            _collective(world, what, dist.gather, mine, parts, dst=0)
        return [p[:n].numpy().tobytes() for p, n in zip(parts, lengths)] if parts else []

    # Once run() returns, `handed` alone references its tensors. When it raises, the job fails:
    # its traceback keeps them, and nothing waits for them.
    received = run()
    _let_go(handed)
    return received


def _let_go(tensors: list) -> None:
    """Empties `tensors` and waits, without the GIL, until nothing else holds any of them (the
    process group's worker threads: `_exchange`), for at most `_LET_GO_S`."""
    refs = [weakref.ref(t) for t in tensors]
    tensors.clear()
    deadline = time.monotonic() + _LET_GO_S
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.0002)


def _broadcast(world: World, value: Any, what: str) -> Any:
    """Rank 0's `value` on every rank. Values are pickled, as torch's object collectives do: the
    ranks of one job trust each other."""
    if not world.distributed:
        return value
    payload = _exchange(world, what, pickle.dumps(value) if world.is_main else b"", "broadcast")
    return value if world.is_main else pickle.loads(payload[0])


def _all_gather(world: World, value: Any, what: str) -> list:
    if not world.distributed:
        return [value]
    return [pickle.loads(p) for p in _exchange(world, what, pickle.dumps(value), "all_gather")]


def _barrier(world: World, what: str) -> None:
    if not world.distributed:
        return
    import torch.distributed as dist

    # monitored_barrier (gloo only) names a rank that does not arrive in time.
    _collective(world, what, dist.monitored_barrier,
                timeout=datetime.timedelta(seconds=world.timeout_s), wait_all_ranks=True)


def gather_in_order(world: World, mine: Sequence[Any]) -> Optional[list]:
    """Per-item values of a round-robin share (this rank's items `rank, rank + N, ...`) gathered
    back into input order on rank 0; None on the other ranks. The whole list lands on rank 0:
    meant for evaluation-sized sets (scores, and maps where masks exist)."""
    if not world.distributed:
        return list(mine)
    parts = [pickle.loads(p) for p in _exchange(world, "gathering the results",
                                                 pickle.dumps(list(mine)), "gather")]
    if not world.is_main:
        return None
    total = sum(len(p) for p in parts)
    out: list = [None] * total
    for r, part in enumerate(parts):
        out[r::world.size] = part
    return out


def broadcast_state(world: World, module: torch.nn.Module, what: str = "the model") -> None:
    """Rank 0's `module.state_dict()` loaded into `module` on every rank (a model trained once,
    on rank 0, scored by all)."""
    if not world.distributed:
        return
    state = None
    if world.is_main:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    state = _broadcast(world, state, f"sending {what} from rank 0")
    if not world.is_main:
        module.load_state_dict(state)


# ---------------------------------------------------------------------------------- inputs
def list_inputs(inputs: Union[PathLike, Sequence[PathLike]], recursive: bool = False
                ) -> list[str]:
    """Image paths of `inputs` (files, folders, glob patterns), in order, each path once.

    A folder gives its image files sorted by name (`preprocess.image_paths`; with `recursive`,
    its subfolders' too); a glob gives its matches sorted, folders among them expanded. A path
    given twice (a file inside a listed folder, say) is kept at its first place. Paths are plain
    strings: a million of them take ~100 MB while listing, on rank 0 only.
    Raises FileNotFoundError for an input that does not exist or a glob without matches.
    """
    import glob as globbing

    from .preprocess import image_paths

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            paths.extend(image_paths(text, recursive=recursive))
        elif os.path.isfile(text):
            paths.append(text)
        elif globbing.has_magic(text):
            matches = sorted(globbing.glob(text, recursive=True))
            found: list[str] = []
            for m in matches:
                found.extend(image_paths(m, recursive=recursive) if os.path.isdir(m) else [m])
            if not found:
                raise FileNotFoundError(f"no file matches {text!r}")
            paths.extend(found)
        else:
            raise FileNotFoundError(f"input {text!r} does not exist")
    if not paths:
        raise FileNotFoundError("no images in the inputs")
    digests = _digests(paths)
    _, first = np.unique(digests, return_index=True)
    if len(first) < len(paths):
        keep = np.sort(first)
        paths = [paths[i] for i in keep]
    return paths


def _digest(path: str) -> bytes:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _digests(paths: Sequence[str]) -> np.ndarray:
    """128-bit digests as an `S16` array: 16 bytes per path, where a set of the strings would
    take ~10x more. Collisions are out of reach (2**-64 for 10**10 paths)."""
    packed = bytearray(16 * len(paths))
    for k, path in enumerate(paths):
        packed[16 * k:16 * k + 16] = _digest(path)
    return np.frombuffer(packed, dtype="S16")


class _PathIndex:
    """Input index of a path, by digest (sorted digests and their positions)."""

    def __init__(self, paths: Sequence[str]):
        digests = _digests(paths)
        self.order = np.argsort(digests, kind="stable")
        self.sorted = digests[self.order]

    def lookup(self, paths: Sequence[str]) -> np.ndarray:
        """Input index of each path, -1 for a path not among the inputs."""
        query = _digests(paths)
        # Compared with both bounds: numpy's S dtype drops trailing NUL bytes when it hands an
        # element back, but compares fixed-width values consistently in sort and search.
        lo = np.searchsorted(self.sorted, query, "left")
        hi = np.searchsorted(self.sorted, query, "right")
        out = np.full(len(query), -1, dtype=np.int64)
        found = hi > lo
        out[found] = self.order[lo[found]]
        return out


def heatmap_names(paths: Sequence[str]) -> Iterator[str]:
    """Overlay file name per path, the same on every rank and run: `<stem>.png` when no other
    input has that stem, else `<stem>_<12 hex digits of the path's digest>.png`. Stems are
    compared by 64-bit digest (8 bytes a path; a collision only gives a longer name)."""
    def stem(path: str) -> str:
        return os.path.splitext(os.path.basename(path))[0]

    keys = np.fromiter((int.from_bytes(hashlib.blake2b(
        stem(p).encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
        for p in paths), dtype=np.uint64, count=len(paths))
    values, counts = np.unique(keys, return_counts=True)
    shared = np.isin(keys, values[counts > 1])
    for path, repeated in zip(paths, shared):
        yield f"{stem(path)}_{_digest(path).hex()[:12]}.png" if repeated else f"{stem(path)}.png"


# ---------------------------------------------------------------------------------- row files
_ROW_KEYS = ("i", "path", "score", "label", "normalized_score", "heatmap", "error")
_LABELS = ("", "normal", "anomalous")


def _encode(row: dict) -> bytes:
    text = json.dumps(row, ensure_ascii=True, separators=(",", ":"))
    return f"{text}\t{zlib.crc32(text.encode('ascii')):08x}\n".encode("ascii")


def _decode(line: bytes) -> Optional[dict]:
    """The row of a complete, undamaged line, or None."""
    if not line.endswith(b"\n"):
        return None  # cut short
    text, tab, check = line[:-1].rpartition(b"\t")
    if not tab or check != b"%08x" % zlib.crc32(text):
        return None
    try:
        row = json.loads(text)
    except ValueError:
        return None
    return row if isinstance(row, dict) and _valid_row(row) else None


def _valid_row(row: dict) -> bool:
    if set(row) != set(_ROW_KEYS) or not all(isinstance(row[k], str) for k in _ROW_KEYS[1:]):
        return False
    if isinstance(row["i"], bool) or not isinstance(row["i"], int) or row["i"] < 0:
        return False
    if row["error"]:
        return row["score"] == ""
    try:
        return math.isfinite(float(row["score"])) and row["label"] in _LABELS
    except ValueError:
        return False


def _read_rows(path: Path) -> Iterator[tuple[int, Optional[dict]]]:
    """(byte offset, row or None for a damaged line) per line of a row file."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            yield offset, _decode(line)
            offset += len(line)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------- the job
@dataclass
class JobSummary:
    """What a job did (on rank 0; the other ranks get the same object).

    images: inputs; scored: rows in the CSV with a score (this run's and resumed ones);
    resumed: of those, carried over from earlier runs; errors: unreadable images (retried by a
    resume); anomalous: scored images labelled anomalous (None without an image threshold);
    seconds: this run, from listing the inputs to the CSV in place; images_per_s: the images
    this run read (scored or found unreadable) over `seconds`; highest: (score, path) of the
    most anomalous image; first_errors: up to five (path, reason) pairs; dropped_lines: damaged
    lines of an earlier run whose images were scored again.
    """

    csv: Optional[str]
    images: int
    scored: int
    resumed: int
    errors: int
    anomalous: Optional[int]
    seconds: float
    world_size: int
    highest: Optional[tuple[float, str]] = None
    first_errors: list = field(default_factory=list)
    dropped_lines: int = 0

    @property
    def images_per_s(self) -> float:
        new = self.scored - self.resumed + self.errors
        return new / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class _Options:
    batch_size: int
    workers: int
    heatmaps: Optional[Path]
    side_by_side: bool
    strict: bool
    progress: bool


def _fingerprint(model) -> str:
    """What makes a row's values: the model's weights, config and thresholds. Two runs with the
    same fingerprint write the same row for the same image."""
    from .thresholds import current_thresholds

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    thresholds = current_thresholds(model)
    h.update(json.dumps([model.config, vars(thresholds)], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def score_files(model: Any, inputs: Union[PathLike, Sequence[PathLike]],
                csv_path: Union[PathLike, TextIO, None] = None, *,
                heatmaps: Optional[PathLike] = None, side_by_side: bool = False,
                resume: bool = False, errors: Optional[PathLike] = None, strict: bool = False,
                error_rows: bool = False, batch_size: int = 16, recursive: bool = False,
                workers: int = 4, device: Union[str, torch.device, None] = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = False) -> JobSummary:
    """Score image files into one CSV, in one process or across torch.distributed ranks.

    Call it on every rank (torchrun: each worker; one process: just call it). See the module
    doc for how the work is shared, streamed, resumed and checked.

    model: a `SimpleNet`, or the path of a saved one (loaded on this rank's device: `device`,
        default `cuda:LOCAL_RANK` when CUDA is available, else the CPU).
    inputs: image files, folders, glob patterns (a path or a list); `recursive` takes folders'
        subfolders too. Listed once, by rank 0.
    csv_path: the CSV to write (columns path, score, label, normalized_score, then heatmap with
        `heatmaps`, then error with `error_rows`), replaced atomically when the job completes.
        A text stream (one process only) gets the rows at the end; None writes no CSV (one
        process only; the summary still counts everything).
    heatmaps: folder for one overlay PNG per image (`side_by_side`: the image left of it).
    resume: keep the rows an earlier, interrupted or completed, run of the same job left at
        `csv_path` and score only the rest; without it, earlier outputs are discarded.
    errors: write the unreadable images here (CSV: path, error), in input order.
    strict: stop at the first unreadable image (UnreadableImageError) instead of going on.
    error_rows: also put unreadable images in the CSV (label "error", an error column): the
        CLI's deprecated --skip-errors format.
    batch_size: images per forward pass; workers: decoding threads per rank.
    timeout_s: how long a rank waits for the others at the end before giving up.
    progress: a progress bar on rank 0's stderr (its own share).

    Returns a `JobSummary` on every rank. Raises JobError when the job did not complete (its
    work is kept for `resume`), UnreadableImageError with `strict`, ValueError /
    FileNotFoundError for bad arguments.
    """
    from .model import SimpleNet

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    stream = csv_path if csv_path is not None and hasattr(csv_path, "write") else None
    with session(device if not isinstance(model, SimpleNet) else model.device, timeout_s) as world:
        if stream is not None or csv_path is None:
            if world.distributed:
                raise ValueError("with several ranks, csv_path must be a file path on a filesystem "
                                 "every rank sees (the ranks' parts are merged there)")
            if resume:
                raise ValueError("resume needs csv_path to be a file path (the rows to keep are "
                                 "read from it and from its work folder)")
        if not isinstance(model, SimpleNet):
            model = SimpleNet.load(model, map_location=world.device(device))
        options = _Options(batch_size=batch_size, workers=workers,
                           heatmaps=None if heatmaps is None else Path(heatmaps),
                           side_by_side=side_by_side, strict=strict, progress=progress)
        if stream is None and csv_path is not None:
            return _run(model, world, inputs, recursive, Path(os.fspath(csv_path)), None,
                        resume, errors, error_rows, options)
        with tempfile.TemporaryDirectory(prefix="simplenet-fast-") as folder:
            summary = _run(model, world, inputs, recursive, Path(folder) / "scores.csv", stream,
                           False, errors, error_rows, options)
        summary.csv = None
        return summary


def _run(model, world: World, inputs, recursive: bool, out: Path, stream: Optional[TextIO],
         resume: bool, errors: Optional[PathLike], error_rows: bool,
         options: _Options) -> JobSummary:
    work = out.with_name(out.name + _WORK_SUFFIX)
    columns = ["path", "score", "label", "normalized_score"] \
        + (["heatmap"] if options.heatmaps is not None else []) + (["error"] if error_rows else [])
    start = time.perf_counter()
    setup: Any = None
    if world.is_main:
        try:
            setup = _prepare(model, world, inputs, recursive, out, work, resume, errors, columns,
                             options)
        except Exception as error:  # noqa: BLE001 - told to the other ranks, then raised here
            _broadcast(world, {"error": f"rank 0 could not set the job up: {error}"},
                       "setting the job up")
            raise
    setup = _broadcast(world, setup, "setting the job up")
    if "error" in setup:
        raise world.fail(setup["error"])
    todo = work / f"todo-{setup['run']}-{world.rank}.jsonl"
    seen = _all_gather(world, todo.is_file(), "checking the work folder")
    if not all(seen):
        blind = [r for r, ok in enumerate(seen) if not ok]
        raise world.fail(f"rank(s) {blind} cannot see the job's work folder {work}: with several "
                         "nodes, the CSV (and heatmaps) must be on a filesystem every node sees")

    part = work / f"rank-{setup['run']}-{world.rank}.jsonl"
    rows = _score_share(model, world, todo, part, setup["assigned"][world.rank], options)
    _write_atomic(part.with_suffix(".done"), json.dumps({"rows": rows}).encode())
    _barrier(world, "waiting for every rank to finish its share")

    summary: Any = None
    if world.is_main:
        try:
            summary = _assemble(work, setup, world, out, stream, errors, columns, error_rows)
            summary.seconds = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - told to the other ranks, then raised here
            _broadcast(world, {"error": f"rank 0 could not assemble the CSV: {error}"},
                       "assembling the CSV")
            raise
    summary = _broadcast(world, summary, "assembling the CSV")
    if isinstance(summary, dict):
        raise world.fail(summary["error"])
    return summary


# ---------------------------------------------------------------------------------- rank 0: setup
def _prepare(model, world: World, inputs, recursive: bool, out: Path, work: Path, resume: bool,
             errors: Optional[PathLike], columns: list[str], options: _Options) -> dict:
    """List the inputs, keep what an earlier run did (resume), write each rank's list."""
    for what, path in (("the CSV", out), ("the errors file", errors)):
        if path is not None and not Path(path).parent.is_dir():
            raise FileNotFoundError(f"folder {str(Path(path).parent)!r} of {what} does not exist")
    paths = list_inputs(inputs, recursive)
    fingerprint = _fingerprint(model)
    run = uuid.uuid4().hex[:12]
    earlier_job = work / _JOB_FILE
    if resume and earlier_job.is_file():
        try:
            recorded = json.loads(earlier_job.read_text())
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("fingerprint") != fingerprint:
            raise ValueError(f"the partial results in {work} were made with another model or "
                             "other thresholds: rerun without --resume (resume=False) to start "
                             "over")
    if not resume:
        if work.exists():
            warnings.warn(f"discarding the partial results of an earlier run in {work} (pass "
                          "--resume, resume=True, to keep them)")
        shutil.rmtree(work, ignore_errors=True)
        out.unlink(missing_ok=True)
    work.mkdir(exist_ok=True)
    if options.heatmaps is not None:
        options.heatmaps.mkdir(parents=True, exist_ok=True)
        from ._io import PARTIAL_PATTERN
        for stale in options.heatmaps.glob(PARTIAL_PATTERN):  # overlays a kill cut short
            stale.unlink(missing_ok=True)
    _write_atomic(earlier_job, json.dumps({"version": _JOB_VERSION, "fingerprint": fingerprint,
                                           "columns": columns}).encode())

    done, dropped = np.zeros(len(paths), dtype=bool), 0
    carried = work / f"carried-{run}.jsonl"
    if resume:
        sources = sorted(p for p in work.iterdir() if p.suffix == ".jsonl"
                         and p.name.startswith(("rank-", "carried-")))
        if out.is_file():
            imported = work / f"imported-{run}.jsonl"
            _import_csv(out, imported)
            sources.insert(0, imported)
        dropped = _carry(sources, _PathIndex(paths), options.heatmaps, carried, done)
        for old in work.iterdir():  # earlier runs' parts, lists, markers, temporary files
            if old.name not in (_JOB_FILE, carried.name):
                old.unlink()
    else:
        _write_atomic(carried, b"")

    assigned = [0] * world.size
    names = heatmap_names(paths) if options.heatmaps is not None else None
    files = [open(work / f"todo-{run}-{r}.jsonl", "w", encoding="ascii") for r in range(world.size)]
    try:
        j = 0
        for i, path in enumerate(paths):
            name = next(names) if names is not None else ""
            if done[i]:
                continue
            r = j % world.size
            files[r].write(json.dumps({"i": i, "path": path, "heatmap": name}) + "\n")
            assigned[r] += 1
            j += 1
    finally:
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
    _fsync_dir(work)
    return {"run": run, "images": len(paths), "resumed": int(done.sum()), "assigned": assigned,
            "dropped": dropped}


def _import_csv(csv_file: Path, out: Path) -> None:
    """A completed CSV's scored rows in the row-file format (index 0: `_carry` places rows by
    their path)."""
    with open(csv_file, newline="", encoding="utf-8", errors="surrogateescape") as f, \
            open(out, "wb") as sink:
        for row in csv.DictReader(f):
            if not row.get("path") or row.get("label") == "error":
                continue
            try:
                score = float(row.get("score") or "nan")
            except ValueError:
                continue
            if not math.isfinite(score):
                continue
            sink.write(_encode({"i": 0, "path": row["path"], "score": row["score"],
                                "label": row.get("label") or "",
                                "normalized_score": row.get("normalized_score") or "",
                                "heatmap": row.get("heatmap") or "", "error": ""}))


def _carry(sources: list[Path], index: _PathIndex, heatmaps: Optional[Path], carried: Path,
           done: np.ndarray) -> int:
    """Write the rows of `sources` worth keeping to `carried`, in input order, and mark them in
    `done`; returns how many damaged lines were dropped. Memory: 20 bytes per kept row (its
    index, source and offset); the rows themselves are read again from their files."""
    keep_index, keep_source, keep_offset = array("q"), array("i"), array("q")
    dropped = 0
    chunk: list[tuple[int, int, dict]] = []

    def flush():
        if not chunk:
            return
        found = index.lookup([row["path"] for _, _, row in chunk])
        for (s, offset, row), i in zip(chunk, found):
            if i < 0 or done[i] or row["error"]:
                continue  # not an input any more, kept already, or to be retried
            if heatmaps is not None and not (row["heatmap"] and os.path.isfile(row["heatmap"])):
                continue  # an overlay is asked for and it is missing
            done[i] = True
            keep_index.append(int(i))
            keep_source.append(s)
            keep_offset.append(offset)
        chunk.clear()

    for s, source in enumerate(sources):
        for offset, row in _read_rows(source):
            if row is None:
                dropped += 1
                continue
            chunk.append((s, offset, row))
            if len(chunk) >= 4096:
                flush()
    flush()
    if dropped:
        warnings.warn(f"{dropped} damaged line(s) in the partial results (cut short by the "
                      "interruption?) were dropped; their images are scored again")
    order = np.argsort(np.array(keep_index, dtype=np.int64), kind="stable")
    handles = [open(p, "rb") for p in sources]
    tmp = carried.with_name(carried.name + ".tmp")
    try:
        with open(tmp, "wb") as sink:
            for k in order:
                f = handles[keep_source[k]]
                f.seek(keep_offset[k])
                row = _decode(f.readline())
                row["i"] = keep_index[k]
                sink.write(_encode(row))
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        for f in handles:
            f.close()
    os.replace(tmp, carried)
    return dropped


# ---------------------------------------------------------------------------------- every rank
def _my_items(todo: Path) -> Iterator[dict]:
    with open(todo, encoding="ascii") as f:
        for line in f:
            yield json.loads(line)


def _prepare_image(model, path: str, keep_image: bool):
    """(`PreparedImage` for the model's geometry, None) or (None, the error): thread-safe."""
    try:
        return model.prepare(path, what=path, keep_image=keep_image), None
    except (ValueError, FileNotFoundError, OSError) as error:
        return None, error


def _decoded_batches(items: Iterator[dict], batch_size: int, model, workers: int,
                     keep_image: bool) -> Iterator[list[tuple[dict, Any, Optional[BaseException]]]]:
    """Batches of (item, `PreparedImage` or None, error or None); the next batch decodes in
    threads while the caller scores this one, so at most two batches of images are held.
    `keep_image` keeps each decoded original, for overlays on the whole image."""
    from .preprocess import batched, prefetched

    def decoded(item: dict) -> tuple[dict, Any, Optional[BaseException]]:
        return (item, *_prepare_image(model, item["path"], keep_image))

    return batched(prefetched(decoded, items, workers, ahead=batch_size), batch_size)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def format_score(value: float) -> str:
    """The shortest text that reads back as the same float32 (a score's CSV field)."""
    return str(np.float32(value))


def _score_share(model, world: World, todo: Path, part: Path, assigned: int,
                 options: _Options) -> int:
    """Score this rank's images, appending a row per image to `part`; returns the rows written."""
    from tqdm.auto import tqdm

    from .thresholds import current_thresholds
    from .visualize import heatmap_range

    thresholds = current_thresholds(model)
    can_normalise = thresholds.image is not None and thresholds.image_min is not None
    scale = heatmap_range(thresholds)
    written = 0
    last_sync = time.monotonic()
    bar = tqdm(total=assigned, unit="img", file=sys.stderr,
               disable=not (options.progress and world.is_main),
               desc="scoring" + (f" (rank 0 of {world.size})" if world.distributed else ""))
    try:
        with open(part, "ab") as sink:
            for batch in _decoded_batches(_my_items(todo), options.batch_size, model,
                                          options.workers, options.heatmaps is not None):
                good = [k for k, (_, crop, _) in enumerate(batch) if crop is not None]
                rows = [{"i": it["i"], "path": it["path"], "score": "", "label": "",
                         "normalized_score": "", "heatmap": "", "error": ""}
                        for it, _, _ in batch]
                for row, (_, _, error) in zip(rows, batch):
                    if error is not None:
                        if options.strict:
                            raise UnreadableImageError(_reason(error))
                        row["error"] = _reason(error)
                if good:
                    _score_batch(model, [batch[k] for k in good], [rows[k] for k in good],
                                 thresholds, can_normalise, scale, options)
                sink.write(b"".join(_encode(row) for row in rows))
                sink.flush()  # survives a kill of this process
                if time.monotonic() - last_sync > FSYNC_SECONDS:
                    os.fsync(sink.fileno())  # survives a crash of the machine
                    last_sync = time.monotonic()
                written += len(rows)
                bar.update(len(rows))
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        bar.close()
    if written != assigned:
        raise world.fail(f"scored {written} images of its {assigned} (its list in {todo} changed "
                         "during the run?)")
    return written


def _score_batch(model, batch: list, rows: list[dict], thresholds, can_normalise: bool,
                 scale, options: _Options) -> None:
    """Fill `rows` with the scores (and overlays) of the readable images of one batch."""
    from .thresholds import normalize_scores

    # Overlays show the whole original image: maps in its own pixels (SPEC 8).
    result = model.score([prepared for _, prepared, _ in batch], batch_size=options.batch_size,
                         map_size="input" if options.heatmaps is not None else None)
    scores = result.pred_score.float().cpu()
    labels = None if result.pred_label is None else result.pred_label.cpu()
    normalised = normalize_scores(scores.double().numpy(), thresholds) if can_normalise else None
    if options.heatmaps is not None:  # one device-to-host copy per image
        maps = [m.float().cpu().numpy() for m in result.anomaly_map]
        masks = None if result.pred_mask is None else [m.cpu().numpy() for m in result.pred_mask]
    for k, (row, (item, prepared, _)) in enumerate(zip(rows, batch)):
        row["score"] = format_score(float(scores[k]))
        if labels is not None:
            row["label"] = "anomalous" if bool(labels[k]) else "normal"
        if normalised is not None:
            row["normalized_score"] = f"{normalised[k]:.6f}"
        if options.heatmaps is not None:
            mask = masks[k] if masks is not None and row["label"] != "normal" else None
            row["heatmap"] = write_overlay(options.heatmaps / item["heatmap"], prepared.image(),
                                           maps[k], mask, scale, options.side_by_side)


def write_overlay(path: Path, image: np.ndarray, amap: np.ndarray, mask: Optional[np.ndarray],
                  scale: Optional[tuple[float, float]], side_by_side: bool) -> str:
    """One overlay PNG of the whole image, written under a hidden temporary name and renamed
    (`save_overlay`): a file with the final name is always whole. Returns its path."""
    from .visualize import save_overlay

    vmin, vmax = scale if scale else (None, None)
    save_overlay(path, image, amap, mask=mask, vmin=vmin, vmax=vmax, side_by_side=side_by_side)
    return str(path)


# ---------------------------------------------------------------------------------- rank 0: merge
def _assemble(work: Path, setup: dict, world: World, out: Path, stream: Optional[TextIO],
              errors: Optional[PathLike], columns: list[str], error_rows: bool) -> JobSummary:
    """Merge the carried rows and every rank's part into the CSV (and the errors file), checking
    that every input appears exactly once; then remove the work folder."""
    run = setup["run"]
    parts = [work / f"rank-{run}-{r}.jsonl" for r in range(world.size)]
    for r, part in enumerate(parts):
        marker = part.with_suffix(".done")
        try:
            rows = json.loads(marker.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            raise world.fail(f"rank {r} left no completion marker in {work}: its share is not "
                             "done; rerun with --resume") from None
        if rows != setup["assigned"][r]:
            raise world.fail(f"rank {r} reports {rows} rows of its {setup['assigned'][r]}")
    sources = [work / f"carried-{run}.jsonl"] + parts

    def rows_of(source: Path) -> Iterator[dict]:
        for _, row in _read_rows(source):
            if row is None:
                raise world.fail(f"{source} holds a damaged line after its rank finished (disk "
                                 "error?); no CSV was written: rerun with --resume to redo it")
            yield row

    summary = JobSummary(csv=str(out), images=setup["images"],
                         scored=0, resumed=setup["resumed"], errors=0, anomalous=None,
                         seconds=0.0, world_size=world.size,
                         dropped_lines=setup["dropped"])
    tmp = out.with_name(f"{out.name}.tmp-{run}")
    error_file = None if errors is None else Path(errors)
    error_tmp = None if error_file is None else error_file.with_name(f"{error_file.name}.tmp-{run}")
    expected = 0
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as sink, \
            (open(error_tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
             if error_tmp else contextlib.nullcontext()) as error_sink:
        writer = csv.writer(sink)
        writer.writerow(columns)
        error_writer = csv.writer(error_sink) if error_sink else None
        if error_writer:
            error_writer.writerow(["path", "error"])
        for row in heapq.merge(*(rows_of(s) for s in sources), key=lambda r: r["i"]):
            if row["i"] != expected:
                what = "appears twice" if row["i"] < expected else "is missing"
                raise world.fail(f"input {min(row['i'], expected)} {what} in the parts of {work}; "
                                 "no CSV was written: rerun with --resume")
            expected += 1
            if row["error"]:
                summary.errors += 1
                if len(summary.first_errors) < _WARN_ERRORS:
                    summary.first_errors.append((row["path"], row["error"]))
                if error_writer:
                    error_writer.writerow([row["path"], row["error"]])
                if not error_rows:
                    continue
                row = dict(row, label="error")
            else:
                summary.scored += 1
                value = float(row["score"])
                if summary.highest is None or value > summary.highest[0]:
                    summary.highest = (value, row["path"])
                if row["label"]:
                    summary.anomalous = (summary.anomalous or 0) + (row["label"] == "anomalous")
            writer.writerow([row[c] for c in columns])
        if expected != setup["images"]:
            raise world.fail(f"the parts of {work} hold {expected} of {setup['images']} inputs; "
                             "no CSV was written: rerun with --resume")
        for f in (sink, error_sink):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
    if error_file is not None:
        os.replace(error_tmp, error_file)
    if stream is not None:
        with open(tmp, newline="", encoding="utf-8", errors="surrogateescape") as f:
            shutil.copyfileobj(f, stream)
        stream.flush()
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(work, ignore_errors=True)
    return summary
