"""Writes the genuine-torch fixtures used by tests/test_convert.py (a few KB each).

Run once with any torch (the fixtures in this folder were written by torch 2.13.0+cpu):
  python tests/data/make_torch_fixtures.py
The expected values are closed-form (arange-based) and are re-derived by the test without torch.
"""

import collections
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def tensors():
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3.0
  sd = collections.OrderedDict()
  sd["conv.weight"] = torch.arange(54, dtype=torch.float32).reshape(2, 3, 3, 3) / 7.0
  sd["base"] = base
  sd["view"] = base[1:3, 2:5]  # storage offset, shares storage with base
  sd["transposed"] = base.t()  # non-contiguous strides
  sd["expanded"] = torch.arange(3, dtype=torch.float32).expand(2, 3)  # stride 0
  sd["half"] = (torch.arange(10, dtype=torch.float32) / 4).half()
  sd["bf16"] = (torch.arange(8, dtype=torch.float32) * 0.25).bfloat16()
  sd["double"] = torch.arange(4, dtype=torch.float64) / 3
  sd["long"] = torch.arange(5, dtype=torch.int64) - 2
  sd["scalar"] = torch.tensor(3.5)
  sd["empty"] = torch.zeros(0, 3)
  return sd


def main():
  sd = tensors()
  torch.save(
      {"model": sd, "iteration": 7, "__author__": "fixture"}, os.path.join(HERE, "torch_zip.pth")
  )
  torch.save(
      {"model": sd, "iteration": 7},
      os.path.join(HERE, "torch_legacy.pth"),
      _use_new_zipfile_serialization=False,
  )
  # A module state dict (carries _metadata versions) saved with parameters (keep_vars).
  m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
  with torch.no_grad():
    m[0].weight.copy_(torch.arange(12, dtype=torch.float32).reshape(4, 3, 1, 1))
    m[1].weight.fill_(2.0)
    m[1].bias.fill_(-1.0)
    m[1].running_mean.fill_(0.5)
    m[1].running_var.fill_(4.0)
  torch.save(m.state_dict(keep_vars=True), os.path.join(HERE, "torch_module.pth"))


if __name__ == "__main__":
  main()
