"""ptx/tma.cuh + fastmoe_ops/runtime/tensor_map.py on the simulator, against the numpy model of
the ISA's TMA shared-memory image (tests/ptx_cases/tma.py: smem_image, the swizzle table of the
PTX ISA's "Tensor Memory Access" section): 2D/3D loads with every swizzle, boxes hanging past
each edge of the tensor (zero fill, negative coordinates too), stores and f32 reduce-adds that
write only the in-bounds part, the asynchrony (shared memory read before the barrier wait is
poison), a producer/consumer ring on full/empty mbarriers, and the encoder's validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmoe_ops.errors import InputError
from fastmoe_ops.runtime.tensor_map import descriptor, encode_tiled
from ptx_cases.case import assert_equal_bits, poisoned
from ptx_cases.runners import SimRunner
from ptx_cases.tma import RING_COLS, RING_ROWS, SOURCE, RingParams, load_case, random_tensor, smem_image, store_case


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


def test_swizzle_model_128b_is_the_gemm_layout():
    """The model's 128-byte swizzle of 8 rows x 128 bytes = row * 128 + (chunk ^ row % 8) * 16
    (the layout wgmma's B128 descriptors read: tests/test_ptx_wgmma.py)."""
    g = np.arange(8 * 128, dtype=np.uint8).reshape(8, 128)
    img = smem_image(g, (0, 0), (128, 8), 128)
    for r in range(8):
        for c in range(128):
            assert img[r * 128 + ((c // 16) ^ (r % 8)) * 16 + c % 16] == g[r, c]


@pytest.mark.parametrize("swizzle,dtype,cols", [(0, torch.float32, 24), (32, torch.bfloat16, 16),
                                                (64, torch.float32, 16), (128, torch.uint8, 128),
                                                (128, torch.float32, 32)])
@pytest.mark.parametrize("coords", [(0, 0), (8, 5), (-4, -3), (40, 37)])
def test_tma_load_2d(runner, swizzle, dtype, cols, coords):
    t = random_tensor((45, 50 if dtype != torch.uint8 else 176), torch.float32, 7 + swizzle).to(dtype) \
        if dtype != torch.uint8 else torch.from_numpy(np.random.default_rng(3).integers(1, 255, (45, 176),
                                                                                       dtype=np.uint8))
    if t.shape[1] * t.element_size() % 16:
        t = t[:, :48].contiguous()
    box = (cols, 16)
    desc = encode_tiled(t, box, swizzle=swizzle, engine="sim")
    case = load_case(t, box, coords, swizzle, desc)
    case.check(runner.run(case))


def test_tma_load_3d_strided(runner):
    """A 3D box of a non-contiguous view (padded row stride): dims/strides innermost first."""
    base = random_tensor((3, 20, 40), torch.float32, 11)
    t = base[:, :, :32]  # row stride 40 floats = 160 bytes
    box = (32, 8, 2)
    desc = encode_tiled(t, box, swizzle=128, engine="sim")
    want = smem_image(t.contiguous().view(torch.int32).numpy(), (0, 15, 2), box, 128)
    case = load_case(t.contiguous(), box, (0, 15, 2), 128, desc)  # model from a contiguous copy
    case.args[1] = base  # the memory the map names (memcheck bounds the kernel's reads by it)
    out = runner.run(case)[0]
    assert_equal_bits(out, want, "3D strided TMA load")


def test_tma_load_read_before_wait_is_poison(runner):
    """Shared memory read before waiting on the barrier: the load has not landed (poison),
    where reading after the wait gives the data (the same kernel, mode 0)."""
    t = random_tensor((16, 32), torch.float32, 5)
    desc = encode_tiled(t, (32, 8), swizzle=128, engine="sim")
    case = load_case(t, (32, 8), (0, 0), 128, desc, mode=1)
    out = runner.run(case)[0]
    assert (out == 0xFF).all(), "TMA bytes visible before the barrier wait"


@pytest.mark.parametrize("delta,message", [(16, "deadlock: all threads of the CTA wait on mbarriers and nothing changes; .* 16 transaction bytes outstanding"),
                                           (-16, "more transaction bytes completed than expect_tx announced")])
def test_tma_expect_tx_mismatch_fails(runner, delta, message):
    t = random_tensor((16, 32), torch.float32, 6)
    desc = encode_tiled(t, (32, 8), swizzle=0, engine="sim")
    case = load_case(t, (32, 8), (0, 0), 0, desc, expect_delta=delta)
    with pytest.raises(Exception, match=message):
        runner.run(case)


def test_tma_foreign_map_fails(runner):
    t = random_tensor((16, 32), torch.float32, 6)
    case = load_case(t, (32, 8), (0, 0), 0, bytes(128))
    with pytest.raises(Exception, match="not one the simulator's encoder made"):
        runner.run(case)


@pytest.mark.parametrize("reduce", [0, 1])
@pytest.mark.parametrize("coords", [(0, 0), (-8, 30)])
def test_tma_store_and_reduce(runner, reduce, coords):
    """The box image goes back to global un-swizzled; elements outside the tensor are dropped;
    reduce adds (f32, exact on integers). The map is encoded by the runner (as on the GPU)."""
    case = store_case(21, reduce, coords)
    case.check(runner.run(case))


def test_tma_store_without_wait_is_lost(runner):
    """The emulation performs a store at the wait that retires its group: none, nothing written."""
    case = store_case(23, 0, (0, 0))
    case.args[-1] = np.int32(1)  # mode 1: no tma_store_wait
    before = case.args[1].copy()
    got = runner.run(case)[0]
    assert np.array_equal(got, before)


def _ring(runner, tiles, consumers, skip_empty_wait=0):
    t = random_tensor((tiles * RING_ROWS, RING_COLS), torch.float32, 40 + tiles)
    out = torch.from_numpy(poisoned((32 * consumers,), np.float32))
    p = RingParams()
    p.desc = descriptor(encode_tiled(t, (RING_COLS, RING_ROWS), swizzle=128, engine="sim"))
    p.out = out.data_ptr()
    p.tiles = tiles
    p.skip_empty_wait = skip_empty_wait
    fn = runner.module.get_function("tma_ring")
    fn((1, 1, 1), (32 * (consumers + 1), 1, 1), (p,), shared_mem=3 * 1024,
       extra_ranges=[(t.data_ptr(), t.nbytes), (out.data_ptr(), out.nbytes)])  # memcheck: what Params point to
    flat = t.numpy().reshape(tiles, -1).astype(np.float64)
    want = np.array([flat[:, i::32 * consumers].sum() for i in range(32 * consumers)])
    return out.numpy(), want


@pytest.mark.parametrize("tiles,consumers", [(7, 2), (12, 1)])
def test_tma_ring_producer_consumer(runner, tiles, consumers):
    """One producer lane, STAGES = 3 slots, full/empty barriers, 1-2 consumer warps: every
    tile summed once (exact: integer values), more tiles than stages so the phases wrap."""
    got, want = _ring(runner, tiles, consumers)
    assert_equal_bits(got, want.astype(np.float32), f"ring sums ({tiles} tiles, {consumers} consumer warps)")


def test_tma_ring_without_empty_wait_fails(runner):
    """The producer refilling slots without waiting on the empty barriers: the consumers see
    poison / wrong tiles, or a waiter finds its phase overtaken; either way the test notices."""
    try:
        got, want = _ring(runner, 9, 2, skip_empty_wait=1)
    except Exception as e:
        assert "more arrivals than its count" in str(e) or "phases away" in str(e), str(e)
        return
    assert not np.array_equal(got, want.astype(np.float32))


def test_ring_params_layout():
    """RingParams mirrors the C++ struct: TmaDescriptor is alignas(64), so size 192."""
    import ctypes
    assert ctypes.sizeof(RingParams) == 192 and RingParams.desc.offset == 0


def test_params_with_descriptors_match_cpp_layout():
    """A Params mirror built with aligned_fields: descriptors after a scalar land at 64 and 192,
    the size rounds to 256, and the C++ struct's static_asserts (layout_asserts: every offset and
    the size) compile in the simulator's host compiler; the kernel reads each field back."""
    import ctypes

    from fastmoe_ops.runtime.spec import Params
    from fastmoe_ops.runtime.tensor_map import TMA_DESCRIPTOR, aligned_fields

    class TwoMaps(Params):
        cpp_name = "TwoMaps"
        _fields_ = aligned_fields([("n", ctypes.c_int32), ("a", TMA_DESCRIPTOR), ("out", ctypes.c_void_p),
                                   ("b", TMA_DESCRIPTOR), ("m", ctypes.c_int32)])

    assert (TwoMaps.a.offset, TwoMaps.b.offset, ctypes.sizeof(TwoMaps)) == (64, 256, 448)
    src = ("#include <cstddef>\nstruct TwoMaps { int n; TmaDescriptor a; void* out; TmaDescriptor b; int m; };\n"
           + TwoMaps.layout_asserts() + """
extern "C" __global__ void two_maps(const __grid_constant__ TwoMaps p) {
  if (threadIdx.x == 0) {
    unsigned long long* o = static_cast<unsigned long long*>(p.out);
    o[0] = p.n; o[1] = p.a.opaque[3]; o[2] = p.b.opaque[15]; o[3] = p.m;
  }
}""")
    r = SimRunner(src)
    p = TwoMaps()
    out = torch.from_numpy(poisoned((4,), np.uint64))
    p.n, p.m, p.out = 5, -2, out.data_ptr()
    p.a[3], p.b[15] = 0x1234, 0x9876543210
    r.module.get_function("two_maps")((1, 1, 1), (32, 1, 1), (p,), extra_ranges=[(out.data_ptr(), out.nbytes)])
    assert out.numpy().tolist() == [5, 0x1234, 0x9876543210, 2 ** 64 - 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(box=(32, 300)), "box: dimension 1 must be in 1..256"),
    (dict(box=(3, 8)), "multiple of 16 bytes"),
    (dict(box=(16, 8), swizzle=128), "with the 128B swizzle the innermost box row must be 128"),
    (dict(box=(32, 8), swizzle=48), "swizzle: expected one of"),
    (dict(box=(32,)), "box: expected 2 ints"),
])
def test_encoder_validation(kwargs, message):
    t = torch.ones(16, 32)
    with pytest.raises(InputError, match=message):
        encode_tiled(t, engine="sim", **kwargs)


def test_encoder_validation_strides_and_address():
    with pytest.raises(InputError, match="stride of dimension 1 .* multiple of 16"):
        encode_tiled(torch.ones(16, 33)[:, :32], (32, 8), engine="sim")
    with pytest.raises(InputError, match="address must be 16-byte aligned"):
        encode_tiled(torch.ones(16 * 32 + 1)[1:].view(16, 32), (32, 8), engine="sim")
    with pytest.raises(InputError, match="innermost dimension must be contiguous"):
        encode_tiled(torch.ones(32, 16).t(), (16, 8), engine="sim")
