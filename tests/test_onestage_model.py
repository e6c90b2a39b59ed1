"""Tests for the one-stage model pieces: torch ConvTranspose2d semantics and layout, centerX's
bilinear deconv init, torch BatchNorm (incl. cross-device statistics), the parameter naming
against the official centerX state-dict keys, the weights converter, and a tiny model end to
end (decode contract, losses, gradients, BN state)."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn2_jax.weights import onestage as wo
from cn2_jax.weights import ConversionError
from cn2_jax.modeling.backbone.resnet import BLOCKS_BY_DEPTH, ResNet
from cn2_jax.modeling.layers import BatchNorm, BatchNormSettings
from cn2_jax.modeling.onestage import model as M
from cn2_jax.modeling.onestage import neck as N

pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------------------------
# ConvTranspose2d
# ----------------------------------------------------------------------------------------------
def ref_conv_transpose(x, w, s, p, op):
  """torch ConvTranspose2d by its definition (scatter form). x [N,H,W,Ci], w [Ci,Co,kh,kw]."""
  n, h, wd, _ = x.shape
  _, co, kh, kw = w.shape
  ho, wo_ = (h - 1) * s - 2 * p + kh + op, (wd - 1) * s - 2 * p + kw + op
  out = np.zeros((n, ho, wo_, co))
  for y in range(h):
    for xx in range(wd):
      for ky in range(kh):
        for kx in range(kw):
          yy, xo = y * s - p + ky, xx * s - p + kx
          if 0 <= yy < ho and 0 <= xo < wo_:
            out[:, yy, xo, :] += x[:, y, xx, :].astype(np.float64) @ w[:, :, ky, kx]
  return out


@pytest.mark.parametrize(
    "h,w,ci,co,k,s,p,op",
    [
        (3, 4, 5, 6, 4, 2, 1, 0),  # centerX's DeconvLayer
        (5, 3, 4, 4, 4, 2, 1, 0),
        (4, 4, 3, 2, 3, 2, 1, 1),  # CN's k=3 config
        (3, 5, 2, 3, 2, 2, 0, 0),
        (4, 3, 3, 5, 5, 3, 2, 2),
    ],
)
def test_conv_transpose_matches_torch_definition(h, w, ci, co, k, s, p, op):
  rng = np.random.RandomState(h * 7 + k)
  x = rng.randn(2, h, w, ci).astype(np.float32)
  wt = rng.randn(ci, co, k, k).astype(np.float32)  # torch layout, not symmetric
  kernel = wo._to_flax(wt, "deconv")  # the converter's mapping
  got = jax.jit(lambda a, b: N.conv_transpose2d(a, b, stride=s, padding=p, output_padding=op))(
      x, kernel
  )
  ref = ref_conv_transpose(x, wt, s, p, op)
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  if ci == co:  # the ordinary conv mapping has the right shape but the wrong values
    bad = N.conv_transpose2d(x, wo._to_flax(wt, "conv"), stride=s, padding=p, output_padding=op)
    assert np.abs(np.asarray(bad) - ref).max() > 1e-2


@pytest.mark.parametrize("h,w,ci,co", [(3, 4, 5, 6), (6, 6, 8, 8), (1, 2, 3, 1)])
def test_conv_transpose_subpixel_form_equals_dilated_form_with_gradients(h, w, ci, co):
  """The k=4/s=2/p=1 fast path (4 phase convolutions) against the generic lhs-dilated form:
  values and both gradients."""
  rng = np.random.RandomState(h + 10 * ci)
  x = rng.randn(2, h, w, ci).astype(np.float32)
  k = rng.randn(4, 4, ci, co).astype(np.float32)
  g = rng.randn(2, 2 * h, 2 * w, co).astype(np.float32)

  def fast(x, k):
    return N.conv_transpose2d(x, k, stride=2, padding=1, output_padding=0)

  def slow(x, k):
    return N._conv_transpose_dilated(x, k, 2, 1, 0, None)

  y1, vjp1 = jax.vjp(fast, x, k)
  y0, vjp0 = jax.vjp(slow, x, k)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
  for a, b in zip(vjp1(g), vjp0(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_bilinear_deconv_init():
  np.testing.assert_allclose(N.bilinear_profile(4), [0.25, 0.75, 0.75, 0.25])
  k = np.asarray(N.bilinear_deconv_init(jax.random.PRNGKey(0), (4, 4, 6, 5)))
  bil = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25])
  for ci in range(6):  # output channel 0, every input channel (torch w[ci, 0, :, :])
    np.testing.assert_allclose(k[:, :, ci, 0], bil)
  rest = k[:, :, :, 1:]
  bound = 1 / np.sqrt(5 * 16)  # torch default, fan_in = Cout * kh * kw
  assert np.abs(rest).max() <= bound and np.abs(rest).max() > 0.5 * bound
  # torch layout of the same init: weight[ci, 0] bilinear
  wt = np.transpose(k, (2, 3, 0, 1))
  np.testing.assert_allclose(wt[3, 0], bil)


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
def test_batchnorm_train_eval_and_running_update():
  rng = np.random.RandomState(0)
  x = (rng.randn(3, 4, 5, 6) * 2 + 1).astype(np.float32)
  bn = BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  assert set(v) == {"params", "batch_stats"}
  np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), 0)  # init: no update
  np.testing.assert_array_equal(np.asarray(v["batch_stats"]["var"]), 1)
  v = {
      "params": {"scale": jnp.asarray(rng.rand(6) + 0.5), "bias": jnp.asarray(rng.randn(6))},
      "batch_stats": {"mean": jnp.asarray(rng.randn(6)), "var": jnp.asarray(rng.rand(6) + 0.5)},
  }
  y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  x64 = x.astype(np.float64)
  mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  sc, b = np.asarray(v["params"]["scale"]), np.asarray(v["params"]["bias"])
  np.testing.assert_allclose(
      np.asarray(y), (x64 - mean) / np.sqrt(var + 1e-5) * sc + b, rtol=1e-5, atol=1e-5
  )
  n = x.size // 6
  np.testing.assert_allclose(
      np.asarray(upd["batch_stats"]["mean"]),
      0.9 * np.asarray(v["batch_stats"]["mean"]) + 0.1 * mean,
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      np.asarray(upd["batch_stats"]["var"]),  # torch: unbiased
      0.9 * np.asarray(v["batch_stats"]["var"]) + 0.1 * var * n / (n - 1),
      rtol=1e-6,
  )
  ye = bn.apply(v, x, use_running_average=True)
  rm, rv = np.asarray(v["batch_stats"]["mean"]), np.asarray(v["batch_stats"]["var"])
  np.testing.assert_allclose(
      np.asarray(ye), (x64 - rm) / np.sqrt(rv + 1e-5) * sc + b, rtol=1e-5, atol=1e-5
  )


def test_batchnorm_cross_device_statistics():
  """SyncBN: with `axis_name`, per-device shards give the statistics of the whole batch."""
  rng = np.random.RandomState(1)
  x = rng.randn(4, 2, 3, 3, 5).astype(np.float32)  # 4 "devices" x per-device batch 2
  v = BatchNorm().init(jax.random.PRNGKey(0), x[0], use_running_average=False)
  sync = BatchNorm(axis_name="d")
  y, upd = jax.vmap(
      lambda xs: sync.apply(v, xs, use_running_average=False, mutable=["batch_stats"]),
      axis_name="d",
  )(x)
  ref_y, ref_upd = BatchNorm().apply(
      v, x.reshape(8, 3, 3, 5), use_running_average=False, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(np.asarray(y).reshape(8, 3, 3, 5), np.asarray(ref_y), atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(
        np.asarray(upd["batch_stats"][k][0]), np.asarray(ref_upd["batch_stats"][k]), rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Naming and conversion
# ----------------------------------------------------------------------------------------------
def centerx_state_dict_spec(
    depth=18, num_classes=80, channels=(256, 128, 64), width=64, neck="dcnv2", head_conv=64
):
  """[(key, torch shape)] of centerX's CenterNet, synthesised from the architecture."""
  spec = []

  def bn(p, c):
    spec.extend(
        [
            (f"{p}.weight", (c,)),
            (f"{p}.bias", (c,)),
            (f"{p}.running_mean", (c,)),
            (f"{p}.running_var", (c,)),
            (f"{p}.num_batches_tracked", ()),
        ]
    )

  spec.append(("backbone.conv1.weight", (width, 3, 7, 7)))
  bn("backbone.bn1", width)
  kind, blocks = BLOCKS_BY_DEPTH[depth]
  exp = 1 if kind == "basic" else 4
  cin = width
  for s, n in enumerate(blocks):
    planes = width * 2**s
    for i in range(n):
      p = f"backbone.layer{s + 1}.{i}"
      if kind == "basic":
        spec.append((f"{p}.conv1.weight", (planes, cin, 3, 3)))
        bn(f"{p}.bn1", planes)
        spec.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
        bn(f"{p}.bn2", planes)
      else:
        spec.append((f"{p}.conv1.weight", (planes, cin, 1, 1)))
        bn(f"{p}.bn1", planes)
        spec.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
        bn(f"{p}.bn2", planes)
        spec.append((f"{p}.conv3.weight", (planes * exp, planes, 1, 1)))
        bn(f"{p}.bn3", planes * exp)
      if i == 0 and (s > 0 or cin != planes * exp):
        spec.append((f"{p}.downsample.0.weight", (planes * exp, cin, 1, 1)))
        bn(f"{p}.downsample.1", planes * exp)
      cin = planes * exp
  for j, c in enumerate(channels):
    p = f"upsample.deconv{j + 1}"
    if neck == "dcnv2":
      spec += [
          (f"{p}.dcn.offset_mask_conv.weight", (27, cin, 3, 3)),
          (f"{p}.dcn.offset_mask_conv.bias", (27,)),
          (f"{p}.dcn.dcnv2.weight", (c, cin, 3, 3)),
          (f"{p}.dcn.dcnv2.bias", (c,)),
      ]
    elif neck == "dcnv1":
      spec += [
          (f"{p}.dcn.offset_conv.weight", (18, cin, 3, 3)),
          (f"{p}.dcn.offset_conv.bias", (18,)),
          (f"{p}.dcn.dcn.weight", (c, cin, 3, 3)),
      ]
    else:
      spec += [(f"{p}.dcn.conv.weight", (c, cin, 3, 3)), (f"{p}.dcn.conv.bias", (c,))]
    bn(f"{p}.dcn_bn", c)
    spec.append((f"{p}.up_sample.weight", (c, c, 4, 4)))
    bn(f"{p}.up_bn", c)
    cin = c
  for name, n in (("cls_head", num_classes), ("wh_head", 2), ("reg_head", 2)):
    spec += [
        (f"head.{name}.feat_conv.weight", (head_conv, cin, 3, 3)),
        (f"head.{name}.feat_conv.bias", (head_conv,)),
        (f"head.{name}.out_conv.weight", (n, head_conv, 1, 1)),
        (f"head.{name}.out_conv.bias", (n,)),
    ]
  return spec


def _zeros_like_abstract(tree):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)


@pytest.mark.parametrize("depth,neck", [(18, "dcnv2"), (34, "dcnv1"), (50, "conv"), (101, "dcnv2")])
def test_parameter_paths_are_official_keys(depth, neck):
  model = M.build_onestage_model(
      depth=depth, use_deform=neck != "conv", modulate_deform=neck == "dcnv2"
  )
  abstract = M.abstract_variables(model)
  exported = wo.export_state_dict(_zeros_like_abstract(abstract))
  spec = [
      (k, s)
      for k, s in centerx_state_dict_spec(depth, neck=neck)
      if not k.endswith("num_batches_tracked")
  ]
  assert sorted(exported) == sorted(k for k, _ in spec)
  for k, s in spec:
    assert exported[k].shape == s, k


def test_parameter_paths_match_oracle_weight_spec():
  from cn2_jax.testing.centerx_oracle_dcn import centerx_oracle_dir

  d = centerx_oracle_dir()
  if d is None or not (d / "centerx_r18_weights_spec.json").is_file():
    pytest.skip("../shared/oracle_centerx not found")
  import json

  with open(d / "centerx_r18_weights_spec.json") as f:
    entries = json.load(f)["entries"]
  assert [(e["key"], tuple(e["shape"])) for e in entries] == [
      (k, tuple(s)) for k, s in centerx_state_dict_spec(18)
  ]


def _random_sd(spec, seed=0):
  rng = np.random.RandomState(seed)
  return {
      k: (
          np.zeros(s, np.int64)
          if k.endswith("num_batches_tracked")
          else rng.randn(*s).astype(np.float32)
      )
      for k, s in spec
  }


def test_convert_round_trip_and_layouts():
  assert tuple(wo._TRANSPOSED) == tuple(N.TRANSPOSED_CONV_NAMES)
  model = M.build_onestage_model(depth=18)
  abstract = M.abstract_variables(model)
  sd = _random_sd(centerx_state_dict_spec())
  variables, report = wo.convert_onestage(sd, abstract)
  assert report.ok and len(report.mapped) == 151 and len(report.dropped) == 26
  p, bs = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(
      p["upsample"]["deconv1"]["up_sample"]["kernel"],
      sd["upsample.deconv1.up_sample.weight"].transpose(2, 3, 0, 1),
  )
  # the backbone is the shared ResNet: torchvision names become detectron2's
  np.testing.assert_array_equal(
      p["backbone"]["stem"]["conv1"]["kernel"], sd["backbone.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
      bs["backbone"]["stem"]["conv1"]["norm"]["var"], sd["backbone.bn1.running_var"]
  )
  np.testing.assert_array_equal(
      p["backbone"]["res3"]["0"]["shortcut"]["norm"]["scale"],
      sd["backbone.layer2.0.downsample.1.weight"],
  )
  np.testing.assert_array_equal(
      p["backbone"]["res5"]["1"]["conv2"]["kernel"],
      sd["backbone.layer4.1.conv2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      bs["backbone"]["res2"]["1"]["conv2"]["norm"]["mean"],
      sd["backbone.layer1.1.bn2.running_mean"],
  )
  np.testing.assert_array_equal(
      bs["upsample"]["deconv2"]["up_bn"]["var"], sd["upsample.deconv2.up_bn.running_var"]
  )
  back = wo.export_state_dict(variables)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])
  cfg = wo.infer_model_config(sd)
  assert cfg == dict(
      depth=18,
      backbone_width=64,
      num_classes=80,
      deconv_channels=(256, 128, 64),
      use_deform=True,
      modulate_deform=True,
      head_conv=64,
  )


def test_convert_is_strict_with_a_report():
  abstract = M.abstract_variables(M.build_onestage_model(depth=18))
  sd = _random_sd(centerx_state_dict_spec())
  del sd["head.wh_head.out_conv.bias"]
  sd["head.extra.weight"] = np.zeros((2, 64, 1, 1), np.float32)
  sd["upsample.deconv3.up_sample.weight"] = np.zeros((64, 32, 4, 4), np.float32)
  with pytest.raises(ConversionError) as ei:
    wo.convert_onestage(sd, abstract)
  r = ei.value.report
  assert r.missing == [
      "params/head.wh_head.out_conv.bias",
      "params/upsample.deconv3.up_sample.kernel",
  ]
  assert r.unexpected == ["head.extra.weight"]
  assert r.misshaped == [("upsample.deconv3.up_sample.weight", (64, 32, 4, 4), (64, 64, 4, 4))]
  text = r.summary()
  assert "MISSING" in text and "UNEXPECTED" in text and "MIS-SHAPED" in text


def _xingyizhou_sd(seed=0):
  """A CenterNet resdcn_18 state dict with CN's names (from CN's architecture, not ours)."""
  spec = []
  for k, s in centerx_state_dict_spec(18):
    if k.startswith("backbone."):
      spec.append((k[len("backbone.") :], s))
  cin = 512
  for j, c in enumerate((256, 128, 64)):
    b = 6 * j
    spec += [
        (f"deconv_layers.{b}.weight", (c, cin, 3, 3)),
        (f"deconv_layers.{b}.bias", (c,)),
        (f"deconv_layers.{b}.conv_offset_mask.weight", (27, cin, 3, 3)),
        (f"deconv_layers.{b}.conv_offset_mask.bias", (27,)),
    ]
    for part in (b + 1, b + 4):
      spec += [
          (f"deconv_layers.{part}.{leaf}", (c,))
          for leaf in ("weight", "bias", "running_mean", "running_var")
      ]
      spec.append((f"deconv_layers.{part}.num_batches_tracked", ()))
    spec.append((f"deconv_layers.{b + 3}.weight", (c, c, 4, 4)))
    cin = c
  for head, n in (("hm", 80), ("wh", 2), ("reg", 2)):
    spec += [
        (f"{head}.0.weight", (64, 64, 3, 3)),
        (f"{head}.0.bias", (64,)),
        (f"{head}.2.weight", (n, 64, 1, 1)),
        (f"{head}.2.bias", (n,)),
    ]
  return _random_sd(spec, seed)


def test_xingyizhou_resdcn_and_torchvision_formats(tmp_path):
  cn = _xingyizhou_sd()
  assert wo.detect_format(cn) == "xingyizhou"
  renamed = wo.to_centerx_names(cn, "xingyizhou")
  assert sorted(renamed) == sorted(k for k, _ in centerx_state_dict_spec(18))
  np.testing.assert_array_equal(
      renamed["upsample.deconv2.up_sample.weight"], cn["deconv_layers.9.weight"]
  )
  np.testing.assert_array_equal(renamed["head.cls_head.out_conv.bias"], cn["hm.2.bias"])
  abstract = M.abstract_variables(M.build_onestage_model(depth=18))
  _, report = wo.load_onestage_weights(cn, abstract)
  assert report.ok and any("BGR" in n for n in report.notes)
  with pytest.raises(ConversionError, match="TODO"):  # msra_resnet (no DCN) is not supported
    wo.to_centerx_names(
        {
            "deconv_layers.0.weight": np.zeros((256, 512, 4, 4)),
            "hm.0.weight": np.zeros((64, 64, 3, 3)),
        },
        "xingyizhou",
    )
  # torchvision ImageNet ResNet: backbone only, the rest keeps its values
  tv = {
      k[len("backbone.") :]: v
      for k, v in _random_sd(centerx_state_dict_spec(18)).items()
      if k.startswith("backbone.")
  }
  tv["fc.weight"], tv["fc.bias"] = np.zeros((1000, 512), np.float32), np.zeros(1000, np.float32)
  assert wo.detect_format(tv) == "torchvision"
  variables, report = wo.load_onestage_weights(tv, _zeros_like_abstract(abstract))
  assert report.ok and report.backbone_only and len(report.left_at_init) > 0
  np.testing.assert_array_equal(
      variables["params"]["backbone"]["res2"]["0"]["conv1"]["norm"]["scale"],
      tv["layer1.0.bn1.weight"],
  )
  # a file: a plain pickle of numpy arrays under 'model' (what load_checkpoint_file reads)
  path = tmp_path / "w.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": _random_sd(centerx_state_dict_spec(18))}, f)
  _, report = wo.load_onestage_weights(path, abstract)
  assert report.ok and report.source_format == "centerx"
  # xingyizhou/CenterNet files keep the weights under 'state_dict' (the reader unwraps it)
  with open(path, "wb") as f:
    pickle.dump({"epoch": 140, "state_dict": cn}, f)
  _, report = wo.load_onestage_weights(path, abstract)
  assert report.ok and report.source_format == "xingyizhou"


# ----------------------------------------------------------------------------------------------
# The backbone: the shared ResNet with centerX's (torchvision) settings
# ----------------------------------------------------------------------------------------------
def test_backbone_is_the_shared_resnet_in_torchvision_style():
  """A fresh R50 backbone (width 16): torch's default conv init U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (std bound / sqrt(3); detectron2's c2_msra_fill would be normal with std sqrt(2 / fan_out)),
  identity BatchNorm (scale 1, bias 0, running mean 0, var 1), the stride on the 3x3 conv
  (torchvision), and C5 only: no parameters beyond res5."""
  model = M.build_onestage_model(depth=50, backbone_width=16, deconv_channels=(16, 8, 8))
  variables = jax.tree_util.tree_map(np.asarray, M.init_variables(model))
  params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  assert set(params) == {"stem", "res2", "res3", "res4", "res5"}
  assert params["res5"]["0"]["conv3"]["kernel"].shape == (1, 1, 128, 512)  # C5: 32 * width
  kernels = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if jax.tree_util.keystr(path).endswith("['kernel']")
  }
  assert len(kernels) == 53  # stem + 16 blocks x 3 convs + 4 shortcuts
  for name, kernel in kernels.items():
    bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    assert np.abs(kernel).max() <= bound, name
    if kernel.size >= 4096:
      np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05, err_msg=name)
  norms = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if "'norm'" in jax.tree_util.keystr(path)]  # fmt: skip
  assert len(norms) == 2 * 53 and len(jax.tree_util.tree_leaves(stats)) == 2 * 53
  np.testing.assert_array_equal(params["res3"]["0"]["conv2"]["norm"]["scale"], 1)
  np.testing.assert_array_equal(stats["res3"]["0"]["conv2"]["norm"]["var"], 1)
  # torchvision: the stride of res3's first block on conv2 (3x3), not on conv1 (1x1)
  c3 = jax.eval_shape(
      lambda v: model.apply(
          v,
          jnp.zeros((1, 64, 64, 3)),
          capture_intermediates=True,
          mutable=["intermediates"],
          method="maps",
      ),
      variables,
  )[1]["intermediates"]["backbone"]["res3"]["0"]
  assert c3["conv1"]["__call__"][0].shape[1:3] == (16, 16)
  assert c3["conv2"]["__call__"][0].shape[1:3] == (8, 8)


def test_resnet_batchnorm_settings_are_checked():
  """Trainable BatchNorm needs its settings and no frozen stages; it takes a canvas mask."""
  settings = dict(
      depth=18,
      width=8,
      norm="BN",
      conv_init="torch",
      freeze_at=0,
      out_features=("res5",),
      dtype=jnp.float32,
      num_groups=1,
      width_per_group=0,
      deform_on_per_stage=(False,) * 4,
      deform_modulated=False,
      deform_num_groups=1,
      stride_in_1x1=False,
      batch_norm=BatchNormSettings(0.9, 1e-5),
  )
  x = jnp.zeros((1, 64, 64, 3))
  init = lambda **kw: jax.eval_shape(  # noqa: E731
      lambda: ResNet(**dict(settings, **kw)).init(jax.random.PRNGKey(0), x)
  )
  assert set(init()) == {"params", "batch_stats"}
  with pytest.raises(ValueError, match="BatchNormSettings"):
    init(batch_norm=None)
  with pytest.raises(ValueError, match="freeze_at"):
    init(freeze_at=2)
  with pytest.raises(ValueError, match="conv_init"):
    init(conv_init="xavier")
  # a canvas mask restricts the BatchNorm statistics (tests/test_onestage_canvas.py)
  canvas = jax.eval_shape(
      lambda: ResNet(**settings).init(jax.random.PRNGKey(0), x, jnp.array([64, 64]))
  )
  assert set(canvas) == {"params", "batch_stats"}


# ----------------------------------------------------------------------------------------------
# A tiny model end to end
# ----------------------------------------------------------------------------------------------
def _tiny(**kw):
  cfg = dict(
      num_classes=3, backbone_width=8, deconv_channels=(16, 8, 8), max_detections=10, tensor_dim=6
  )
  cfg.update(kw)
  return M.build_onestage_model(cfg)


def _batch():
  rng = np.random.RandomState(0)
  b = M.dummy_batch(2, (64, 96), max_boxes=5)
  b["image"] = rng.randint(0, 255, b["image"].shape).astype(np.uint8)
  b["image_hw"] = np.array([[64, 96], [50, 70]], np.int32)
  b["gt_boxes"][0, :2] = [[4, 6, 40, 30], [50, 10, 90, 60]]
  b["gt_boxes"][1, :1] = [[10, 10, 60, 45]]
  b["gt_classes"][0, :2] = [1, 2]
  b["gt_valid"][0, :2] = True
  b["gt_valid"][1, :1] = True
  return b


def test_tiny_model_eval_train_and_bn_state():
  model = _tiny()
  variables = M.init_variables(model)
  assert set(variables) == {"params", "batch_stats"}
  batch = _batch()
  dets = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
  assert set(dets) == {"boxes", "scores", "classes", "valid"}
  assert dets["boxes"].shape == (2, 10, 4) and dets["classes"].dtype == jnp.int32
  boxes = np.asarray(dets["boxes"])
  assert (boxes[..., 2] >= boxes[..., 0]).all()  # clamp_wh=True by default
  from cn2_jax.modeling.detector import postprocess_detections

  post = postprocess_detections(dets, batch["image_hw"], np.array([[128, 192], [100, 140]]))
  assert post["boxes"].shape == (2, 10, 4)

  def loss_fn(params, bn_train):
    losses, upd = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        batch,
        train=True,
        bn_train=bn_train,
        mutable=["batch_stats"],
    )
    return sum(v for k, v in losses.items() if k.startswith("loss_")), (losses, upd)

  (total, (losses, upd)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1
  )(variables["params"], True)
  assert set(losses) == {"loss_cls", "loss_box_wh", "loss_off_reg", "aux/num_pos"}
  assert float(losses["aux/num_pos"]) == 3.0 and np.isfinite(float(total))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  stem_bn = lambda stats: np.asarray(stats["backbone"]["stem"]["conv1"]["norm"]["mean"])  # noqa: E731
  before = stem_bn(variables["batch_stats"])
  assert not np.allclose(stem_bn(upd["batch_stats"]), before)
  (_, (_, upd_eval)), _ = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)(
      variables["params"], False
  )
  np.testing.assert_array_equal(stem_bn(upd_eval["batch_stats"]), before)
  # the cls prior
  np.testing.assert_allclose(
      np.asarray(variables["params"]["head"]["cls_head"]["out_conv"]["bias"]), -2.19
  )


def test_loss_options_reach_the_model():
  """`ignore_unlabel` and `communism` from the schema change the model's training losses as
  `losses.py` defines them (that module has the numpy references)."""
  from cn2_jax.modeling.onestage import losses as loss_lib

  batch = _batch()
  plain = _tiny()
  variables = M.init_variables(plain)

  def run(model):
    fn = lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])[0]  # noqa: E731
    return {k: float(v) for k, v in jax.jit(fn)(variables, batch).items()}

  base = run(plain)
  # class 0 has no GT in either image: its negatives are dropped, so the heatmap loss falls
  ign = run(_tiny(ignore_unlabel=True))
  assert ign["loss_cls"] < base["loss_cls"]
  assert ign["loss_box_wh"] == base["loss_box_wh"] and ign["aux/num_pos"] == base["aux/num_pos"]
  com = run(_tiny(communism=True, communism_targets=(1.2, 0.4, 0.1)))
  for name, target in (("loss_cls", 1.2), ("loss_box_wh", 0.4), ("loss_off_reg", 0.1)):
    np.testing.assert_allclose(com[name], target, rtol=1e-5)
    np.testing.assert_allclose(com[f"aux/raw_{name}"], base[name], rtol=1e-5)
  assert loss_lib.communism_kind("loss_off_reg") == "off"


def test_build_rejects_unknown_options():
  with pytest.raises(ValueError, match="unknown one-stage model option"):
    M.build_onestage_model({"num_clases": 3})
