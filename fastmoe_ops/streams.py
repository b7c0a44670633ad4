"""Streams: ordered queues of work that run concurrently with each other, on both engines.

    s = Stream(device, role="comm")   # role: "comm" | "compute" (labels the kernel trace)
    p = s.submit(fn, *args, **kwargs) # returns at once with a Pending
    s.wait(p)                         # later work on s starts only after p completed
    p.result()                        # fn's return value (re-raises fn's exception)

On CUDA a Stream wraps a `torch.cuda.Stream`: `submit` runs `fn` on the host right away
with that stream current (its kernels are queued there) and records an event; nothing
synchronises the host. On the CPU a Stream owns one worker thread that runs the submitted
functions in order; the simulator's launches and torch's CPU ops release the GIL, so two
Streams really run at the same time (which the overlap schedule of a MoE layer needs).

In both, `fn` sees the submitter's context: contextvars (`fmo.use_backend`), grad mode and
autocast state, and `current_role()` returns the stream's role while it runs.

Failures: `result()` re-raises fn's exception. A `wait(p)` on a Pending that failed makes
the work submitted to the waiting stream after it fail too (its `result()` raises
`StreamError` chained to the original) until the next `synchronize()` of that stream:
work ordered after a failed producer would otherwise read buffers nobody wrote.

CUDA memory: a tensor allocated while one stream is current and used on another must be
`record_stream`-ed to the user (torch's caching allocator rule), or kept alive until then.
"""
from __future__ import annotations

import atexit
import contextvars
import queue
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

from .errors import BackendError, FmoError, InputError

ROLES = ("comm", "compute")

_tls = threading.local()


class StreamError(FmoError, RuntimeError):
    """Work on a stream could not run: a producer it waited on failed, or the stream is closed."""


def current_role() -> str | None:
    """Role of the stream whose submitted function is running in this thread, else None."""
    return getattr(_tls, "role", None)


@dataclass(frozen=True)
class _HostState:
    """What a submitted function inherits from its submitter (thread-local in torch)."""

    context: contextvars.Context
    grad: bool
    autocast: tuple  # ((device_type, enabled, dtype), ...)

    @staticmethod
    def capture() -> "_HostState":
        autocast = tuple(
            (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in _AUTOCAST_DEVICES)
        return _HostState(contextvars.copy_context(), torch.is_grad_enabled(), autocast)

    def run(self, role: str, fn, args, kwargs):
        def call():
            previous = getattr(_tls, "role", None)
            _tls.role = role
            try:
                with torch.set_grad_enabled(self.grad):
                    return _with_autocast(self.autocast, fn, args, kwargs)
            finally:
                _tls.role = previous

        return self.context.run(call)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _with_autocast(states, fn, args, kwargs):
    if not states:
        return fn(*args, **kwargs)
    (dev, enabled, dtype), rest = states[0], states[1:]
    if dev == "cuda" and not enabled and not torch.cuda.is_available():
        return _with_autocast(rest, fn, args, kwargs)  # nothing to set (and no warning)
    with torch.autocast(dev, dtype=dtype, enabled=enabled):
        return _with_autocast(rest, fn, args, kwargs)


class Pending:
    """The outcome of one `Stream.submit`: `done()`, `result()`."""

    __slots__ = ("stream_name", "device", "event", "_done", "_value", "_error", "_retrieved", "__weakref__")

    def __init__(self, stream_name: str, device: torch.device):
        self.stream_name = stream_name
        self.device = device
        self.event = None  # torch.cuda.Event on CUDA
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._retrieved = False

    def _finish(self, value=None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def failed(self) -> BaseException | None:
        """fn's exception once done (None on success or while running); does not wait."""
        return self._error if self._done.is_set() else None

    def done(self) -> bool:
        if not self._done.is_set():
            return False
        return self.event is None or self.event.query()

    def result(self):
        """fn's return value. CUDA: the caller's current stream waits for the work (no host
        synchronisation); CPU: blocks until it ran. Re-raises fn's exception."""
        self._done.wait()
        self._retrieved = True
        if self._error is not None:
            raise self._error
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        return self._value

    def __del__(self):
        if self._error is not None and not self._retrieved:
            warnings.warn(f"fastmoe_ops.streams: work on stream {self.stream_name} failed and its result() was "
                          f"never called: {self._error!r}", RuntimeWarning, stacklevel=1)


_STOP = object()
_live_streams: "weakref.WeakSet[Stream]" = weakref.WeakSet()


def _check_mpi_threads() -> None:
    """A CPU stream calls into MPI from its worker thread when fn exchanges data; MPI allows
    that only at MPI_THREAD_MULTIPLE (mpi4py's default request)."""
    mpi_mod = sys.modules.get("mpi4py.MPI")
    if mpi_mod is None:
        return
    if not mpi_mod.Is_initialized() or mpi_mod.Is_finalized():
        return
    level = mpi_mod.Query_thread()
    if level < mpi_mod.THREAD_MULTIPLE:
        names = {mpi_mod.THREAD_SINGLE: "THREAD_SINGLE", mpi_mod.THREAD_FUNNELED: "THREAD_FUNNELED",
                 mpi_mod.THREAD_SERIALIZED: "THREAD_SERIALIZED"}
        raise StreamError(f"Stream on the CPU: MPI was initialised at {names.get(level, level)}, but stream worker "
                          f"threads may call MPI concurrently, which needs MPI_THREAD_MULTIPLE "
                          f"(mpi4py.rc.thread_level = 'multiple', the default, before importing mpi4py.MPI)")


def _not_run(name: str, failed: BaseException) -> StreamError:
    """The error of work skipped because a producer its stream waited on failed."""
    err = StreamError(f"stream {name}: not run, because work it waited on failed: {failed!r}")
    err.__cause__ = failed
    return err


def _worker(name: str, items: queue.SimpleQueue) -> None:
    """Run items in order until _STOP. Holds no reference to the Stream (so it can be
    collected) and never dies on a failing item: the failure goes to its Pending."""
    failed: BaseException | None = None  # sticky failure of a waited-on producer
    while True:
        item = items.get()
        if item is _STOP:
            return
        kind, payload = item
        if kind == "call":
            pending, state, role, fn, args, kwargs = payload
            if failed is not None:
                pending._finish(error=_not_run(name, failed))
                continue
            try:
                value = state.run(role, fn, args, kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to result()
                pending._finish(error=e)
            else:
                pending._finish(value)
        elif kind == "wait":
            payload._done.wait()
            if payload._error is not None and failed is None:
                failed = payload._error
        elif kind == "sync":
            failed = None
            payload.set()


class Stream:
    """An ordered queue of work on `device` ("cpu", "cuda", "cuda:1" or a torch.device)."""

    def __init__(self, device, role: str = "compute"):
        if role not in ROLES:
            raise InputError(f"Stream(role): expected one of {ROLES}, got {role!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"Stream(device): expected 'cpu', 'cuda[:i]' or a torch.device, got {device!r}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise InputError(f"Stream(device): expected a CPU or CUDA device, got {self.device}")
        self.role = role
        self.name = f"{role}@{self.device}#{id(self):x}"
        self._closed = False
        self._failed: BaseException | None = None  # CUDA: sticky failure of a waited-on producer
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"Stream({str(self.device)!r}): CUDA is not available here")
            self.torch_stream = torch.cuda.Stream(self.device)
            self._items = None
            self._thread = None
        else:
            _check_mpi_threads()
            self.torch_stream = None
            self._items: queue.SimpleQueue = queue.SimpleQueue()
            # daemon: a stream never keeps the process alive; the atexit hook drains it first.
            self._thread = threading.Thread(target=_worker, args=(self.name, self._items),
                                            name=f"fmo-stream-{self.name}", daemon=True)
            self._thread.start()
        _live_streams.add(self)

    def __repr__(self) -> str:
        return f"Stream({str(self.device)!r}, role={self.role!r})"

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StreamError(f"{self!r}.{what}: the stream is closed")

    def submit(self, fn, *args, **kwargs) -> Pending:
        """Queue fn(*args, **kwargs) on this stream; returns at once."""
        self._check_open("submit")
        if not callable(fn):
            raise InputError(f"Stream.submit(fn): expected a callable, got {type(fn).__name__}")
        pending = Pending(self.name, self.device)
        if self._thread is not None:
            self._items.put(("call", (pending, _HostState.capture(), self.role, fn, args, kwargs)))
            return pending
        # CUDA: run now on this thread with our stream current, so fn's kernels queue on it.
        if self._failed is not None:
            pending._finish(error=_not_run(self.name, self._failed))
            return pending
        previous = getattr(_tls, "role", None)
        _tls.role = self.role
        try:
            with torch.cuda.stream(self.torch_stream):
                value = fn(*args, **kwargs)
                event = torch.cuda.Event()
                event.record(self.torch_stream)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            pending._finish(error=e)
            return pending
        finally:
            _tls.role = previous
        pending.event = event
        pending._finish(value)
        return pending

    def wait(self, pending: Pending) -> None:
        """Work submitted to this stream from now on starts only after `pending` completed."""
        self._check_open("wait")
        if not isinstance(pending, Pending):
            raise InputError(f"Stream.wait(pending): expected a Pending from Stream.submit, got {type(pending).__name__}")
        if self._thread is not None:
            self._items.put(("wait", pending))
            return
        if pending._error is not None:
            self._failed = self._failed or pending._error
        elif pending.event is not None:
            self.torch_stream.wait_event(pending.event)

    def synchronize(self) -> None:
        """The host waits for everything submitted so far; clears a waited-on failure."""
        self._check_open("synchronize")
        if self._thread is not None:
            done = threading.Event()
            self._items.put(("sync", done))
            while not done.wait(timeout=1.0):
                if not self._thread.is_alive():  # cannot happen short of interpreter teardown
                    raise StreamError(f"{self!r}: worker thread is gone")
        else:
            self.torch_stream.synchronize()
            self._failed = None

    def close(self) -> None:
        """Finish the submitted work and stop the worker (CPU). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._items.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def __del__(self):
        # The worker holds no reference to the stream: stop it when the stream is collected.
        if getattr(self, "_thread", None) is not None and not self._closed:
            self._closed = True
            self._items.put(_STOP)


@atexit.register
def _drain_at_exit() -> None:
    # Daemon workers would be frozen mid-kernel at interpreter teardown; let them finish.
    for s in list(_live_streams):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
