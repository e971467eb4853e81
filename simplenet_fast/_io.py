"""Writing files so that a failed call leaves nothing half-written."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator

# A file being written is `.<name>.<random hex>.partial` beside its target: hidden, so that no
# folder listing takes it for an input, and recognisable, so that a killed run's leftovers can be
# removed (`simplenet_fast.distributed` does so in its heatmap folder).
PARTIAL_PATTERN = ".*.partial"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file to write `path` through: a new temporary file beside `path` (default permissions),
    renamed over `path` when the block ends normally and removed when it raises.

    The rename is atomic on POSIX and Windows, so `path` holds either its old content or the
    whole new one, never a truncated file. `mode` is "w" (text) or "wb"; `kwargs` go to `open`.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.partial")
    try:
        with open(temporary, mode.replace("w", "x"), **kwargs) as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
