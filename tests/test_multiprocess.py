"""Several processes, one job (README "Several processes / hosts", cn2_jax/engine/distributed.py):
`python main.py` started as 2 processes with 1 CPU device each (JAX's distributed runtime on
localhost, gloo collectives) against 1 process with 2 CPU devices, on the demo at toy size:

* train.batch_size is per process: 2 processes x 1 image is the training of 1 process x 2 images
  (every step's losses, the parameters after 5 steps, the whole TrainState equal to 1e-6);
* the dataset is prepared once (process 0) while the other waits; the 2-process checkpoint
  restores in one process; the evaluation gathers every image once: detections and metrics equal;
* killing one process stops the other with one `error:` line in bounded time, and a restart of
  both resumes from the newest checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 6 processes started: ~2.5 min on 2 idle cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/demo.py at toy size: 8 images of 96 px, short side 64, 5 steps (LR drop at 4).
TINY = [
    "--config=configs/demo.py",
    "--config.model.fpn_channels=32",
    "--config.model.centernet.num_convs=1",
    "--config.model.roi_heads.fc_dim=32",
    "--config.model.roi_heads.batch_size_per_image=32",
    "--config.model.centernet.pre_nms_topk_train=64",
    "--config.model.centernet.post_nms_topk_train=32",
    "--config.model.centernet.pre_nms_topk_test=64",
    "--config.model.centernet.post_nms_topk_test=32",
    "--config.model.roi_heads.detections_per_image=10",
    "--config.data.synthetic_num_train=8",
    "--config.data.synthetic_num_val=4",
    "--config.data.synthetic_image_size=96",
    "--config.data.min_size_train=(64,)",
    "--config.data.max_size_train=96",
    "--config.data.min_size_test=64",
    "--config.data.max_size_test=96",
    "--config.data.pad_hw_train=(96,96)",
    "--config.data.pad_hw_test=(96,96)",
    "--config.data.num_workers=0",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.progress_bar=False",
    "--config.optim.warmup_iters=2",
    "--config.optim.steps=(4,)",
]
STEPS = 5
LOSS_TERMS = ("total_loss", "loss_centernet_agn_pos", "loss_centernet_loc", "loss_cls_stage0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_", "CN2_JAX_"))
  }
  env.update(
      JAX_PLATFORMS="cpu",
      JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # compile time dominates at this size
      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _start(workdir: str, args, *, processes: int, devices: int, tag: str):
  """`python main.py` as `processes` processes (coordinator on a free localhost port) with
  `devices` CPU devices each; their stderr goes to `<workdir>.<tag>.<i>.err`."""
  port, procs = _free_port(), []
  for i in range(processes):
    env = _env(devices)
    if processes > 1:
      env.update(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES=str(processes),
          JAX_PROCESS_ID=str(i),
      )
    err = open(f"{workdir}.{tag}.{i}.err", "w")
    procs.append(
        subprocess.Popen(
            [sys.executable, "main.py", *TINY, f"--workdir={workdir}", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    )
    err.close()
  return procs


def _finish(procs, workdir: str, tag: str, timeout: float = 900):
  for i, p in enumerate(procs):
    rc = p.wait(timeout=timeout)
    assert rc == 0, _stderr(workdir, tag, i)[-4000:]


def _stderr(workdir: str, tag: str, i: int) -> str:
  with open(f"{workdir}.{tag}.{i}.err") as f:
    return f.read()


def _scalars(workdir: str) -> dict:
  from tests.test_engine import _read_scalars

  files = [os.path.join(workdir, f) for f in os.listdir(workdir) if "tfevents" in f]
  return {(tag, step): v for f in files for tag, step, v in _read_scalars(f)}


def _train_state(workdir: str, step: int) -> dict:
  """The whole TrainState checkpoint of `step`, as numpy, read in this (1-device) process."""
  import jax
  import orbax.checkpoint as ocp

  from cn2_jax.weights.loading import checkpoint_metadata_tree

  path = os.path.join(workdir, "checkpoints", str(step), "default")
  meta = checkpoint_metadata_tree(path, path)
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _leaves(tree) -> dict:
  import jax

  return {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """JAX's persistent compilation cache of this module's runs: the killed run and its restart
  run the 2-process training program compiled once (max_iter is not part of it)."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
  """Both runs side by side (3 processes on 2 cores): 1 process x 2 devices x batch 2, and 2
  processes x 1 device x batch 1 (each preparing its own copy of the generated dataset)."""
  root = tmp_path_factory.mktemp("multiprocess")
  one, two = str(root / "one"), str(root / "two")
  t0 = time.perf_counter()
  common = [f"--config.optim.max_iter={STEPS}", f"--config.compilation_cache_dir={cache}"]
  a = _start(one, common + ["--config.train.batch_size=2", "--config.train.eval_batch_size=2"],
             processes=1, devices=2, tag="train")  # fmt: skip
  b = _start(two, common + ["--config.train.batch_size=1", "--config.train.eval_batch_size=1"],
             processes=2, devices=1, tag="train")  # fmt: skip
  _finish(a, one, "train")
  _finish(b, two, "train")
  print(f"1-process and 2-process runs: {time.perf_counter() - t0:.0f} s")
  return one, two


def test_every_step_and_the_parameters_match_one_process(runs):
  one, two = runs
  s1, s2 = _scalars(one), _scalars(two)
  for step in range(1, STEPS + 1):
    for term in LOSS_TERMS:
      a, b = s1[(f"train/{term}", step)], s2[(f"train/{term}", step)]
      assert b == pytest.approx(a, rel=1e-6, abs=1e-6), (step, term, a, b)
  assert s2[("train/lr", STEPS)] == pytest.approx(s1[("train/lr", STEPS)])  # global batch 2
  # the whole TrainState after 5 steps (params, optimizer state, step, rng), read in 1 process
  t1, t2 = _leaves(_train_state(one, STEPS)), _leaves(_train_state(two, STEPS))
  assert sorted(t1) == sorted(t2) and any("params" in k for k in t1)
  for k in t1:
    np.testing.assert_allclose(t2[k], t1[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["4", "5"]


def test_two_process_checkpoint_restores_in_one_process(runs):
  """The eval-mode restore (cn2_jax.weights.loading) of the 2-process run's checkpoint, here."""
  import jax

  from cn2_jax.config import config_from_json
  from cn2_jax.weights.loading import restore_model_variables

  one, two = runs
  cfg = config_from_json(os.path.join(two, "config.json"))
  assert cfg.train.batch_size == 1  # per process
  restored = _leaves(restore_model_variables(cfg, two))
  expected = _leaves(_train_state(one, STEPS)["params"])
  assert len(restored) == len(expected) > 0
  for (k, v), w in zip(sorted(restored.items()), [expected[k] for k in sorted(expected)]):
    np.testing.assert_allclose(v, w, rtol=1e-6, atol=1e-6, err_msg=k)
  assert jax.process_count() == 1


def test_evaluation_gathers_every_image_once(runs):
  one, two = runs
  with open(os.path.join(one, "eval", "metrics.json")) as f:
    m1 = json.load(f)
  with open(os.path.join(two, "eval", "metrics.json")) as f:
    m2 = json.load(f)
  assert m2["num_images"] == m1["num_images"] == 4
  assert m2 == pytest.approx(m1, abs=1e-9)
  with open(os.path.join(one, "eval", "coco_results.json")) as f:
    r1 = json.load(f)
  with open(os.path.join(two, "eval", "coco_results.json")) as f:
    r2 = json.load(f)
  assert len(r2) == len(r1) > 0
  key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
  for a, b in zip(sorted(r1, key=key), sorted(r2, key=key)):
    assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
    assert b["score"] == pytest.approx(a["score"], abs=1e-6)
    assert b["bbox"] == pytest.approx(a["bbox"], abs=1e-3)
  # once per job: process 0 prepared the dataset, wrote the run files and the events
  assert "preparing dataset" in _stderr(two, "train", 0)
  prepared = os.path.join(two, "tfds", "coco_json", "synthetic_shapes")
  assert os.listdir(prepared) == ["1.0.0"]  # no second copy, no unfinished 'incomplete.*' one
  assert len([f for f in os.listdir(two) if f.startswith("config")]) == 1


@pytest.mark.parametrize("killed", [0, 1])
def test_killed_process_stops_the_other_and_restart_resumes(tmp_path, cache, killed):
  """SIGKILL of one process's `main.py` mid-training: the other exits with one `error:` line
  within the bound (process 0 hosts the coordinator: its death is seen at once; process 1's in
  the next collective, or through the heartbeats); both restarted resume from the newest
  checkpoint and finish."""
  wd = str(tmp_path / "killed")
  args = [
      "--config.train.batch_size=1",
      "--config.train.eval_at_end=False",
      f"--config.compilation_cache_dir={cache}",
  ]
  procs = _start(wd, args + ["--config.optim.max_iter=10000"], processes=2, devices=1,
                 tag="first")  # fmt: skip
  ckpt = os.path.join(wd, "checkpoints")
  deadline = time.time() + 600
  while not (os.path.isdir(ckpt) and "2" in os.listdir(ckpt)):  # training is under way
    assert time.time() < deadline and all(p.poll() is None for p in procs), _stderr(wd, "first", 0)
    time.sleep(0.2)
  procs[killed].send_signal(signal.SIGKILL)
  t0 = time.perf_counter()
  survivor = 1 - killed
  rc = procs[survivor].wait(timeout=180)
  stopped_after = time.perf_counter() - t0
  err = _stderr(wd, "first", survivor)
  print(f"process {survivor} stopped {stopped_after:.1f} s after process {killed} was killed")
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 1, err[-3000:]
  assert lines[-1].startswith("error: ") and "another process of the job" in lines[-1], err
  assert sum(l.startswith("error:") for l in lines) == 1, err[-3000:]
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  assert stopped_after < 90  # distributed.HEARTBEAT_TIMEOUT_S (60 s) at worst
  procs[killed].wait(timeout=60)
  # restart both: they resume from the newest finished checkpoint and run to the (new) end
  last = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  procs = _start(wd, args + [f"--config.optim.max_iter={last + 1}"], processes=2, devices=1,
                 tag="again")  # fmt: skip
  _finish(procs, wd, "again")
  assert f"resumed from {ckpt}/{last}" in _stderr(wd, "again", 0)
  assert str(last + 1) in os.listdir(ckpt)
  assert not [s for s in os.listdir(ckpt) if "tmp" in s]  # unfinished saves were removed


def test_supervisor_shows_one_error_line_instead_of_the_runtime_dump():
  """The stderr filter of `distributed.supervise` (fed pieces of 1, 7 and all bytes): the
  child's lines and progress-bar updates pass, a C++ fatal record and the stack dump after it do
  not; the runtime's reason is kept for the `error:` line."""
  from cn2_jax.engine import distributed

  dump = (
      b"I1207 11:39:26 loop.py:1] lr 0.02\ntrain:  40%|####  | 4/10\rtrain:  50%|#####  | 5/10\r"
      b"FileNotFoundError is not a fatal record\n"
      b"F1207 11:05:09.468394   29957 client.h:80] Terminating process because the JAX "
      b"distributed service detected fatal errors. absl::Status: UNAVAILABLE: The following "
      b"tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n\nRPC: "
      b"/xla.coordination.CoordinationService/PollForError [type.googleapis.com/x='']\n"
      b"*** Check failure stack trace: ***\n    @     0x7f490ea40634  absl::LogMessage::Flush()\n"
  )
  kept = dump[: dump.index(b"F1207")]
  for size in (1, 7, len(dump)):
    sink = io.BytesIO()
    stderr = distributed._StderrFilter(sink)  # noqa: SLF001
    for i in range(0, len(dump), size):
      stderr.feed(dump[i : i + size])
    stderr.close()
    assert sink.getvalue() == kept, size
    assert stderr.status() == (
        "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats): 1 The "
        "tasks have crashed."
    )
    assert not stderr.reported
  # the child's own error line stays the last: the runtime's shutdown records after it are held
  # back (seen in CI: W/E preemption_sync_manager records printed after the error line)
  own_dump = (
      b"I1207 x\nerror: process 1 of 2: bad\n  W1207 18:51:43.791813 21459 "
      b"preemption_sync_manager.cc:147] Failed to retrieve preemption notice\nE1207 18:51:43 "
      b"Failed to cancel preemption barrier\n"
  )
  for keep_all in (False, True):
    sink = io.BytesIO()
    own = distributed._StderrFilter(sink, keep_all=keep_all)  # noqa: SLF001
    for c in own_dump:
      own.feed(bytes([c]))
    own.close()
    assert own.reported and own.fatal is None
    want = own_dump if keep_all else b"I1207 x\nerror: process 1 of 2: bad\n"
    assert sink.getvalue() == want, keep_all
