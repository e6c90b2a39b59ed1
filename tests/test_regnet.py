"""RegNetX / RegNetY backbones of the one-stage family (modeling/backbone/regnet.py): the pycls
width / depth rule against the published models, parameter shapes, X and Y blocks and a whole
RegNetX-200MF against a numpy reference written from pycls's definition (torch layouts, NCHW),
pycls `.pyth` conversion through `python -m cn2_jax.convert`, centerX RegNet checkpoints (the
architecture read off the keys), and a one-stage training step with a RegNet backbone."""

from __future__ import annotations

import collections
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax import convert
from cn2_jax import weights as cv
from cn2_jax.config import ConfigError, base_config, validate_config
from cn2_jax.engine import optim
from cn2_jax.engine import step as step_lib
from cn2_jax.modeling import detector
from cn2_jax.modeling.backbone import regnet as R
from cn2_jax.modeling.layers import BatchNormSettings
from cn2_jax.modeling.onestage import model as M
from cn2_jax.tree_paths import key_str
from cn2_jax.weights import finetune
from cn2_jax.weights import onestage as wo
from tests.test_convert import _Storage, _Tensor, _TorchPickler

pytestmark = pytest.mark.usefixtures("fast_compile")

EPS = 1e-5
BN = BatchNormSettings(0.9, EPS)

# pycls MODEL_ZOO / "Designing Network Design Spaces" (Radosavovic et al. 2020), appendix table
# of the RegNetX / RegNetY models: blocks and widths per stage, group width, SE, and the
# published parameter count in millions (ImageNet model, 1000-class fc included).
PUBLISHED = {
    "RegNetX-200MF": ((1, 1, 4, 7), (24, 56, 152, 368), 8, False, 2.7),
    "RegNetX-400MF": ((1, 2, 7, 12), (32, 64, 160, 384), 16, False, 5.2),
    "RegNetY-4.0GF": ((2, 6, 12, 2), (128, 192, 512, 1088), 64, True, 20.6),
}


# ----------------------------------------------------------------------------------------------
# numpy reference: pycls AnyNet body (SimpleStem, ResBottleneckBlock, SE) in torch layouts
# ----------------------------------------------------------------------------------------------
def np_conv(x, w, b=None, stride=1, groups=1):
  """torch Conv2d by its definition: x [N, C, H, W], w [O, C / groups, k, k], padding (k-1)/2."""
  n, c, h, wd = x.shape
  o, cg, k, _ = w.shape
  p = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  ho, wo_ = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
  og = o // groups
  out = np.zeros((n, o, ho, wo_))
  for g in range(groups):
    for i in range(k):
      for j in range(k):
        patch = xp[:, g * cg : (g + 1) * cg, i : i + stride * (ho - 1) + 1 : stride]
        patch = patch[..., j : j + stride * (wo_ - 1) + 1 : stride]
        out[:, g * og : (g + 1) * og] += np.einsum(
            "nchw,oc->nohw", patch, w[g * og : (g + 1) * og, :, i, j]
        )
  if b is not None:
    out += b[None, :, None, None]
  return out


def np_bn(x, sd, prefix, batch_stats=False):
  """BatchNorm2d: eval mode (running statistics) or training mode (biased batch statistics)."""
  if batch_stats:
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
  else:
    mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
  inv = sd[prefix + "weight"] / np.sqrt(var + EPS)
  return (x - mean[None, :, None, None]) * inv[None, :, None, None] + sd[prefix + "bias"][
      None, :, None, None
  ]


relu = lambda x: np.maximum(x, 0.0)  # noqa: E731


def np_block(x, sd, p, w_out, stride, group_w, se_r, batch_stats=False):
  """pycls ResBottleneckBlock (bot_mul 1): proj/bn shortcut when the shape changes; f = a 1x1,
  b 3x3 grouped (stride), [SE: avg pool, 1x1, ReLU, 1x1, sigmoid], c 1x1; ReLU(shortcut + f)."""
  w_in = x.shape[1]
  bn = lambda y, name: np_bn(y, sd, p + name + ".", batch_stats)  # noqa: E731
  if w_in != w_out or stride != 1:
    shortcut = bn(np_conv(x, sd[p + "proj.weight"], stride=stride), "bn")
  else:
    shortcut = x
  y = relu(bn(np_conv(x, sd[p + "f.a.weight"]), "f.a_bn"))
  y = relu(bn(np_conv(y, sd[p + "f.b.weight"], stride=stride, groups=w_out // group_w), "f.b_bn"))
  if se_r:
    s = y.mean((2, 3), keepdims=True)
    s = relu(np_conv(s, sd[p + "f.se.f_ex.0.weight"], sd[p + "f.se.f_ex.0.bias"]))
    s = np_conv(s, sd[p + "f.se.f_ex.2.weight"], sd[p + "f.se.f_ex.2.bias"])
    y = y * (1.0 / (1.0 + np.exp(-s)))
  y = bn(np_conv(y, sd[p + "f.c.weight"]), "f.c_bn")
  return relu(shortcut + y)


def np_regnet(x, sd, stages, se_r, stem_w=32):
  """Stem (3x3 s2, BN, ReLU) and every stage; the last stage's output."""
  x = relu(np_bn(np_conv(x, sd["stem.conv.weight"], stride=2), sd, "stem.bn."))
  for i, (depth, width, group_w) in enumerate(stages):
    for j in range(depth):
      x = np_block(x, sd, f"s{i + 1}.b{j + 1}.", width, 2 if j == 0 else 1, group_w, se_r)
  return x


# pycls state dicts (names and torch shapes written from pycls's modules)
def _bn_spec(name, c):
  return [
      (f"{name}.weight", (c,)),
      (f"{name}.bias", (c,)),
      (f"{name}.running_mean", (c,)),
      (f"{name}.running_var", (c,)),
      (f"{name}.num_batches_tracked", ()),
  ]


def block_spec(p, w_in, w_out, stride, group_w, se_r):
  spec = []
  if w_in != w_out or stride != 1:
    spec += [(p + "proj.weight", (w_out, w_in, 1, 1))] + _bn_spec(p + "bn", w_out)
  spec += [(p + "f.a.weight", (w_out, w_in, 1, 1))] + _bn_spec(p + "f.a_bn", w_out)
  spec += [(p + "f.b.weight", (w_out, group_w, 3, 3))] + _bn_spec(p + "f.b_bn", w_out)
  w_se = int(round(w_in * se_r))
  if w_se:
    spec += [
        (p + "f.se.f_ex.0.weight", (w_se, w_out, 1, 1)),
        (p + "f.se.f_ex.0.bias", (w_se,)),
        (p + "f.se.f_ex.2.weight", (w_out, w_se, 1, 1)),
        (p + "f.se.f_ex.2.bias", (w_out,)),
    ]
  spec += [(p + "f.c.weight", (w_out, w_out, 1, 1))] + _bn_spec(p + "f.c_bn", w_out)
  return spec


def pycls_spec(stages, se_r, stem_w=32, num_classes=1000):
  spec = [("stem.conv.weight", (stem_w, 3, 3, 3))] + _bn_spec("stem.bn", stem_w)
  w_in = stem_w
  for i, (depth, width, group_w) in enumerate(stages):
    for j in range(depth):
      spec += block_spec(f"s{i + 1}.b{j + 1}.", w_in, width, 2 if j == 0 else 1, group_w, se_r)
      w_in = width
  return spec + [("head.fc.weight", (num_classes, w_in)), ("head.fc.bias", (num_classes,))]


def random_sd(spec, seed=0):
  """Random tensors; BatchNorm statistics positive, weights scaled to keep activations O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in spec:
    if key.endswith("num_batches_tracked"):
      sd[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif key.endswith(".weight") and len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      sd[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    elif key.endswith(".weight") and len(shape) == 1:  # BN gamma
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return sd


def flax_vars_from_pycls(abstract, sd, prefix=""):
  """Fills an abstract variable tree from pycls tensors with this test's own layout rules (conv
  OIHW -> HWIO, BN weight -> scale, running_mean / var -> batch_stats mean / var)."""

  def leaf(kp, _):
    coll, *path = [key_str(k) for k in kp]
    module, name = ".".join(path[:-1]), path[-1]
    torch_name = {"kernel": "weight", "scale": "weight", "mean": "running_mean"}.get(name, name)
    torch_name = "running_var" if (coll, name) == ("batch_stats", "var") else torch_name
    a = sd[prefix + module + "." + torch_name]
    return jnp.asarray(np.transpose(a, (2, 3, 1, 0)) if name == "kernel" else a)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)


def _nchw(y):
  return np.transpose(np.asarray(y, np.float64), (0, 3, 1, 2))


def _stages(name):
  return [(s.depth, s.width, s.group_w) for s in R.regnet_stages(R.REGNETS[name])]


# ----------------------------------------------------------------------------------------------
# (a) widths, depths and groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_generated_stages_equal_the_published_models(name):
  depths, widths, group_w, se, _ = PUBLISHED[name]
  stages = R.regnet_stages(R.REGNETS[name])
  assert tuple(s.depth for s in stages) == depths
  assert tuple(s.width for s in stages) == widths
  assert all(s.group_w == group_w and s.stride == 2 and s.bot_mul == 1.0 for s in stages)
  assert (R.REGNETS[name].se_r == 0.25) == se and R.REGNETS[name].stem_w == 32
  assert R.regnet_out_channels(name) == widths[-1]  # centerX DECONV_CHANNEL[0]: 368 / 384 / 1088


def test_width_quantisation_and_group_compatibility_rules():
  # RegNetX-400MF: quantised widths 24, 64, 152, 392 (multiples of 8); with group width 16,
  # 24 -> 32, 152 -> 160 and 392 -> 384 (392 / 16 = 24.5: Python's round-half-to-even, as pycls)
  assert R.generate_regnet(24.48, 24, 2.54, 22) == ([24, 64, 152, 392], [1, 2, 7, 12])
  assert R.adjust_block_compatibility([24, 64, 152, 392], [1.0] * 4, [16] * 4) == (
      [32, 64, 160, 384],
      [1.0] * 4,
      [16] * 4,
  )
  # a group wider than the bottleneck is capped at it; bot_mul 0.5 halves the bottleneck
  assert R.adjust_block_compatibility([8, 50], [1.0, 0.5], [16, 8]) == ([8, 48], [1.0, 0.5], [8, 8])
  with pytest.raises(ValueError, match="w0 % 8"):
    R.generate_regnet(10.0, 12, 2.0, 4)


# ----------------------------------------------------------------------------------------------
# (b) parameter shapes
# ----------------------------------------------------------------------------------------------
def _abstract(module, hw=32):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, hw, hw, 3))))


def _flat_shapes(tree):
  return {
      ".".join(key_str(k) for k in kp): tuple(x.shape)
      for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_shapes_are_pycls_shapes(name):
  """Every variable has the pycls key and shape (torch layout, transposed), and the parameter
  count plus the ImageNet fc equals pycls's published count; the output is stride 32."""
  model = R.build_regnet(name, norm="BN", batch_norm=BN, dtype=jnp.float32)
  variables = _abstract(model)
  depths, widths, group_w, se, millions = PUBLISHED[name]
  spec = dict(pycls_spec(list(zip(depths, widths, [group_w] * 4)), 0.25 if se else 0.0))
  got = {}
  for coll, tree in variables.items():
    for path, shape in _flat_shapes(tree).items():
      module, leaf = path.rsplit(".", 1)
      torch = {
          ("params", "kernel"): "weight",
          ("params", "scale"): "weight",
          ("params", "bias"): "bias",
          ("batch_stats", "mean"): "running_mean",
          ("batch_stats", "var"): "running_var",
      }[coll, leaf]
      # HWIO -> OIHW
      got[f"{module}.{torch}"] = (
          (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else shape
      )
  expected = {k: s for k, s in spec.items() if not k.startswith("head.") and "num_batches" not in k}
  assert got == expected
  n_params = sum(int(np.prod(s)) for s in _flat_shapes(variables["params"]).values())
  fc = widths[-1] * 1000 + 1000
  assert round((n_params + fc) / 1e6, 1) == millions
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 96, 3))), variables)
  assert out[R.OUTPUT].shape == (2, 2, 3, widths[-1])
  assert model.size_divisibility == 32


def test_a_few_shapes_written_out():
  m = R.build_regnet("RegNetY-4.0GF", norm="BN", batch_norm=BN, dtype=jnp.float32)
  p = _abstract(m)["params"]
  assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  b1 = p["s1"]["b1"]
  assert b1["proj"]["kernel"].shape == (1, 1, 32, 128)
  assert b1["f"]["b"]["kernel"].shape == (3, 3, 64, 128)  # 2 groups of 64
  assert b1["f"]["se"]["f_ex.0"]["kernel"].shape == (1, 1, 128, 8)  # w_se = 0.25 * w_in (32)
  assert p["s4"]["b2"]["f"]["se"]["f_ex.0"]["bias"].shape == (272,)  # 0.25 * 1088
  assert "proj" not in p["s4"]["b2"]


# ----------------------------------------------------------------------------------------------
# (c) one X block and one Y block against the numpy reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "w_in,w_out,stride,group_w,se_r",
    [
        (8, 16, 2, 4, 0.0),  # X block, projection shortcut, 4 groups
        (16, 16, 1, 8, 0.0),  # X block, identity shortcut
        (12, 16, 2, 8, 0.25),  # Y block (SE, w_se = 3), projection
        (16, 16, 1, 4, 0.25),  # Y block, identity shortcut
    ],
)
def test_block_equals_numpy_reference(w_in, w_out, stride, group_w, se_r):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, w_in, 7, 6))
  sd = random_sd(block_spec("", w_in, w_out, stride, group_w, se_r), seed=2)
  block = R.ResBottleneckBlock(w_out, stride, 1.0, group_w, se_r, "BN", jnp.float32, BN)
  abstract = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), _nhwc(x)))
  variables = flax_vars_from_pycls(abstract, sd)
  y = block.apply(variables, _nhwc(x))
  ref = np_block(x, sd, "", w_out, stride, group_w, se_r)
  assert ref.shape == ((2, w_out, 4, 3) if stride == 2 else (2, w_out, 7, 6))  # torch: floor(..)+1
  np.testing.assert_allclose(_nchw(y), ref, rtol=1e-4, atol=1e-4)
  # training mode: batch statistics (and the running ones move)
  y, upd = block.apply(variables, _nhwc(x), train_bn=True, mutable=["batch_stats"])
  ref = np_block(x, sd, "", w_out, stride, group_w, se_r, batch_stats=True)
  np.testing.assert_allclose(_nchw(y), ref, rtol=1e-4, atol=1e-4)
  assert not np.allclose(upd["batch_stats"]["f"]["a_bn"]["mean"], sd["f.a_bn.running_mean"])
  # FrozenBN: the running statistics as a fixed affine, the same values as BN in eval mode
  frozen = R.ResBottleneckBlock(w_out, stride, 1.0, group_w, se_r, "FrozenBN", jnp.float32, BN)
  fv = jax.eval_shape(lambda: frozen.init(jax.random.PRNGKey(0), _nhwc(x)))
  assert set(fv) == {"params", "frozen"}
  fv = {
      "params": flax_vars_from_pycls({"params": fv["params"]}, sd)["params"],
      "frozen": jax.tree_util.tree_map_with_path(  # FrozenBN keeps torch's names
          lambda kp, _: jnp.asarray(sd[".".join(key_str(k) for k in kp)]), fv["frozen"]
      ),
  }
  ref = np_block(x, sd, "", w_out, stride, group_w, se_r)
  np.testing.assert_allclose(_nchw(frozen.apply(fv, _nhwc(x))), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# (d) pycls checkpoints through the converter
# ----------------------------------------------------------------------------------------------
def write_pyth(path, model_state):
  """A pycls `.pyth` (torch zip format): {'epoch', 'model_state': OrderedDict, 'cfg'}."""
  storages, tensors = [], collections.OrderedDict()
  for i, (k, v) in enumerate(model_state.items()):
    v = np.asarray(v)
    st = _Storage(str(i), v)
    stride = tuple(int(np.prod(v.shape[d + 1 :])) for d in range(v.ndim))
    tensors[k] = _Tensor(st, 0, v.shape, stride)
    storages.append(st)
  buf = io.BytesIO()
  _TorchPickler(buf).dump({"epoch": 99, "model_state": tensors, "cfg": "MODEL:\n  TYPE: regnet\n"})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for st in storages:
      zf.writestr(f"archive/data/{st.key}", st.arr.astype(st.arr.dtype.newbyteorder("<")).tobytes())
    zf.writestr("archive/version", "3\n")


# A tiny RegNetY registered for the CLI and training tests (one more `REGNETS` line, as a new
# pycls model would be): widths 8 + 12 j quantised with wm 2 -> stages 8 / 16 / 32 x 2 / 64.
TINY = "RegNetY-tiny"
TINY_PARAMS = R.RegNetParams(depth=5, w0=8, wa=12.0, wm=2.0, group_w=8, se_r=0.25, stem_w=8)
TINY_STAGES = [(1, 8, 8), (1, 16, 8), (2, 32, 8), (1, 64, 8)]


@pytest.fixture
def tiny_regnet(monkeypatch):
  monkeypatch.setitem(R.REGNETS, TINY, TINY_PARAMS)
  assert _stages(TINY) == TINY_STAGES
  return TINY


_ONESTAGE_CFG = """
from cn2_jax.config import base_config
def get_config():
  c = base_config()
  c.model.arch = 'onestage'
  c.model.num_classes = 2
  c.model.resnet_depth = 18
  c.model.resnet_width = 8
  c.model.onestage.backbone = '{name}'
  c.model.onestage.deconv_channels = (16, 8, 8)
  c.model.onestage.use_deform = False
  c.model.onestage.head_conv = 8
  return c
"""


def test_pycls_pyth_converts_through_the_cli(tmp_path, capsys, tiny_regnet):
  """A synthetic pycls `.pyth` (RegNetY: SE) -> `python -m cn2_jax.convert --backbone-only` onto
  a one-stage config: the converted backbone's forward equals the numpy forward of the pycls
  tensors (the first block, and the whole network)."""
  sd = random_sd(pycls_spec(TINY_STAGES, 0.25, stem_w=8), seed=5)
  src = tmp_path / "RegNetY-tiny_dds_8gpu.pyth"
  write_pyth(src, sd)
  assert convert.detect_checkpoint(cv.load_checkpoint_file(src)) == "pycls"
  cfg = tmp_path / "cfg.py"
  cfg.write_text(_ONESTAGE_CFG.format(name=TINY))
  out = tmp_path / "out"
  args = ["--src", str(src), "--out", str(out), "--config", str(cfg)]
  assert convert.main(args) == 1  # ImageNet weights: backbone only
  assert "--backbone-only" in capsys.readouterr().err
  assert convert.main(args + ["--backbone-only"]) == 0
  printed = capsys.readouterr().out
  assert "one-stage conversion of a pycls checkpoint (backbone only): OK" in printed
  assert "head.fc.weight: ImageNet classifier" in printed
  v = cv.restore_saved_variables(out)
  backbone = {c: v[c]["backbone"] for c in ("params", "batch_stats")}
  np.testing.assert_array_equal(
      backbone["params"]["s3"]["b2"]["f"]["se"]["f_ex.2"]["kernel"],
      sd["s3.b2.f.se.f_ex.2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      backbone["batch_stats"]["s1"]["b1"]["bn"]["var"], sd["s1.b1.bn.running_var"]
  )
  model = R.build_regnet(
      TINY, norm="BN", batch_norm=BN, dtype=jnp.float32, out_features=("stem", "s1", "s4")
  )
  x = np.random.default_rng(6).standard_normal((1, 3, 64, 64))
  y = model.apply(backbone, _nhwc(x))
  stem = relu(np_bn(np_conv(x, sd["stem.conv.weight"], stride=2), sd, "stem.bn."))
  np.testing.assert_allclose(_nchw(y["stem"]), stem, rtol=1e-4, atol=1e-4)
  s1 = np_block(stem, sd, "s1.b1.", 8, 2, 8, 0.25)
  np.testing.assert_allclose(_nchw(y["s1"]), s1, rtol=1e-4, atol=1e-4)
  ref = np_regnet(x, sd, TINY_STAGES, 0.25)
  assert y["s4"].shape == (1, 2, 2, 64)
  np.testing.assert_allclose(_nchw(y["s4"]), ref, rtol=1e-4, atol=1e-4)
  # A ResNet model cannot take RegNet weights: a strict report naming the keys.
  resnet = M.abstract_variables(M.build_onestage_model(depth=18, backbone_width=8))
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), resnet)
  with pytest.raises(cv.ConversionError, match="UNEXPECTED source keys"):
    wo.load_onestage_weights(src, zeros)


def test_pycls_regnetx_200mf_state_dict_converts(tmp_path):
  """A synthetic RegNetX-200MF `.pyth` (its real names and shapes) read and renamed by the pycls
  rule onto the model's variables: the forward equals the numpy forward of the pycls tensors."""
  stages = _stages("RegNetX-200MF")
  sd = random_sd(pycls_spec(stages, 0.0), seed=7)
  write_pyth(tmp_path / "x200.pyth", sd)
  read = cv.load_checkpoint_file(tmp_path / "x200.pyth")  # the `model_state` of the file
  assert sorted(read) == sorted(sd) and wo.detect_format(read) == "pycls"
  renamed = wo.to_centerx_names(read, "pycls")
  assert "backbone.s4.b7.f.c_bn.running_var" in renamed and "backbone.head.fc.bias" not in renamed
  model = R.build_regnet("RegNetX-200MF", norm="BN", batch_norm=BN, dtype=jnp.float32)
  x = np.random.default_rng(8).standard_normal((1, 3, 64, 64))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _nhwc(x)))
  variables, report = wo.convert_onestage(renamed, {c: {"backbone": abstract[c]} for c in abstract})
  assert report.ok and sorted(k for k, _ in report.dropped) == sorted(
      [k for k in sd if k.startswith("head.fc.")]
      + ["backbone." + k for k in sd if k.endswith("num_batches_tracked")]
  )
  y = model.apply({c: variables[c]["backbone"] for c in variables}, _nhwc(x))[R.OUTPUT]
  ref = np_regnet(x, sd, stages, 0.0)
  assert y.shape == (1, 2, 2, 368)
  np.testing.assert_allclose(_nchw(y), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  with pytest.raises(cv.ConversionError, match="no centerX equivalent"):
    wo.to_centerx_names({**sd, "s1.extra.weight": np.zeros(1)}, "pycls")


def test_centerx_regnet_checkpoint_round_trip():
  """A centerX checkpoint of a RegNet model (its keys: backbone.stem.conv.*, backbone.s1.b1.*):
  the architecture is read off the keys, and export -> convert is the identity."""
  cfg = dict(
      backbone_name="RegNetX-400MF",
      num_classes=2,
      deconv_channels=(16, 8, 8),
      use_deform=False,
      head_conv=8,
  )
  abstract = M.abstract_variables(M.build_onestage_model(**cfg))
  rng = np.random.default_rng(9)
  variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
  sd = wo.export_state_dict(variables)
  assert "backbone.s4.b12.f.c_bn.running_var" in sd and "backbone.stem.conv.weight" in sd
  inferred = wo.infer_model_config(sd)
  assert inferred["backbone_name"] == "RegNetX-400MF"
  assert {
      k: inferred[k] for k in ("num_classes", "deconv_channels", "use_deform", "head_conv")
  } == {k: cfg[k] for k in ("num_classes", "deconv_channels", "use_deform", "head_conv")}
  back, report = wo.convert_onestage(wo.to_centerx_names(sd, wo.detect_format(sd)), abstract)
  assert report.ok
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # RegNet weights that are none of the known models: one error naming what was found
  odd = {k: v for k, v in sd.items() if not k.startswith("backbone.s4.b12.")}
  with pytest.raises(cv.ConversionError, match="none of the known RegNets"):
    wo.infer_model_config(odd)


# ----------------------------------------------------------------------------------------------
# (e) the one-stage family with a RegNet backbone
# ----------------------------------------------------------------------------------------------
def test_config_validates_and_one_training_step_is_finite(tiny_regnet, tmp_path):
  c = base_config()
  c.model.arch = "onestage"
  for name in PUBLISHED:
    c.model.onestage.backbone = name
    validate_config(c)
  c.model.onestage.backbone = "RegNetX-999MF"
  with pytest.raises(ConfigError, match="model.onestage.backbone must be one of"):
    validate_config(c)
  c.model.onestage.backbone = TINY
  c.model.num_classes = 2
  c.model.onestage.deconv_channels = (16, 8, 8)
  c.model.onestage.use_deform = False
  c.model.onestage.max_detections = 10
  c.optim.warmup_iters = 0
  c.optim.clip_value = 0.0
  c.optim.reference_batch_size = 0
  sd = random_sd(pycls_spec(TINY_STAGES, 0.25, stem_w=8), seed=11)
  write_pyth(tmp_path / "tiny.pyth", sd)
  c.init_from = str(tmp_path / "tiny.pyth")  # a pycls ImageNet file as the initialisation
  cfg = validate_config(c)
  model = detector.build_model(cfg.model)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(cfg.optim, None, ())
  state = step_lib.init_train_state(detector.init_fn(model), tx, jax.random.PRNGKey(0), mesh)
  assert state.params["backbone"]["s4"]["b1"]["f"]["c"]["kernel"].shape == (1, 1, 64, 64)
  neck_in = _flat_shapes(state.params["upsample"]["deconv1"]["dcn"])
  assert [shape[2] for path, shape in neck_in.items() if path.endswith("kernel")] == [64]  # s4
  stats0, params0 = jax.device_get((state.batch_stats, state.params))  # the step donates state
  rng = np.random.default_rng(0)
  batch = dict(
      image=rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
      image_hw=np.full((2, 2), 64, np.int32),
      gt_boxes=np.tile(np.array([[[4, 6, 28, 30], [30, 30, 60, 58]]], np.float32), (2, 1, 1)),
      gt_classes=np.array([[0, 1], [1, 0]], np.int32),
      gt_valid=np.ones((2, 2), bool),
  )
  fn = step_lib.make_train_step(model, tx, mesh)
  new_state, metrics = fn(state, step_lib.shard_batch(batch, mesh))
  assert np.isfinite(float(metrics["total_loss"])) and float(metrics["total_loss"]) > 0
  moved = jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      jax.device_get(new_state.batch_stats),
      stats0,
  )
  assert moved["backbone"]["s1"]["b1"]["f"]["a_bn"]["mean"] > 0  # trainable BatchNorm
  step = jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      jax.device_get(new_state.params),
      params0,
  )
  assert step["backbone"]["s2"]["b1"]["f"]["se"]["f_ex.0"]["kernel"] > 0  # SE is trained
  # init_from=<pycls .pyth>: the backbone comes from the file, the neck and head keep theirs
  plan = finetune.plan_init(cfg, ("a", "b"), detector.abstract_variables(cfg.model))
  init = plan.apply({"params": params0, "batch_stats": stats0})
  np.testing.assert_array_equal(
      init["params"]["backbone"]["s2"]["b1"]["f"]["se"]["f_ex.0"]["bias"],
      sd["s2.b1.f.se.f_ex.0.bias"],
  )
  np.testing.assert_array_equal(
      init["batch_stats"]["backbone"]["stem"]["bn"]["mean"], sd["stem.bn.running_mean"]
  )
  np.testing.assert_array_equal(
      init["params"]["head"]["cls_head"]["out_conv"]["bias"],
      params0["head"]["cls_head"]["out_conv"]["bias"],
  )
  assert "pycls" in plan.report()["source_what"] and "head.fc.weight" in plan.report()["skipped"]


def test_remat_keeps_values_and_gradients():
  """`model.remat`: stem and blocks rematerialised; the loss and its gradients are unchanged."""
  stages = (R.StageSpec(1, 8, 2, 1.0, 8), R.StageSpec(2, 16, 2, 1.0, 8))
  x = _nhwc(np.random.default_rng(4).standard_normal((2, 3, 16, 16)))

  def loss_and_grads(remat):
    model = R.RegNet(stages, 8, 0.25, "BN", jnp.float32, BN, remat=remat, out_features=("s2",))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

    def loss(params):
      out, _ = model.apply(
          {**variables, "params": params}, x, train_bn=True, mutable=["batch_stats"]
      )
      return jnp.sum(out["s2"] ** 2)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
