"""The exceptions prerestore raises. All derive from PrerestoreError; each says what is wrong in
words a user can act on (which process, which file, which kernel object)."""
import errno as _errno
import os


class PrerestoreError(Exception):
    """Base of every error prerestore raises on purpose."""


class KernelCallError(PrerestoreError, OSError):
    """A system call failed; carries errno, the call's name and the pid it concerned."""

    def __init__(self, err: int, call: str, pid: int | None = None, detail: str = ""):
        self.call, self.pid, self.detail = call, pid, detail
        where = f" on pid {pid}" if pid is not None else ""
        text = f"{call}{where} failed: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        OSError.__init__(self, err, text + (f" [{detail}]" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.errno, self.call, self.pid, self.detail))

    def __str__(self):
        return self.strerror


class ProcessGone(KernelCallError):
    """The process exited (or was never there) while we worked on it."""


class NoSuchProcess(ProcessGone):
    """The pid given to prerestore names no process."""

    def __str__(self):
        return f"no process with pid {self.pid}" + (f" {self.detail}" if self.detail else "")


class UnsupportedState(PrerestoreError):
    """The process holds kernel state this version cannot checkpoint (named in the message)."""


class ImageError(PrerestoreError):
    """An image is missing, corrupt, truncated, of another version or out of sequence."""


class PidTaken(PrerestoreError):
    """The pid the restored process must have is in use on this host."""


class RestoreError(PrerestoreError):
    """Restoring failed; the husks were killed and the source (if still there) left resumable."""


class ProtocolError(PrerestoreError):
    """A peer or control socket sent something we did not expect, or did not authenticate."""


class TooLarge(PrerestoreError):
    """A peer wants to stage more than this host allows it (serve --max-stage-bytes)."""
