"""Shared pytest fixtures."""

import fcntl

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compile():
  """XLA compile time dominates tests of tiny models (flax's imagenet train_test does the same):
  turn most XLA optimisations off for the module, restore afterwards."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


# ---------------------------------------------------------------------------------------------
# Peak resident memory: each process's peak, and the tests that raised it (scripts/test.sh
# prints them at the end; a module above ~6 GB is marked large_memory).
# ---------------------------------------------------------------------------------------------
def _peak_mib() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


_RAISED = []  # (test id, this process's peak after it) for each test that raised the peak
_WORKERS = {}  # xdist controller: worker id -> (peak MiB, raised)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  before = _peak_mib()
  yield
  after = _peak_mib()
  if after > before + 64:
    _RAISED.append((item.nodeid, after))


def pytest_sessionfinish(session):
  output = getattr(session.config, "workeroutput", None)
  if output is not None:  # an xdist worker: hand the figures to the controller
    output["peak_mib"] = _peak_mib()
    output["raised"] = _RAISED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  output = getattr(node, "workeroutput", None) or {}
  if "peak_mib" in output:
    name = getattr(getattr(node, "gateway", None), "id", str(len(_WORKERS)))
    _WORKERS[name] = (output["peak_mib"], output["raised"])


def pytest_terminal_summary(terminalreporter):
  if getattr(terminalreporter.config, "workeroutput", None) is not None:
    return
  processes = dict(_WORKERS) or {"main": (_peak_mib(), _RAISED)}
  raised = sorted((peak, test) for _, r in processes.values() for test, peak in r)[::-1][:8]
  terminalreporter.section("peak resident memory")
  for name, (peak, _) in sorted(processes.items()):
    terminalreporter.write_line(f"{name}: {peak / 1024:.1f} GiB")
  for peak, test in raised:
    terminalreporter.write_line(f"  {peak / 1024:5.1f} GiB after {test}")


@pytest.fixture(scope="module", autouse=True)
def _large_memory_modules_one_at_a_time(request, tmp_path_factory):
  """A module marked `large_memory` holds a lock file shared by the xdist workers (their base
  temp folders share a parent) from its first module fixture to its teardown, so two such modules
  never run at once on a 24 GB machine; scripts/test.sh distributes whole files (--dist loadfile),
  so a module's expensive fixtures are built on one worker only. (pytest-xdist's xdist_group does
  not group under pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)"""
  if request.node.get_closest_marker("large_memory") is None:
    yield
    return
  with open(tmp_path_factory.getbasetemp().parent / "cn2_jax_large_memory.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    yield
