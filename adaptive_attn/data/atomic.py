"""Files written whole or not at all, also by several processes at once (two sweep lanes building the same
token cache): each writer writes a temporary file of its own beside the target, then renames it over the
target in one step, so a reader sees the old file or a complete new one, never a partial one."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

UMASK = os.umask(0)  # read it (there is no getter), then put it back
os.umask(UMASK)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a fresh temporary file in path's folder (its name ends like path's), which then
    replaces `path`; if `write` raises, the temporary file is removed and `path` left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.fchmod(fd, 0o666 & ~UMASK)  # as an ordinary new file, not mkstemp's owner-only 0600
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
