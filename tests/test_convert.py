"""Tests of cn2_jax.convert (weight conversion) and cn2_jax.testing.oracle.

torch is never imported: torch-format files are written by the minimal writer below, and three
small files written by genuine torch (tests/data/*.pth, see make_torch_fixtures.py) are read.
"""

from __future__ import annotations

import collections
import json
import pickle
import types
import zipfile

import numpy as np
import pytest

from cn2_jax import convert
from cn2_jax.modeling import meta_arch
from cn2_jax import weights as cv
from cn2_jax.weights import rename
from cn2_jax.testing import oracle as orc

DATA = __import__("pathlib").Path(__file__).parent / "data"
R50_BLOCKS = (3, 4, 6, 3)
N_R50_CONVS = 1 + sum(3 * n + 1 for n in R50_BLOCKS)  # 53
R50_BACKBONE_CONV_ELEMS = 23_454_912  # torchvision resnet50: 25,557,032 - fc - 2 * 26,560 BN
R50_BN_CHANNELS = 26_560


# ------------------------------------------------------------------------------------------------
# A minimal torch zip-format writer (torch.save layout: archive/data.pkl + archive/data/<key>).
# ------------------------------------------------------------------------------------------------


class _Global:
  """Pickled as `GLOBAL module name` (so no torch module is needed to write the reference)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *a):  # pickle requires reduce callables to be callable
    raise AssertionError


_STORAGE_NAME = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
}


class _Storage:

  def __init__(self, key, arr):
    self.key, self.arr = key, np.ascontiguousarray(arr).reshape(-1)


class _Tensor:

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def __reduce__(self):
    return (
        _Global("torch._utils", "_rebuild_tensor_v2"),
        (
            self.storage,
            self.offset,
            tuple(self.shape),
            tuple(self.stride),
            False,
            collections.OrderedDict(),
        ),
    )


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets `save` be overridden

  def __init__(self, f):
    super().__init__(f, protocol=2)

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return (
          "storage",
          _Global("torch", _STORAGE_NAME[obj.arr.dtype]),
          obj.key,
          "cpu",
          obj.arr.size,
      )
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


def write_torch_zip(path, state_dict, wrap_model=True, transpose_keys=()):
  """Writes `{'model': OrderedDict(name -> tensor)}` in torch's zip format. Keys listed in
  `transpose_keys` are stored as a transposed (non-contiguous) view of a transposed storage."""
  storages, tensors = [], collections.OrderedDict()
  for i, (k, v) in enumerate(state_dict.items()):
    v = np.asarray(v)
    if k in transpose_keys and v.ndim == 2:
      st = _Storage(str(i), v.T)  # storage holds v^T row-major; v is its transpose view
      tensors[k] = _Tensor(st, 0, v.shape, (1, v.shape[0]))
    else:
      st = _Storage(str(i), v)
      stride = tuple(int(np.prod(v.shape[d + 1 :])) for d in range(v.ndim))
      tensors[k] = _Tensor(st, 0, v.shape, stride)
    storages.append(st)
  import io

  buf = io.BytesIO()
  _TorchPickler(buf).dump({"model": tensors} if wrap_model else tensors)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for st in storages:
      zf.writestr(f"archive/data/{st.key}", st.arr.astype(st.arr.dtype.newbyteorder("<")).tobytes())
    zf.writestr("archive/version", "3\n")


def write_pkl(path, obj, protocol=2):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)


class _Py2Pickler(pickle._Pickler):
  """Writes bytes as Python 2 `str` (BINSTRING) and numpy globals under `numpy.core`, like the
  Python 2 pickles of detectron2's ImageNet R-50.pkl (read back with encoding='latin1')."""

  dispatch = pickle._Pickler.dispatch.copy()

  def _save_py2_str(self, obj):
    self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_py2_str

  def save_global(self, obj, name=None):
    name = name or obj.__name__
    module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
    self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
    self.memoize(obj)

  dispatch[type] = save_global
  dispatch[types.FunctionType] = save_global
  dispatch[types.BuiltinFunctionType] = save_global


def write_py2_style_pkl(path, obj):
  with open(path, "wb") as f:
    _Py2Pickler(f, protocol=2).dump(obj)


# ------------------------------------------------------------------------------------------------
# Name sets.
# ------------------------------------------------------------------------------------------------


def random_state_dict(spec, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s), dtype=np.float32) for k, s in spec}


def msra_r50_blobs(seed=1):
  """caffe2 MSRA ResNet-50 blob names (detectron2 ImageNetPretrained/MSRA/R-50.pkl)."""
  rng = np.random.default_rng(seed)
  blobs = {}

  def conv_bn(w_name, bn_name, cout, cin, k):
    blobs[w_name] = rng.standard_normal((cout, cin, k, k), dtype=np.float32)
    blobs[bn_name + "_s"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    blobs[bn_name + "_b"] = rng.standard_normal(cout, dtype=np.float32)

  conv_bn("conv1_w", "res_conv1_bn", 64, 3, 7)
  cin = 64
  for stage, n in enumerate(R50_BLOCKS):
    mid, cout = 64 * 2**stage, 256 * 2**stage
    for b in range(n):
      p = f"res{stage + 2}_{b}"
      if b == 0:
        conv_bn(f"{p}_branch1_w", f"{p}_branch1_bn", cout, cin, 1)
      conv_bn(f"{p}_branch2a_w", f"{p}_branch2a_bn", mid, cin if b == 0 else cout, 1)
      conv_bn(f"{p}_branch2b_w", f"{p}_branch2b_bn", mid, mid, 3)
      conv_bn(f"{p}_branch2c_w", f"{p}_branch2c_bn", cout, mid, 1)
    cin = cout
  blobs["fc1000_w"] = rng.standard_normal((1000, 2048), dtype=np.float32)
  blobs["fc1000_b"] = rng.standard_normal(1000, dtype=np.float32)
  blobs["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)
  return blobs


def torchvision_r50_state_dict(seed=2, blocks=R50_BLOCKS):
  rng = np.random.default_rng(seed)
  sd = collections.OrderedDict()

  def bn(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.bias"] = rng.standard_normal(c, dtype=np.float32)
    sd[f"{name}.running_mean"] = rng.standard_normal(c, dtype=np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

  sd["conv1.weight"] = rng.standard_normal((64, 3, 7, 7), dtype=np.float32)
  bn("bn1", 64)
  cin = 64
  for stage, n in enumerate(blocks):
    mid, cout = 64 * 2**stage, 256 * 2**stage
    for b in range(n):
      p = f"layer{stage + 1}.{b}"
      for j, (co, ci, k) in enumerate(
          ((mid, cin if b == 0 else cout, 1), (mid, mid, 3), (cout, mid, 1)), start=1
      ):
        sd[f"{p}.conv{j}.weight"] = rng.standard_normal((co, ci, k, k), dtype=np.float32)
        bn(f"{p}.bn{j}", co)
      if b == 0:
        sd[f"{p}.downsample.0.weight"] = rng.standard_normal((cout, cin, 1, 1), dtype=np.float32)
        bn(f"{p}.downsample.1", cout)
    cin = cout
  sd["fc.weight"] = rng.standard_normal((1000, 2048), dtype=np.float32)
  sd["fc.bias"] = rng.standard_normal(1000, dtype=np.float32)
  return sd


def get_path(tree, coll, path):
  """Leaf of a `build_target_tree`-style tree (paths split on every '.')."""
  node = tree[coll]
  for p in path.split("."):
    node = node[p]
  return node


def layout(torch_array, flax_shape):
  a = np.asarray(torch_array)
  if a.ndim == 4 and len(flax_shape) == 4 and a.shape != tuple(flax_shape):
    return a.transpose(2, 3, 1, 0)
  if a.ndim == 2:
    return a.T
  return a


R50_SPEC = orc.cn2_r50_state_dict_spec()
R50_ENTRIES = orc.expected_flax_entries(R50_SPEC)
R50_PARAMS = sum(int(np.prod(s)) for c, _, s in R50_ENTRIES if c == "params")
R50_FROZEN = sum(int(np.prod(s)) for c, _, s in R50_ENTRIES if c == "frozen")


# ------------------------------------------------------------------------------------------------
# (i) oracle.
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(orc.oracle_json_path() is None, reason="shared/oracle not present")
def test_oracle_regeneration_matches_all_checksums():
  path = orc.oracle_json_path()
  meta = json.loads(path.read_text())
  sd = orc.regenerate_oracle_state_dict(path)  # raises OracleMismatch on any checksum mismatch
  assert len(sd) == meta["num_entries"] == 330
  # The synthesised official key list equals the oracle's, in order.
  assert [(k, tuple(s)) for k, s in R50_SPEC] == [
      (e["key"], tuple(e["shape"])) for e in meta["entries"]
  ]
  assert R50_PARAMS == meta["total_parameter_count"] == 71_645_897
  assert R50_PARAMS + R50_FROZEN == meta["total_state_dict_numel"]
  assert (
      sum(int(np.prod(s)) for c, _, s in orc.oracle_expected_flax_paths(path) if c == "params")
      == meta["total_parameter_count"]
  )
  # A corrupted checksum is detected.
  bad = dict(meta)
  bad["entries"] = [dict(e) for e in meta["entries"][:3]]
  bad["entries"][1]["check_sum"] += 1e-3
  tmp = path.parent / "_does_not_exist"
  assert not tmp.exists()
  with pytest.raises(orc.OracleMismatch, match="fpn_lateral3.bias"):
    _regen_from_obj(bad)


def _regen_from_obj(obj):
  import tempfile

  with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    json.dump(obj, f)
    f.flush()
    return orc.regenerate_oracle_state_dict(f.name)


def test_naming_rule_examples():
  got = {(c, p): s for c, p, s in R50_ENTRIES}
  assert got[("params", "backbone.bottom_up.res2.0.conv1.kernel")] == (1, 1, 64, 64)
  assert ("frozen", "backbone.bottom_up.res2.0.conv1.norm.running_var") in got
  assert ("frozen", "backbone.bottom_up.res2.0.conv1.norm.weight") in got
  assert got[("params", "backbone.fpn_lateral3.kernel")] == (1, 1, 512, 256)
  assert got[("params", "proposal_generator.centernet_head.bbox_tower.1.scale")] == (256,)
  assert got[("params", "proposal_generator.centernet_head.scales.3.scale")] == (1,)
  assert got[("params", "roi_heads.box_head.0.fc1.kernel")] == (12544, 1024)
  assert len(R50_ENTRIES) == 330


# ------------------------------------------------------------------------------------------------
# (ii) the full R50 CenterNet2 key set through .pkl and torch .pth.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_state_dict():
  return random_state_dict(R50_SPEC, seed=0)


def _check_full_conversion(sd_loaded, source, fmt_expected="detectron2"):
  fmt = cv.detect_format(sd_loaded)
  assert fmt == fmt_expected
  d2 = cv.to_detectron2_names(sd_loaded, fmt)
  target = orc.build_target_tree(R50_ENTRIES)
  variables, report = cv.convert_to_flax(d2, target)
  assert report.ok and not report.unknown_keys and not report.missing_keys
  assert report.num_mapped_tensors == 330 == report.num_source_tensors
  assert report.num_mapped_params == R50_PARAMS == 71_645_897
  assert report.num_mapped_frozen == R50_FROZEN == 4 * R50_BN_CHANNELS
  assert not report.filled_defaults and not report.eps_adjusted and not report.left_at_init
  for (key, _), (coll, path, shape) in zip(R50_SPEC, R50_ENTRIES):
    got = get_path(variables, coll, path)
    assert got.dtype == np.float32 and got.shape == tuple(shape), key
    np.testing.assert_array_equal(got, layout(source[key], shape), err_msg=key)
  return variables, report


def test_r50_pkl_converts_one_to_one(tmp_path, r50_state_dict):
  f = tmp_path / "model_final.pkl"
  write_pkl(f, {"model": r50_state_dict, "__author__": "Detectron2 Model Zoo"}, protocol=5)
  sd = cv.load_checkpoint_file(f)
  assert list(sd) == [k for k, _ in R50_SPEC]
  assert sd.info["container"] == "pickle" and sd.info["author"] == "Detectron2 Model Zoo"
  variables, report = _check_full_conversion(sd, r50_state_dict)
  # fc1: the Flax kernel applied to C,H,W-flattened pooled features equals torch's Linear.
  rng = np.random.default_rng(3)
  pooled_nhwc = rng.standard_normal((2, 7, 7, 256), dtype=np.float32)
  flat_chw = pooled_nhwc.transpose(0, 3, 1, 2).reshape(2, -1)
  w = r50_state_dict["roi_heads.box_head.0.fc1.weight"]
  kernel = variables["params"]["roi_heads"]["box_head"]["0"]["fc1"]["kernel"]
  np.testing.assert_allclose(flat_chw @ kernel, flat_chw @ w.T, rtol=1e-5, atol=1e-4)
  assert "source: 330 tensors" in report.summary()
  assert "mapped 330 tensors onto 330 target variables" in report.summary()


def test_r50_torch_zip_converts_one_to_one(tmp_path, r50_state_dict):
  f = tmp_path / "model_final.pth"
  # fc1 of stage 1 stored as a non-contiguous (transposed) view, as torch may write it.
  write_torch_zip(f, r50_state_dict, transpose_keys=("roi_heads.box_head.1.fc1.weight",))
  sd = cv.load_checkpoint_file(f)
  assert sd.info["container"] == "torch_zip"
  assert list(sd) == [k for k, _ in R50_SPEC]
  _check_full_conversion(sd, r50_state_dict)


def test_bare_state_dict_without_model_key_and_module_prefix(tmp_path):
  spec = orc.resnet_bottleneck_spec("backbone.bottom_up.", (1, 1, 1, 1))
  sd = random_state_dict(spec, seed=4)
  f = tmp_path / "ddp.pth"
  write_torch_zip(f, {"module." + k: v for k, v in sd.items()}, wrap_model=False)
  loaded = cv.load_checkpoint_file(f)
  assert list(loaded) == list(sd)
  target = orc.build_target_tree(orc.expected_flax_entries(spec))
  _, report = cv.convert_to_flax(cv.to_detectron2_names(loaded, "detectron2"), target)
  assert report.num_mapped_tensors == len(spec)


# ------------------------------------------------------------------------------------------------
# Genuine torch files (tests/data, written by torch 2.13.0+cpu).
# ------------------------------------------------------------------------------------------------


def _fixture_expected():
  base = np.arange(24, dtype=np.float32).reshape(4, 6) * np.float32(0.5) - np.float32(3.0)
  return {
      "conv.weight": np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3) / np.float32(7.0),
      "base": base,
      "view": base[1:3, 2:5],
      "transposed": base.T,
      "expanded": np.broadcast_to(np.arange(3, dtype=np.float32), (2, 3)),
      "half": (np.arange(10, dtype=np.float32) / 4).astype(np.float16),
      "bf16": np.arange(8, dtype=np.float32) * np.float32(0.25),
      "double": np.arange(4, dtype=np.float64) / 3,
      "long": np.arange(5, dtype=np.int64) - 2,
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
  }


@pytest.mark.parametrize(
    "name,container", [("torch_zip.pth", "torch_zip"), ("torch_legacy.pth", "torch_legacy")]
)
def test_genuine_torch_files(name, container):
  f = DATA / name
  if not f.exists():
    pytest.skip(f"{f} absent (tests/data/make_torch_fixtures.py writes it)")
  sd = cv.load_checkpoint_file(f)
  assert sd.info["container"] == container
  exp = _fixture_expected()
  assert list(sd) == list(exp)
  for k, v in exp.items():
    assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


def test_genuine_torch_module_state_dict_versions():
  f = DATA / "torch_module.pth"
  if not f.exists():
    pytest.skip(f"{f} absent")
  sd = cv.load_checkpoint_file(f)
  assert sd.info["module_versions"]["1"] == 2  # torch BatchNorm2d._version
  np.testing.assert_array_equal(sd["0.weight"].reshape(-1), np.arange(12, dtype=np.float32))
  np.testing.assert_array_equal(sd["1.running_var"], np.full(4, 4.0, np.float32))
  # detectron2's FrozenBatchNorm2d loading rule: version < 3 -> running_var -= eps.
  d2 = cv.StateDict(
      {
          "backbone.bottom_up.stem.conv1.weight": sd["0.weight"],
          **{
              f"backbone.bottom_up.stem.conv1.norm.{k}": sd[f"1.{k}"]
              for k in ("weight", "bias", "running_mean", "running_var")
          },
      },
      info={"module_versions": {"backbone.bottom_up.stem.conv1.norm": 2}},
  )
  spec = [(k, v.shape) for k, v in d2.items()]
  variables, report = cv.convert_to_flax(d2, orc.build_target_tree(orc.expected_flax_entries(spec)))
  rv = get_path(variables, "frozen", "backbone.bottom_up.stem.conv1.norm.running_var")
  np.testing.assert_allclose(rv, 4.0 - 1e-5, rtol=0, atol=1e-7)
  assert report.eps_adjusted == ["backbone.bottom_up.stem.conv1.norm.running_var"]


# ------------------------------------------------------------------------------------------------
# (iii) ImageNet initialisations, backbone-only.
# ------------------------------------------------------------------------------------------------

SENTINEL = -7.0


def _real_r50_target():
  return orc.build_target_tree(
      R50_ENTRIES, abstract=False, fill=lambda c, p, s: np.broadcast_to(np.float32(SENTINEL), s)
  )


def _check_left_at_init(variables, report):
  outside = [(c, p) for c, p, _ in R50_ENTRIES if not p.startswith("backbone.bottom_up.")]
  assert sorted(report.left_at_init) == sorted(f"{c}/{p}" for c, p in outside)
  assert len(outside) == 330 - 5 * N_R50_CONVS == 65
  for c, p in outside:
    assert np.all(get_path(variables, c, p) == SENTINEL)


def test_msra_r50_backbone_only(tmp_path):
  blobs = msra_r50_blobs()
  f = tmp_path / "R-50.pkl"
  write_py2_style_pkl(f, blobs)
  assert b"numpy.core.multiarray\n_reconstruct" in f.read_bytes()[:200]
  sd = cv.load_checkpoint_file(f)
  np.testing.assert_array_equal(sd["res2_0_branch2a_w"], blobs["res2_0_branch2a_w"])
  assert cv.detect_format(sd) == "msra_c2"
  d2 = cv.to_detectron2_names(sd, "msra_c2")
  assert d2.info["renamed"]["backbone.bottom_up.res2.0.conv1.norm.weight"] == "res2_0_branch2a_bn_s"
  assert d2.info["renamed"]["backbone.bottom_up.stem.conv1.norm.bias"] == "res_conv1_bn_b"
  assert d2.info["renamed"]["backbone.bottom_up.res5.0.shortcut.weight"] == "res5_0_branch1_w"
  assert {k for k, _ in d2.info["dropped"]} == {"fc1000_w", "fc1000_b", "conv1_w_momentum"}
  assert len(d2) == 3 * N_R50_CONVS
  with pytest.raises(cv.ConversionError, match="abstract"):
    cv.convert_to_flax(d2, orc.build_target_tree(R50_ENTRIES), backbone_only=True)
  variables, report = cv.convert_to_flax(d2, _real_r50_target(), backbone_only=True)
  assert report.num_mapped_tensors == 5 * N_R50_CONVS == 265
  assert len(report.filled_defaults) == 2 * N_R50_CONVS
  assert report.num_mapped_params == R50_BACKBONE_CONV_ELEMS
  assert report.num_mapped_frozen == 4 * R50_BN_CHANNELS
  _check_left_at_init(variables, report)
  # Values: conv OIHW -> HWIO, bn_s/bn_b -> weight/bias, stats as detectron2 fills them.
  np.testing.assert_array_equal(
      get_path(variables, "params", "backbone.bottom_up.res3.1.conv2.kernel"),
      blobs["res3_1_branch2b_w"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      get_path(variables, "frozen", "backbone.bottom_up.res4.0.shortcut.norm.weight"),
      blobs["res4_0_branch1_bn_s"],
  )
  np.testing.assert_array_equal(
      get_path(variables, "frozen", "backbone.bottom_up.stem.conv1.norm.bias"),
      blobs["res_conv1_bn_b"],
  )
  assert np.all(
      get_path(variables, "frozen", "backbone.bottom_up.res5.2.conv3.norm.running_var") == 1.0
  )
  assert np.all(
      get_path(variables, "frozen", "backbone.bottom_up.stem.conv1.norm.running_mean") == 0.0
  )
  text = report.summary()
  assert "stride_in_1x1=True" in text and "'BGR'" in text and "left at initial values" in text


def test_torchvision_r50_backbone_only(tmp_path):
  tv = torchvision_r50_state_dict()
  f = tmp_path / "resnet50-0676ba61.pth"
  write_torch_zip(f, tv, wrap_model=False)
  sd = cv.load_checkpoint_file(f)
  assert cv.detect_format(sd) == "torchvision"
  d2 = cv.to_detectron2_names(sd, "torchvision")
  assert (
      d2.info["renamed"]["backbone.bottom_up.res2.0.shortcut.norm.running_var"]
      == "layer1.0.downsample.1.running_var"
  )
  assert d2.info["renamed"]["backbone.bottom_up.stem.conv1.norm.weight"] == "bn1.weight"
  assert d2.info["renamed"]["backbone.bottom_up.res5.2.conv3.weight"] == "layer4.2.conv3.weight"
  assert len(d2.info["dropped"]) == 2 + N_R50_CONVS  # fc + num_batches_tracked
  variables, report = cv.convert_to_flax(d2, _real_r50_target(), backbone_only=True)
  assert report.num_mapped_tensors == 5 * N_R50_CONVS
  assert not report.filled_defaults and not report.eps_adjusted
  assert report.num_mapped_params == R50_BACKBONE_CONV_ELEMS
  assert report.num_mapped_frozen == 4 * R50_BN_CHANNELS
  _check_left_at_init(variables, report)
  np.testing.assert_array_equal(
      get_path(variables, "frozen", "backbone.bottom_up.res3.0.conv2.norm.running_mean"),
      tv["layer2.0.bn2.running_mean"],
  )
  np.testing.assert_array_equal(
      get_path(variables, "params", "backbone.bottom_up.res2.0.shortcut.kernel"),
      tv["layer1.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  text = report.summary()
  assert "stride_in_1x1=False" in text and "'RGB'" in text
  assert cv.format_expectations("torchvision")["pixel_std"] == (58.395, 57.120, 57.375)


def test_d2_converted_torchvision_backbone_pkl(tmp_path):
  """detectron2's convert-torchvision-to-d2.py output: bare names, stem.fc kept, author tag."""
  tv = torchvision_r50_state_dict(seed=5)
  d2_names = {}
  for k, v in tv.items():
    n = rename._torchvision_name(k)
    d2_names[n] = v
  f = tmp_path / "R-50-tv.pkl"
  write_pkl(f, {"model": d2_names, "__author__": "torchvision", "matching_heuristics": True})
  sd = cv.load_checkpoint_file(f)
  assert cv.detect_format(sd) == "detectron2" and sd.info["matching_heuristics"]
  d2 = cv.to_detectron2_names(sd, "detectron2")
  variables, report = cv.convert_to_flax(d2, _real_r50_target(), backbone_only=True)
  assert report.num_mapped_tensors == 265
  assert "stride_in_1x1=False" in report.summary()


# ------------------------------------------------------------------------------------------------
# (iv) bad files and strictness.
# ------------------------------------------------------------------------------------------------

SMALL_SPEC = [
    (k, s) for k, s in R50_SPEC if "bottom_up" not in k and "fc1" not in k
] + orc.resnet_bottleneck_spec("backbone.bottom_up.", (1, 0, 0, 0))


def test_truncated_and_corrupt_files(tmp_path):
  sd = random_state_dict(SMALL_SPEC[:6], seed=6)
  good = tmp_path / "good.pth"
  write_torch_zip(good, sd)
  raw = good.read_bytes()
  cases = {
      "trunc_zip.pth": raw[: len(raw) // 2],
      "trunc_zip_tail.pth": raw[:-30],
      "not_pickle.pkl": b"this is not a pickle at all\n" * 10,
      "empty.pkl": b"",
      "random.pth": np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
  }
  pk = tmp_path / "good.pkl"
  write_pkl(pk, {"model": sd})
  cases["trunc.pkl"] = pk.read_bytes()[:-100]
  for name, data in cases.items():
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(cv.ConversionError) as e:
      cv.load_checkpoint_file(f)
    assert name in str(e.value), (name, str(e.value))
  with pytest.raises(cv.ConversionError, match="missing.pth"):
    cv.load_checkpoint_file(tmp_path / "missing.pth")
  # A zip that is not a torch checkpoint.
  z = tmp_path / "other.zip"
  with zipfile.ZipFile(z, "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(cv.ConversionError, match="no data.pkl"):
    cv.load_checkpoint_file(z)
  # Non-tensor entries in the weights dict are listed.
  bad = tmp_path / "bad_entry.pkl"
  write_pkl(bad, {"model": {"a.weight": np.zeros(3, np.float32), "b.weight": "oops"}})
  with pytest.raises(cv.ConversionError, match="b.weight"):
    cv.load_checkpoint_file(bad)


def test_restricted_unpickler_never_runs_foreign_code(tmp_path):
  class Evil:

    def __reduce__(self):
      return (print, ("pwned",))

  f = tmp_path / "evil.pkl"
  write_pkl(f, {"model": {"x.weight": Evil()}})
  with pytest.raises(cv.ConversionError, match="x.weight"):
    cv.load_checkpoint_file(f)


def test_wrong_keys_are_listed():
  sd = random_state_dict(SMALL_SPEC, seed=7)
  sd["roi_heads.box_head.0.fc3.weight"] = np.zeros((4, 4), np.float32)
  sd["backbone.fpn_lateral6.bias"] = np.zeros(256, np.float32)
  del sd["backbone.fpn_output3.bias"]
  del sd["backbone.bottom_up.res2.0.conv2.norm.running_var"]
  target = orc.build_target_tree(orc.expected_flax_entries(SMALL_SPEC))
  with pytest.raises(cv.ConversionError) as e:
    cv.convert_to_flax(cv.to_detectron2_names(sd, "detectron2"), target)
  r = e.value.report
  assert sorted(r.unknown_keys) == ["backbone.fpn_lateral6.bias", "roi_heads.box_head.0.fc3.weight"]
  assert sorted(r.missing_keys) == [
      "frozen/backbone.bottom_up.res2.0.conv2.norm.running_var",
      "params/backbone.fpn_output3.bias",
  ]
  msg = str(e.value)
  for k in (
      "roi_heads.box_head.0.fc3.weight",
      "backbone.fpn_lateral6.bias",
      "params/backbone.fpn_output3.bias",
      "UNKNOWN",
      "MISSING",
      "FAILED",
  ):
    assert k in msg


def test_wrong_shapes_are_listed():
  sd = random_state_dict(SMALL_SPEC, seed=8)
  sd["roi_heads.box_predictor.0.cls_score.weight"] = np.zeros((91, 1024), np.float32)
  sd["backbone.fpn_output4.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  sd["proposal_generator.centernet_head.scales.0.scale"] = np.zeros((), np.float32)
  sd["backbone.fpn_output5.bias"] = np.zeros(256, np.int64)
  target = orc.build_target_tree(orc.expected_flax_entries(SMALL_SPEC))
  with pytest.raises(cv.ConversionError) as e:
    cv.convert_to_flax(sd, target)
  r = e.value.report
  mism = {k: (src, exp) for k, src, exp, _ in r.shape_mismatches}
  assert mism["roi_heads.box_predictor.0.cls_score.weight"] == ((91, 1024), (81, 1024))
  assert mism["backbone.fpn_output4.weight"] == ((256, 256, 1, 1), (256, 256, 3, 3))
  assert mism["proposal_generator.centernet_head.scales.0.scale"] == ((), (1,))
  assert r.dtype_problems == [("backbone.fpn_output5.bias", "int64")]
  assert "roi_heads.box_predictor.0.cls_score.weight" in str(e.value)
  assert "SHAPE" in str(e.value)


def test_unknown_formats_and_bad_imagenet_names():
  with pytest.raises(cv.ConversionError, match="unrecognised"):
    cv.detect_format({"foo.bar": np.zeros(1)})
  blobs = {
      "conv1_w": np.zeros((64, 3, 7, 7), np.float32),
      "res2_0_branch2d_w": np.zeros((1, 1, 1, 1), np.float32),
  }
  with pytest.raises(cv.ConversionError, match="res2_0_branch2d_w"):
    cv.to_detectron2_names(blobs, cv.detect_format(blobs))


def test_backbone_only_skips_heads_of_a_full_checkpoint():
  sd = random_state_dict(SMALL_SPEC, seed=9)
  entries = orc.expected_flax_entries(SMALL_SPEC)
  target = orc.build_target_tree(entries, abstract=False)
  variables, report = cv.convert_to_flax(sd, target, backbone_only=True)
  n_bb = sum(1 for k, _ in SMALL_SPEC if k.startswith("backbone.bottom_up."))
  assert report.num_mapped_tensors == n_bb
  assert len(report.skipped_keys) == len(SMALL_SPEC) - n_bb
  assert len(report.left_at_init) == len(SMALL_SPEC) - n_bb


# ------------------------------------------------------------------------------------------------
# (v) Orbax round trip, and the CLI with a stand-in model.
# ------------------------------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path):
  tree = {
      "params": {
          "backbone": {
              "fpn_lateral3": {"kernel": np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)}
          },
          "proposal_generator": {
              "centernet_head": {"bbox_tower.1": {"scale": np.linspace(0, 1, 5, dtype=np.float32)}}
          },
      },
      "frozen": {
          "backbone": {
              "bottom_up": {
                  "stem": {"conv1": {"norm": {"running_var": np.full(3, 0.5, np.float32)}}}
              }
          }
      },
  }
  out = cv.save_variables(tree, tmp_path / "ckpt")
  restored = cv.restore_saved_variables(out)
  import jax

  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), b)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored2 = cv.restore_saved_variables(out, abstract)
  for a, b in zip(jax.tree_util.tree_leaves(restored2), jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(Exception):
    cv.save_variables(tree, out)  # refuses to overwrite
  cv.save_variables(tree, out, overwrite=True)


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
  spec = orc.resnet_bottleneck_spec("backbone.bottom_up.", (1, 1, 1, 1)) + [
      ("backbone.fpn_lateral3.weight", (256, 512, 1, 1)),
      ("backbone.fpn_lateral3.bias", (256,)),
  ]
  entries = orc.expected_flax_entries(spec)
  # The family's converter builds its model and reads the variables' structure: a fake target
  # tree instead (the test config names only what the converter's warnings read).
  from cn2_jax.modeling.meta_arch import centernet2

  monkeypatch.setattr(centernet2, "build_model", lambda cfg: None)
  monkeypatch.setattr(
      centernet2, "abstract_module_variables", lambda model: orc.build_target_tree(entries)
  )
  monkeypatch.setattr(
      centernet2,
      "init_module_variables",
      lambda model, seed: orc.build_target_tree(entries, abstract=False),
  )
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.model = ml_collections.ConfigDict({'backbone': {'stride_in_1x1': True},\n"
      "                                      'input_format': 'BGR'})\n"
      "  return c\n"
  )
  sd = random_state_dict(spec, seed=10)
  src = tmp_path / "m.pth"
  write_torch_zip(src, sd)
  out = tmp_path / "out"
  assert convert.main(["--src", str(src), "--out", str(out), "--config", str(cfg)]) == 0
  restored = cv.restore_saved_variables(out)
  np.testing.assert_array_equal(
      restored["params"]["backbone"]["fpn_lateral3"]["kernel"],
      sd["backbone.fpn_lateral3.weight"].transpose(2, 3, 1, 0),
  )
  # Wrong keys: non-zero exit and the report on stderr.
  sd2 = dict(sd)
  sd2["backbone.extra.weight"] = np.zeros(3, np.float32)
  src2 = tmp_path / "m2.pth"
  write_torch_zip(src2, sd2)
  assert (
      convert.main(["--src", str(src2), "--out", str(tmp_path / "o2"), "--config", str(cfg)]) == 1
  )
  assert "backbone.extra.weight" in capsys.readouterr().err
  # torchvision weights need --backbone-only ...
  tvf = tmp_path / "tv.pth"
  write_torch_zip(tvf, torchvision_r50_state_dict(seed=11, blocks=(1, 1, 1, 1)), wrap_model=False)
  assert convert.main(["--src", str(tvf), "--out", str(tmp_path / "o3"), "--config", str(cfg)]) == 1
  assert "--backbone-only" in capsys.readouterr().err
  # ... and then convert, warning that this config (stride_in_1x1=True, BGR) does not fit them.
  assert (
      convert.main(
          [
              "--src",
              str(tvf),
              "--out",
              str(tmp_path / "o3"),
              "--config",
              str(cfg),
              "--backbone-only",
          ]
      )
      == 0
  )
  printed = capsys.readouterr().out
  assert "WARNING: config sets stride_in_1x1=True but torchvision weights need False" in printed
  assert "WARNING: config sets input_format='BGR'" in printed
  assert "params/backbone.fpn_lateral3.kernel" in printed  # left at init, listed


# ----------------------------------------------------------------------------------------------
# One CLI for every family: the one-stage formats through `python -m cn2_jax.convert`.
# ----------------------------------------------------------------------------------------------
_TINY_ONESTAGE = dict(num_classes=3, channels=(16, 8, 8), width=8, head_conv=8)


def _onestage_sd(seed=0):
  from tests.test_onestage_model import _random_sd, centerx_state_dict_spec

  return _random_sd(centerx_state_dict_spec(18, **_TINY_ONESTAGE), seed)


def _pickle(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  return str(path)


def test_detect_checkpoint_and_family_of_every_format():
  from tests.test_onestage_model import _xingyizhou_sd

  sd = _onestage_sd()
  assert convert.detect_checkpoint(sd) == "centerx"
  assert convert.detect_checkpoint(_xingyizhou_sd()) == "xingyizhou"
  tv = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
  assert convert.detect_checkpoint(tv) == "torchvision"
  d2 = random_state_dict(orc.resnet_bottleneck_spec("backbone.bottom_up.", (1, 1, 1, 1)))
  assert convert.detect_checkpoint(d2) == "detectron2"
  for fmt, spec in convert.FORMATS.items():
    assert set(spec.families) <= set(meta_arch.META_ARCHS), fmt
  assert convert.FORMATS["torchvision"].families == ("centernet2", "centernet", "onestage")
  assert convert.FORMATS["detectron2"].families == ("centernet2", "centernet")
  with pytest.raises(cv.ConversionError, match="centerX"):
    convert.detect_checkpoint({"foo.weight": np.zeros(1)})


def test_cli_onestage_checkpoints(tmp_path, capsys):
  """centerX weights: detected, the architecture read off the checkpoint, converted strictly;
  the wrong --family and torchvision weights without --backbone-only fail with exit 1."""
  sd = _onestage_sd(seed=3)
  src = _pickle(tmp_path / "centerx.pkl", {"model": sd})
  out = tmp_path / "out"
  assert convert.main(["--src", src, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "one-stage conversion of a centerx checkpoint: OK" in printed
  restored = cv.restore_saved_variables(out)
  np.testing.assert_array_equal(
      restored["params"]["upsample"]["deconv1"]["up_sample"]["kernel"],
      sd["upsample.deconv1.up_sample.weight"].transpose(2, 3, 0, 1),
  )
  np.testing.assert_array_equal(
      restored["batch_stats"]["backbone"]["stem"]["conv1"]["norm"]["var"],
      sd["backbone.bn1.running_var"],
  )
  # The checkpoint names the family: asking for another one is an error, not a bad mapping.
  args = ["--src", src, "--out", str(tmp_path / "o2"), "--family", "centernet2"]
  assert convert.main(args) == 1
  assert "not centernet2 weights" in capsys.readouterr().err
  # Strict: a missing key fails with the report on stderr and nothing written.
  bad = dict(sd)
  del bad["head.wh_head.out_conv.bias"]
  bad_src = _pickle(tmp_path / "bad.pkl", {"model": bad})
  assert convert.main(["--src", bad_src, "--out", str(tmp_path / "o3")]) == 1
  assert "params/head.wh_head.out_conv.bias" in capsys.readouterr().err
  assert not (tmp_path / "o3").exists()
  # torchvision ImageNet weights fit both families: --family (or --config's arch) picks one.
  tv = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
  tv["fc.weight"], tv["fc.bias"] = np.zeros((1000, 8), np.float32), np.zeros(1000, np.float32)
  tv_src = _pickle(tmp_path / "tv.pkl", {"model": tv})
  args = ["--src", tv_src, "--out", str(tmp_path / "o4"), "--family", "onestage"]
  assert convert.main(args) == 1
  assert "--backbone-only" in capsys.readouterr().err
  assert convert.main(args + ["--backbone-only"]) == 1  # which model's backbone? --config's
  assert "needs --config" in capsys.readouterr().err


def test_cli_torchvision_backbone_for_a_onestage_config(tmp_path, capsys):
  """torchvision weights with --config of arch 'onestage': the family comes from the config and
  only the backbone is filled; a config of the other family is refused."""
  sd = _onestage_sd(seed=4)
  tv = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
  tv_src = _pickle(tmp_path / "tv.pkl", {"model": tv})
  cfg = tmp_path / "onestage_cfg.py"
  cfg.write_text(
      "from cn2_jax.config import base_config\n"
      "def get_config():\n"
      "  c = base_config()\n"
      "  c.model.arch = 'onestage'\n"
      "  c.model.num_classes = 3\n"
      "  c.model.resnet_depth = 18\n"
      "  c.model.resnet_width = 8\n"
      "  c.model.onestage.deconv_channels = (16, 8, 8)\n"
      "  c.model.onestage.head_conv = 8\n"
      "  return c\n"
  )
  out = tmp_path / "out"
  args = ["--src", tv_src, "--out", str(out), "--config", str(cfg), "--backbone-only"]
  assert convert.main(args) == 0
  assert "torchvision checkpoint (backbone only): OK" in capsys.readouterr().out
  restored = cv.restore_saved_variables(out)
  np.testing.assert_array_equal(
      restored["params"]["backbone"]["res2"]["0"]["conv1"]["norm"]["scale"],
      tv["layer1.0.bn1.weight"],
  )
  assert restored["params"]["head"]["cls_head"]["out_conv"]["kernel"].shape == (1, 1, 8, 3)
  # A CenterNet2 config for one-stage weights is refused before any mapping.
  args = ["--src", tv_src, "--out", str(tmp_path / "o2"), "--family", "onestage", "--config"]
  assert convert.main(args + ["configs/cn2_r50.py", "--backbone-only"]) == 1
  assert "model.arch='centernet2'" in capsys.readouterr().err
