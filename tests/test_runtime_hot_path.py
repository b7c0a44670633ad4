"""The warm-call shortcuts keep every check: env reads follow os.environ however it is
changed, and the FP8 quantiser's per-shape plan cache never lets an input past validation
that the uncached path would refuse."""
from __future__ import annotations

import os

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import env
from fastmoe_ops.errors import InputError
from fastmoe_ops.ops import fp8_quant
from fastmoe_ops.reference import fp8 as reference
from fastmoe_ops.runtime import launch

from conftest import assert_bitwise_equal


def test_env_raw_follows_every_change(monkeypatch):
    monkeypatch.delenv("FMO_SIM_TIMEOUT", raising=False)
    assert env.raw("FMO_SIM_TIMEOUT") == "120"  # the default
    monkeypatch.setenv("FMO_SIM_TIMEOUT", "7")
    assert env.raw("FMO_SIM_TIMEOUT") == "7"
    os.environ["FMO_SIM_TIMEOUT"] = "8.5"
    assert env.number("FMO_SIM_TIMEOUT") == 8.5
    os.environ["FMO_DEBUG_DUMP"] = "/tmp/dümp"  # non-ASCII round-trips as os.environ does
    try:
        assert env.raw("FMO_DEBUG_DUMP") == os.environ["FMO_DEBUG_DUMP"] == "/tmp/dümp"
    finally:
        del os.environ["FMO_DEBUG_DUMP"]
    assert env.raw("FMO_DEBUG_DUMP") == ""
    with pytest.raises(KeyError):
        env.raw("FMO_NOT_DECLARED")  # only declared variables are read


def test_env_raw_with_os_environ_replaced(monkeypatch):
    # mock.patch("os.environ", {...}) swaps the object: the fast path must not read the old one
    monkeypatch.setenv("FMO_SIM_WORKERS", "3")
    monkeypatch.setattr(os, "environ", {"FMO_SIM_WORKERS": "5"})
    assert env.raw("FMO_SIM_WORKERS") == "5"
    assert env.raw("FMO_SIM_TIMEOUT") == "120"


@pytest.mark.parametrize("value, want", [("1", True), (" On ", True), ("YES", True), ("true", True),
                                         ("0", False), ("", False), ("off", False), ("2", False)])
def test_flag_parsing_including_cached_spellings(monkeypatch, value, want):
    monkeypatch.setenv("FMO_SYNC_CHECK", value)
    assert env.flag("FMO_SYNC_CHECK") is want
    assert env.flag("FMO_SYNC_CHECK") is want  # second read: from the parsed-value cache


@pytest.mark.parametrize("bad, arg", [
    (dict(group_size=128.0), "group_size"),   # hashes equal to 128: must not hit 128's entry
    (dict(pow2_scale=1), "pow2_scale"),       # equal to True: same
    (dict(eps=float("nan")), "eps"),
    (dict(eps=1), "eps"),                     # an int eps equals 1.0
])
def test_shape_plan_cache_keeps_validation(bad, arg):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    good = dict(group_size=128, pow2_scale=True, eps=1.0)
    with fmo.use_backend("reference"):
        fp8_quant.quantize_per_token_group(x, **good)  # warm the cache for this shape
        with pytest.raises(InputError, match=arg):
            fp8_quant.quantize_per_token_group(x, **{**good, **bad})


def test_shape_plan_distinguishes_strides_and_alignment():
    seed = 3
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 264, generator=g).to(torch.bfloat16)
    dense = base[:, :256].contiguous()
    padded = base[:, :256]                      # same shape, row stride 264
    shifted = base.reshape(-1)[1:1 + 16 * 256].view(16, 256)  # 2-byte offset: not 16-byte aligned
    overlapping = base.reshape(-1)[:16 * 256 - 128].as_strided((16, 256), (128, 1))
    with fmo.use_backend("reference" if "sim" not in fmo.available_backends() else "sim"):
        for x in (dense, padded, shifted, dense):
            xq, xs = fp8_quant.quantize_per_token_group(x)
            rq, rs = reference.quantize_per_token_group(x, 128)
            assert_bitwise_equal(xs, rs, f"scales, strides {x.stride()}", seed)
            assert_bitwise_equal(xq, rq, f"values, strides {x.stride()}", seed)
        with pytest.raises(InputError, match="non-overlapping rows"):
            fp8_quant.quantize_per_token_group(overlapping)
    assert fp8_quant.choose_spec(dense, 128, False).vec_width == 8
    assert fp8_quant.choose_spec(padded, 128, False).vec_width == 8
    assert fp8_quant.choose_spec(shifted, 128, False).vec_width == 1


def test_lookup_is_what_launch_uses(monkeypatch):
    if "sim" not in fmo.available_backends():
        pytest.skip("simulator not built")
    spec = fp8_quant.Fp8GroupQuantSpec(dtype="fp32", group_size=128, vec_width=4, pow2_scale=False)
    monkeypatch.delenv("FMO_TRACE", raising=False)
    plain = launch.lookup(spec, "sim", torch.device("cpu"))
    assert launch.lookup(spec, "sim", torch.device("cpu")) is plain and plain.num_params == 1
    monkeypatch.setenv("FMO_TRACE", "1")
    traced = launch.lookup(spec, "sim", torch.device("cpu"))
    assert traced is not plain and traced.num_params == 2  # Params + the trace arguments
    with pytest.raises(InputError, match="engine"):
        launch.lookup(spec, "reference", torch.device("cpu"))
