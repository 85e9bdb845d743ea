"""User-facing errors: a bad config, a bad file, a missing model. The CLI turns these into exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line, never with a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: str) -> str:
    """`message` as one printable line: newlines become spaces, and any other control or line-breaking
    character (a user's key can hold one) is shown escaped instead of breaking the line or the terminal."""
    message = message.replace("\n", " ").strip()
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class RunFailed(RuntimeError):
    """A run cannot go on for a reason that is not a bug: too few clients reported a round, or a client's
    training diverged. The run is recorded FAILED with this reason; the CLI prints it as one line."""


class StopRun(Exception):
    """Raised by a per-round callback to end a run early, cleanly (e.g. a sweep's scheduler stopped its
    trial): the rounds done so far stay logged, and the run ends KILLED with `stopped_by` = reason."""

    clean = True  # the run's actors are healthy (a warm pool may keep them)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _chain(exc: BaseException):
    """`exc` and every exception behind it: Ray re-raises a remote failure as `RayTaskError(X)` (an instance
    of both) or wraps it (Ray Data's `UserCodeException`), so the original can sit in `cause`, `__cause__`
    or `__context__`."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])


def find_run_failure(exc: BaseException) -> RunFailed | None:
    """The RunFailed behind `exc` (possibly raised inside an actor and wrapped by Ray)."""
    for e in _chain(exc):
        if isinstance(e, RunFailed):
            return RunFailed(str(e.args[0]).splitlines()[0]) if e.args else e
    return None


def find_user_error(exc: BaseException) -> UserError | None:
    """Return the UserError behind `exc`, looking through Ray's wrappers and exception chains."""
    for e in _chain(exc):
        if isinstance(e, UserError):
            # RayTaskError(UserError) carries the remote traceback in its str(); keep only our line.
            return UserError(str(e.args[0])) if e.args else e
    # Across a process boundary the chain can be lost (Ray Data re-raises a UserCodeException whose cause
    # survives only in the remote traceback text): recover our one line from that text.
    for line in reversed(str(exc).splitlines()):
        if line.startswith(_MARK):
            return UserError(line[len(_MARK):])
    return None


_MARK = f"{UserError.__module__}.{UserError.__qualname__}: "
