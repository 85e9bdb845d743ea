"""Files that must survive a crash or a full disk: written whole or not at all, by their own writer, and on
disk before anything points at them.

`write_atomic(path, write)` lets `write` fill a temporary file that only this writer uses (its name holds
the host, the process id and a random part, so two runs, or two trials of a sweep, writing the same path
never touch each other's half-written file), flushes it to disk (fsync), renames it into place (atomic: a
reader sees the old file or the new one) and flushes the folder, so that the rename itself survives a
power cut. A failed write (a full disk, a read-only folder; safetensors reports those as its own
`SafetensorError`, not `OSError`) removes the temporary file and raises `WriteFailed`, one line naming the
path and the cause. `remove_stale(folder)` removes the temporary files that writers on this host left when
they died.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Callable

from raycache.errors import RunFailed

_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


class WriteFailed(RunFailed):
    """A file could not be written (disk full, no permission, ...): the run cannot keep its promise to keep
    it, and ends FAILED with this one line; what was written before stays whole."""


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` that belongs to this writer alone."""
    return path.with_name(f".{path.name}.{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def cause(err: BaseException) -> str:
    """The reason of a failed write in a few words ("No space left on device")."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    found = re.search(r"(?:I/O error: |message: \")([^\"(]+)", text)  # safetensors wraps the OS's message
    return found.group(1).strip() if found else text[:160]


def _is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError"


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], what: str = "file", durable: bool = True) -> Path:
    """Write `path` whole or not at all (see the module's docstring); `what` names it in an error.
    `durable=False` skips the fsyncs (a cache that is rebuilt when damaged)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if _is_write_error(err):
            raise WriteFailed(f"cannot write {what} {path}: {cause(err)}") from None
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: Path) -> int:
    """Remove the temporary files in `folder` whose writer (a process on this host) is no longer alive;
    other hosts' and live writers' files are left alone. Returns how many were removed."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != host_name() or _alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir():
                import shutil

                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def check_private(folder: Path, what: str) -> None:
    """Refuse (UserError, one line) to read `folder` back with pickle unless only this user could have
    written it: the folder, everything under it and every folder above it up to the root must be owned by
    this user or root and writable by no one else: not by others, and not by a group other than the user's
    own private one (umask 002 systems); a sticky shared folder such as /tmp is fine above it (the kernel
    keeps others from replacing what is ours there), never inside it."""
    import stat

    from raycache.errors import UserError

    me = os.geteuid()

    def private_group(gid: int) -> bool:
        """The user's own group with no other members (umask 002 systems give every user one)."""
        import grp
        import pwd

        try:
            group, user = grp.getgrgid(gid), pwd.getpwuid(me)
        except KeyError:
            return False
        return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}

    def bad(path: Path, st, above: bool) -> str | None:
        if st.st_uid not in (me, 0):
            return f"is owned by another user (uid {st.st_uid})"
        if st.st_mode & stat.S_IWOTH and not (above and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
        if st.st_mode & stat.S_IWGRP and not private_group(st.st_gid) and \
                not (above and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"can be written by its group (mode {stat.S_IMODE(st.st_mode):o})"
        return None

    folder = Path(folder).resolve()
    above = list(reversed(folder.parents))  # a sticky shared folder (/tmp) is fine above, never inside
    for path in [*above, folder, *sorted(folder.rglob("*"))]:
        try:
            st = path.stat()  # a link is judged by what it points at (its own mode means nothing)
        except OSError:
            continue
        why = bad(path, st, path in above)
        if why is not None:
            raise UserError(f"{what}: {path} {why}; restoring it would unpickle files another user could have "
                            f"written. Make it yours alone (chmod -R go-w {folder}) or start afresh")
