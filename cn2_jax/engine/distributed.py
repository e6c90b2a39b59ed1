"""Several processes, one job: joining JAX's distributed runtime, work done once per job, and a
clean stop when a process of the job dies (README "Several processes / hosts").

A job is N copies of `python main.py ...`, one per process (typically one per host or per GPU),
told apart by the environment: `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, Slurm's / Open MPI's own variables, or on a Cloud TPU
slice `JAX_NUM_PROCESSES` alone (`launch()`).

* `initialize()`: `jax.distributed.initialize` with this module's timeouts, cross-process CPU
  collectives through gloo, and the backend started at once (its topology exchange has a 2-minute
  limit: started later, a process busy elsewhere, e.g. preparing a dataset, makes the others fail).
* `main_process_first(name, fn)`: work written once per job (dataset preparation): process 0
  runs it while the others wait on the runtime's key-value store, then they read what it wrote;
  its error, if any, stops every process with the same message.
* `supervise()`: in a multi-process launch `main.py` runs the job in a child process and watches
  it. JAX's runtime ends a process whose peer died (or whose coordinator vanished) from a C++
  thread (`LOG(FATAL)`: abort and a stack dump) that Python cannot intercept (jaxlib 0.10's client
  option `missed_heartbeat_callback` cannot call a Python function: std::bad_cast); the parent
  turns that into one `error:` line. Python-visible failures (a collective whose peer is gone raises within a
  second) are reported by the child itself (`exit_after_error`), which then leaves at once:
  jax's exit handler would wait `SHUTDOWN_TIMEOUT_S` for the dead peer.

How long a survivor takes to stop: a collective (every training / evaluation step) fails as soon
as the peer's connection closes; the death of process 0 (the coordinator) is seen by the others at
once; otherwise the coordinator notices missing heartbeats after `HEARTBEAT_TIMEOUT_S` and stops
the job.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, Mapping, Optional

from cn2_jax import errors

log = logging.getLogger(__name__)

# jax.distributed.initialize's limits. Processes may start minutes apart on a cluster; a host that
# stopped sending heartbeats for a minute is dead; at a normal exit every process waits for the
# others at most this long (they end together: the last step and the evaluation are collective).
INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 120
# What the others wait for process 0's once-per-job work (preparing COCO takes a while).
ONCE_TIMEOUT_S = 24 * 3600

WORKER_ENV = "CN2_JAX_WORKER"  # set by `supervise` in the child that runs the job

_counter = itertools.count()  # every process makes the same calls in the same order


class DistributedError(errors.UserError, RuntimeError):
  """The job cannot go on: a process could not join it, or another process failed or died."""


# ------------------------------------------------------------------------------------- launch
def launch(env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """`{'process_id', 'num_processes', 'coordinator'}` of a multi-process launch (None values: JAX
  detects them from the cluster: Slurm, Open MPI, a Cloud TPU slice's metadata), or None when
  this is a single-process run. `JAX_NUM_PROCESSES` > 1 alone asks JAX to find the rest."""
  env = os.environ if env is None else env
  num, pid = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
  if env.get("JAX_COORDINATOR_ADDRESS") or int(num or "1") > 1:
    return dict(
        process_id=int(pid) if pid else None,
        num_processes=int(num) if num else None,
        coordinator=env.get("JAX_COORDINATOR_ADDRESS") or None,
    )
  for count, rank in (
      ("SLURM_NTASKS", "SLURM_PROCID"),
      ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
  ):
    if int(env.get(count, "1")) > 1:
      return dict(
          process_id=int(env.get(rank, "0")), num_processes=int(env[count]), coordinator=None
      )
  return None


def _who(info: Optional[dict]) -> str:
  if not info or info.get("process_id") is None:
    return "this process"
  return f"process {info['process_id']} of {info['num_processes']}"


def initialize(*, quiet_others: bool = True) -> bool:
  """Joins the job when `launch()` finds one (must run before any other JAX call); False (nothing
  done) for a single-process run. `quiet_others`: processes other than 0 log warnings only (every
  process runs the same steps; process 0's INFO lines describe them)."""
  import jax  # noqa: PLC0415  (main.py imports this module before it may touch JAX)

  if jax.distributed.is_initialized():
    return True
  info = launch()
  if info is None:
    return False
  # Cross-process collectives on CPU devices: gloo (the default from jax 0.5 on, unset before).
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(
      coordinator_address=info["coordinator"],
      num_processes=info["num_processes"],
      process_id=info["process_id"],
      initialization_timeout=INITIALIZATION_TIMEOUT_S,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
  )
  accepted = inspect.signature(jax.distributed.initialize).parameters
  try:
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})
    devices = jax.devices()  # the backend now, while every process is at this point
  except Exception as e:  # noqa: BLE001 - the runtime's errors, as one line naming the job
    where = info["coordinator"] or "the address Slurm / MPI gives"
    raise DistributedError(
        f"{_who(info)} could not join the job (coordinator {where}): {_first_line(e)}; start "
        f"every process (JAX_PROCESS_ID 0 .. JAX_NUM_PROCESSES-1) with the same "
        f"JAX_COORDINATOR_ADDRESS within {INITIALIZATION_TIMEOUT_S} s"
    ) from e
  if quiet_others and jax.process_index() != 0:
    logging.getLogger("cn2_jax").setLevel(logging.WARNING)
  log.info(
      "process %d of %d: %d local device(s) of %d (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      len(devices),
      devices[0].platform,
  )
  return True


def _client():
  """JAX's distributed runtime client (None without `jax.distributed.initialize`, e.g. a TPU pod
  slice that did not call it)."""
  from jax._src import distributed as jax_distributed  # noqa: PLC0415  jax after main.py's setup

  return jax_distributed.global_state.client


def _process() -> tuple:
  import jax  # noqa: PLC0415  main.py imports this module before it may touch JAX

  return jax.process_index(), jax.process_count()


def _first_line(e: BaseException) -> str:
  text = errors.one_line(e).split(" | ")[0]
  return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------- once per job
def _once(name: str, fn: Callable[[], Any], describe: Callable[[Any], str]):
  """`(fn() on process 0 / None, describe(that result))` on every process: process 0 runs `fn`
  while the others wait on the runtime's key-value store; then every process passes a barrier."""
  pid = _process()[0]
  key = f"cn2_jax/{next(_counter)}/{name}"
  client = _client()
  if client is None:  # no key-value store (e.g. a TPU slice without jax.distributed): a device
    from jax.experimental import multihost_utils  # noqa: PLC0415  barrier, no error propagation

    result = fn() if pid == 0 else None
    multihost_utils.sync_global_devices(key)
    return result, describe(result) if pid == 0 else ""
  result, text = None, ""
  if pid == 0:
    try:
      result = fn()
      text = describe(result)
    except BaseException as e:
      client.key_value_set(key, f"error {type(e).__name__}: {errors.one_line(e)}")
      raise
    client.key_value_set(key, f"ok {text}")
  else:
    outcome = client.blocking_key_value_get(key, ONCE_TIMEOUT_S * 1000)
    if not outcome.startswith("ok "):
      raise DistributedError(f"process 0 failed while doing '{name}': {outcome[len('error '):]}")
    text = outcome[len("ok ") :]
  client.wait_at_barrier(key + "/done", ONCE_TIMEOUT_S * 1000)
  return result, text


def main_process_first(
    name: str, fn: Callable[[], Any], *, written: Optional[Callable[[Any], str]] = None
) -> Any:
  """`fn()` on process 0 first while the others wait (then every process passes a barrier: none
  runs ahead and sees a half-written state), then on the others, which find what it wrote (e.g. a
  prepared dataset) and only read it; returns `fn()` on every process. An error of `fn` on process
  0 is raised there and, as a `DistributedError` naming it, on the others. Every process must make
  the same calls in the same order (`name`: for the messages and the runtime's logs).
  `written(result) -> path`: what process 0's call wrote; a process that does not see it (a folder
  not on a filesystem every process shares) stops with a `DataError` instead of writing its own
  copy beside other processes of its host."""
  pid, count = _process()
  if count == 1:
    return fn()
  result, path = _once(name, fn, lambda r: "" if written is None else str(written(r)))
  if pid == 0:
    return result
  if path and not os.path.exists(path):
    raise errors.DataError(
        f"process {pid} does not see {path}, which process 0 wrote ('{name}'): the workdir and "
        f"data.data_dir must be on a filesystem shared by every process (README 'Several "
        f"processes / hosts')"
    )
  return fn()


# ------------------------------------------------------------------------------------- errors
# What a runtime error says when another process is gone: a collective lost its peer, or a call
# to the coordination service failed (JAX's own error type; Orbax re-raises some as ValueError).
_PEER_GONE = re.compile(
    r"gloo|connection (closed|reset) by peer|coordination service|heartbeat|barrier timed out|"
    r"task is set to error|socket closed",
    re.IGNORECASE,
)
_RUNTIME_STATUS = re.compile(r"^(UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|INTERNAL):")


def peer_failure(e: BaseException) -> Optional[BaseException]:
  """The exception in `e`'s chain (itself, its causes) saying that another process of the job is
  gone or cannot be reached, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    runtime = type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
    if _PEER_GONE.search(text) or (runtime and _RUNTIME_STATUS.match(text)):
      return e
    e = e.__cause__ or e.__context__
  return None


def exit_after_error(e: BaseException, *, verbose: bool = False) -> None:
  """Reports `e` as one `error:` line (a user error, or a failure caused by another process's
  death, which the line says) or with its traceback (a bug, or `verbose`), then ends this process
  of a multi-process job at once: jax's exit handler would wait for the other processes, and the
  sooner this one is gone, the sooner they notice (their collectives fail)."""
  peer = peer_failure(e)
  msg = None
  if errors.is_user_error(e):
    msg = errors.one_line(e)
  elif peer is not None:
    pid, count = _process()
    msg = f"process {pid} of {count}: {_first_line(peer)}"
  if msg is not None and peer is not None:
    msg += (
        " -- another process of the job stopped or cannot be reached (see its output); "
        "restarting every process resumes from the newest checkpoint"
    )
  if verbose or msg is None:
    traceback.print_exception(e)
  if msg is not None:
    print(f"error: {msg}", file=sys.stderr)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 - a closed pipe: nothing left to tell
      pass
  os._exit(1)


# ------------------------------------------------------------------------------------- supervisor
def should_supervise() -> bool:
  """In a multi-process launch, the command-line process supervises a child that runs the job."""
  return launch() is not None and not os.environ.get(WORKER_ENV)


# The first line of a C++ fatal log record (glog / absl: "F1207 11:05:09.468394   29957 file:80] ").
_FATAL_RECORD = re.compile(rb"F\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_FATAL_PREFIX_LEN = 64  # a line start this long decides whether it is a fatal record
_STATUS = re.compile(rb"absl::Status: (.*)", re.DOTALL)


class _StderrFilter:
  """Passes the child's stderr on to `sink` as it comes (progress-bar updates included), except a
  C++ fatal log record and everything after it (the runtime's stack dump when it ends the
  process), and whatever follows the child's own `error:` line (the runtime's log records while
  the process shuts down: its one-line error stays the last line); notes whether the child
  printed an `error:` line. `keep_all` passes the held-back bytes on at `close`. `feed` takes the
  bytes in pieces of any size, `close` ends the stream."""

  def __init__(self, sink, *, keep_all: bool = False):
    self.sink, self.keep_all = sink, keep_all
    self.fatal: Optional[bytes] = None  # the fatal record and what followed it
    self.reported = False  # the child printed its own `error:` line
    self.after_error = b""  # what the child printed after its `error:` line
    self._held = b""  # the start of a line that may still turn out to be a fatal record
    self._head = b""  # the first bytes of the current line passed on so far

  def feed(self, data: bytes) -> None:
    if self.fatal is not None:
      self.fatal += data
      return
    if self.reported:
      self.after_error += data
      return
    data, self._held = self._held + data, b""
    while data:
      ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
      cut = min(ends) + 1 if ends else len(data)
      piece, data = data[:cut], data[cut:]
      if not self._head:  # at the start of a line
        if not ends and piece[:1] == b"F" and len(piece) < _FATAL_PREFIX_LEN:
          self._held = piece  # undecided until more of the line comes
          return
        if _FATAL_RECORD.match(piece):
          self.fatal = piece + data
          return
      self._write(piece)
      self._head = (self._head + piece)[:_FATAL_PREFIX_LEN]
      if ends:
        self.reported |= self._head.startswith(b"error: ")
        self._head = b""
        if self.reported:
          self.after_error += data
          return

  def close(self) -> None:
    if self._held:
      self._write(self._held)
    if self.keep_all:
      self._write(self.after_error + (self.fatal or b""))

  def _write(self, data: bytes) -> None:
    try:
      self.sink.write(data)
      self.sink.flush()
    except OSError:
      pass

  def status(self) -> str:
    """The runtime's reason from the fatal record: its `absl::Status: ...` text on one line."""
    if not self.fatal:
      return ""
    m = _STATUS.search(self.fatal)
    text = m.group(1) if m else self.fatal.split(b"] ", 1)[-1]
    text = re.split(rb"\[type\.googleapis|\nRPC:|\n\*\*\*", text)[0]  # payloads, stack dump
    text = b" ".join(text.split()).decode(errors="replace")
    return text if len(text) <= 300 else text[:297] + "..."


def _child_setup():  # pragma: no cover - runs in the child between fork and exec
  os.setpgrp()  # a terminal's Ctrl-C reaches the parent only, which passes it on once
  try:  # Linux: the child dies with its parent (a SIGKILL of the parent stops the child too)
    import ctypes  # noqa: PLC0415  Linux only: prctl(PR_SET_PDEATHSIG)

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def supervise(*, verbose: bool = False) -> int:
  """Runs this command again as a child (`WORKER_ENV` set) that does the work, passing signals on;
  returns the exit status for this process. When JAX's runtime ends the child (fatal log record)
  or a signal kills it, prints one `error:` line instead of the runtime's dump."""
  info = launch()
  env = dict(os.environ, **{WORKER_ENV: "1"})
  child = subprocess.Popen(
      [sys.executable, *sys.orig_argv[1:]], env=env, stderr=subprocess.PIPE,
      preexec_fn=_child_setup,
  )  # fmt: skip
  forwarded = []

  def forward(signum, _frame):
    forwarded.append(signum)
    try:
      child.send_signal(signum)
    except ProcessLookupError:
      pass

  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, forward)
  pump = _StderrFilter(sys.stderr.buffer, keep_all=verbose)

  def copy():
    while chunk := os.read(child.stderr.fileno(), 65536):
      pump.feed(chunk)
    pump.close()

  copier = threading.Thread(target=copy, daemon=True)
  copier.start()
  rc = child.wait()
  copier.join(timeout=10)  # a grain worker left behind may hold the pipe open
  if rc == 0 or pump.reported:
    return rc if rc >= 0 else 1
  if pump.fatal is not None:
    where = (info or {}).get("coordinator") or "its coordinator"
    msg = (
        f"{_who(info)} was stopped by JAX's distributed runtime ({pump.status()}): another "
        f"process of the job died or {where} cannot be reached; see the other processes' "
        f"output; restarting every process resumes from the newest checkpoint"
    )
  elif rc < 0 and -rc in forwarded:
    return 128 - rc  # stopped as asked (Ctrl-C, scancel): no error of ours
  elif rc < 0:
    msg = f"{_who(info)} was killed by signal {signal.Signals(-rc).name}"
  else:
    return rc  # the child's own traceback (a bug) is above
  print(f"error: {msg}", file=sys.stderr, flush=True)
  return 1
