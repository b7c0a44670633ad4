"""One exception hierarchy for the whole library.

Everything the library raises on purpose derives from `FmoError`, so a caller can catch
the library's refusals without catching unrelated bugs. Input errors are also
`ValueError`/`TypeError` so code written against PyTorch's conventions keeps working.
"""


class FmoError(Exception):
    """Base class of every error fastmoe-ops raises deliberately."""


class InputError(FmoError, ValueError):
    """Bad input refused before any kernel runs (shape, dtype, device, layout, range)."""


class UnsupportedError(FmoError, NotImplementedError):
    """A combination the library does not implement (refused by a spec's own check)."""


class BackendError(FmoError, RuntimeError):
    """The requested engine cannot run here (no GPU, no CuPy, simulator not built)."""


class CompileError(FmoError, RuntimeError):
    """A kernel failed to compile; the message carries the entry point and the log."""


class LaunchError(FmoError, RuntimeError):
    """A kernel launch or execution failed; the message names the kernel."""


class SimError(LaunchError):
    """The SIMT simulator stopped a kernel: race, out-of-bounds access, divergent barrier,
    assertion, deadlock or time-out. The message names the kernel, the block and thread."""


class CommError(FmoError, RuntimeError):
    """A collective or peer-to-peer exchange failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A peer never arrived within FMO_COMM_TIMEOUT seconds; names the missing ranks."""


def expect(cond: bool, arg: str, expected: str, got) -> None:
    """Raise InputError naming the argument, the expectation and what came.

    `got` may be a zero-argument callable, called only on failure, so a check on the hot
    path formats nothing when it passes."""
    if not cond:
        raise InputError(f"{arg}: expected {expected}, got {got() if callable(got) else got}")
