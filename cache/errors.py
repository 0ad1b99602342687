"""The two kinds of failure lsdc tells apart: the user's to fix, and ours.

A `UserError` is something the user gave that cannot be used: a path, a setting, a table, a cache, a checkpoint. The
`lsdc` command prints it as one line (`lsdc <command>: <what, and how to fix it>`) and exits 2. Anything else that
escapes a command is a bug and keeps its traceback. Notebook code can catch `UserError` the same way.

Every lsdc error a user can cause derives from it: `cache.CacheError` (and its kinds), `prep.samples.TableError`,
`SettingError` (a config value out of range), `InputError` (a file or table lsdc cannot use). The subclasses of
`ValueError` stay ValueErrors too, so code that caught ValueError before still does.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Something the user gave that lsdc cannot use; the message names it and says what to do."""


class SettingError(UserError, ValueError):
    """A config value (PrepConfig, TrainConfig, a CLI option) that cannot be right: non-finite, out of range."""


class InputError(UserError, ValueError):
    """An input file, folder or table lsdc cannot use (not a checkpoint, a submission with the wrong rows, ...)."""


class MissingInput(UserError, FileNotFoundError):
    """A path the user gave does not exist (or lacks the file lsdc looks for in it)."""


# OSErrors that come from the user's machine, not from a bug: a full or read-only disk, a path they gave that is
# missing or of the wrong kind, no permission. The CLI reports them in one line naming the path.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE})


def is_user_error(e: BaseException) -> bool:
    """Whether an exception is the user's to fix (one line) rather than a bug (traceback)."""
    if isinstance(e, UserError):
        return True
    return isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def one_line(e: BaseException) -> str:
    """The exception as one line: its message, or for a bare OSError the OS's words and the path."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__
