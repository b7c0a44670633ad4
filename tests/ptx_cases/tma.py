"""The kernels and cases of ptx/tma.cuh and ptx/mbarrier.cuh's tests (tests/test_ptx_tma.py,
tests/test_ptx_mbarrier.py say what they check), with a numpy model of the TMA shared-memory
image written from the PTX ISA ("Tensor Memory Access", tensor-copy swizzling modes)."""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from .case import Case, assert_equal_bits, poisoned

SOURCE_TMA = r"""
extern __shared__ __align__(1024) unsigned char smem[];

// One box: thread 0 arms the barrier (expect = box bytes + delta) and issues the load; every
// thread waits (mode 1: copies shared memory out BEFORE waiting) and copies the raw shared
// image to out (x = innermost coordinate). 3D when z >= 0.
// `global`: the tensor the map names (an argument so memcheck bounds it, and the runners
// encode the map for their engine's copy of it).
extern "C" __global__ void tma_load_box(const __grid_constant__ TmaDescriptor desc, const void* global,
                                        unsigned char* out, int x, int y,
                                        int z, unsigned box_bytes, int expect_delta, int mode) {
  __shared__ uint64_t bar;
  unsigned char* dst = smem;
  if (threadIdx.x == 0) {
    mbarrier_init(&bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(&desc);
    mbarrier_arrive_expect_tx(&bar, box_bytes + expect_delta);
    if (z >= 0) tma_load_3d(dst, &desc, &bar, x, y, z); else tma_load_2d(dst, &desc, &bar, x, y);
  }
  if (mode == 1) {
    __syncthreads();
    for (unsigned i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = dst[i];
    return;
  }
  mbarrier_wait_parity(&bar, 0);
  for (unsigned i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = dst[i];
}

// The raw shared image `img` (box bytes) is written to shared memory by every thread, then
// thread 0 stores (reduce = 0) or adds (reduce = 1) it at (x, y) and waits; mode 1: no wait.
extern "C" __global__ void tma_store_box(const __grid_constant__ TmaDescriptor desc, void* global,
                                         const unsigned char* img, int x,
                                         int y, unsigned box_bytes, int reduce, int mode) {
  for (unsigned i = threadIdx.x; i < box_bytes; i += blockDim.x) smem[i] = img[i];
  fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    if (reduce) tma_reduce_add_2d(&desc, smem, x, y); else tma_store_2d(&desc, smem, x, y);
    tma_store_commit();
    if (mode == 0) tma_store_wait<0>();
  }
}

// Producer/consumer ring: warp 0's elected lane TMA-loads `tiles` boxes of 8 rows x 32 f32
// (128-byte swizzle) into STAGES slots guarded by full (1 arrival + tx bytes) and empty
// (one arrival per consumer warp) barriers; consumer warps 1..NC sum, per thread, elements
// i, i + 32 NC, ... of every tile (reading through the swizzle) into out[i].
struct RingParams {
  TmaDescriptor desc;
  float* out;
  int tiles;
  int skip_empty_wait;  // 1: the producer overwrites slots without waiting (must fail)
};
constexpr int kStages = 3, kRows = 8, kCols = 32, kTileBytes = kRows * kCols * 4;
extern "C" __global__ void tma_ring(const __grid_constant__ RingParams p) {
  __shared__ uint64_t full[kStages], empty[kStages];
  const int nc = blockDim.x / 32 - 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], nc);
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  fmo::PipelineState ps;
  if (threadIdx.x < 32) {
    if (elect_one_sync()) {
      for (int t = 0; t < p.tiles; ++t, ps.advance(kStages)) {
        if (!p.skip_empty_wait) mbarrier_wait_parity(&empty[ps.stage], ps.phase ^ 1);
        mbarrier_arrive_expect_tx(&full[ps.stage], kTileBytes);
        tma_load_2d(smem + ps.stage * kTileBytes, &p.desc, &full[ps.stage], 0, t * kRows);
      }
    }
    return;
  }
  const int i = threadIdx.x - 32;
  float acc = 0.f;
  for (int t = 0; t < p.tiles; ++t, ps.advance(kStages)) {
    mbarrier_wait_parity(&full[ps.stage], ps.phase);
    const unsigned char* tile = smem + ps.stage * kTileBytes;
    for (int e = i; e < kRows * kCols; e += 32 * nc) {
      const unsigned off = (e / kCols) * 128 + (e % kCols) * 4;
      float v;
      memcpy(&v, tile + (off ^ (((off >> 7) & 7) << 4)), 4);
      acc += v;
    }
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty[ps.stage]);
  }
  p.out[i] = acc;
}

// mbarrier misuse, one per mode (simulator: each must fail with its message).
//  0: all 32 lanes arrive on a count-1 barrier, then lane 0 waits on parity 0 (phases 0..31
//     completed: two phases away); 1: wait on a barrier never initialised; 2: every thread
//     waits on a barrier whose arrivals never come (deadlock); 3: a 2-phase handshake done
//     right (count 32, each lane arrives and waits twice): must pass.
extern "C" __global__ void mbar_misuse(int mode, int* out) {
  __shared__ uint64_t bar;
  if (mode != 1 && threadIdx.x == 0) mbarrier_init(&bar, mode == 0 ? 1 : 32);
  if (mode == 1 && threadIdx.x == 0) bar = 0;
  __syncthreads();
  if (mode == 0) {
    mbarrier_arrive(&bar);
    if (threadIdx.x == 0) mbarrier_wait_parity(&bar, 0);
  } else if (mode == 1) {
    mbarrier_wait_parity(&bar, 0);
  } else if (mode == 2) {
    mbarrier_wait_parity(&bar, 0);
  } else {
    for (uint32_t ph = 0; ph < 2; ++ph) {
      mbarrier_arrive(&bar);
      mbarrier_wait_parity(&bar, ph);
    }
    bool fresh_done = mbarrier_try_wait_parity(&bar, 1);  // phase 1 completed
    out[threadIdx.x] = fresh_done ? 7 : -1;
  }
}
"""


class RingParams(ctypes.Structure):
    """Mirror of the ring kernel's RingParams (TmaDescriptor is alignas(64): size 192)."""

    _fields_ = [("desc", ctypes.c_uint64 * 16), ("out", ctypes.c_void_p), ("tiles", ctypes.c_int32),
                ("skip_empty_wait", ctypes.c_int32), ("_pad", ctypes.c_uint8 * 48)]


RING_ROWS, RING_COLS = 8, 32


def smem_image(g: np.ndarray, coords, box, swizzle: int) -> np.ndarray:
    """The bytes a tiled TMA load of box `box` at `coords` (both innermost first) leaves in
    shared memory: the box in row-major order (innermost fastest), elements outside `g` zero,
    then the ISA's swizzle: in each 128-byte line, 16-byte chunk c moves to c XOR (line mod
    span/16) for a span of 32, 64 or 128 bytes (PTX ISA, "Tensor Memory Access": swizzling
    modes; the pattern repeats every 256, 512, 1024 bytes)."""
    rank = g.ndim
    c = list(reversed(coords))
    b = list(reversed(box))
    out = np.zeros(b, g.dtype)
    idx = np.indices(b).reshape(rank, -1).T
    for k in idx:
        pos = [c[d] + k[d] for d in range(rank)]
        if all(0 <= pos[d] < g.shape[d] for d in range(rank)):
            out[tuple(k)] = g[tuple(pos)]
    raw = out.reshape(-1).view(np.uint8)
    if swizzle == 0:
        return raw.copy()
    chunks = raw.reshape(-1, 16)
    res = np.empty_like(chunks)
    for i in range(chunks.shape[0]):
        line, chunk = i // 8, i % 8
        res[line * 8 + (chunk ^ (line % (swizzle // 16)))] = chunks[i]
    return res.reshape(-1)


def random_tensor(shape, dtype, seed: int) -> torch.Tensor:
    """Fresh random non-zero values: small integers (exact in every dtype and in sums)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(1, 60, size=shape) * rng.choice([-1, 1], size=shape)
    return torch.from_numpy(v.astype(np.float32)).to(dtype)


_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def load_case(tensor: torch.Tensor, box, coords, swizzle: int, desc: bytes, *, mode: int = 0,
              expect_delta: int = 0) -> Case:
    box_bytes = int(np.prod(box)) * tensor.element_size()
    want = smem_image(tensor.view(_RAW[tensor.element_size()]).numpy(), coords, box, swizzle)
    x, y = coords[0], coords[1]
    z = coords[2] if len(coords) > 2 else -1

    def check(outs):
        assert_equal_bits(outs[0], want, f"TMA load box {box} at {coords}, swizzle {swizzle}")

    from fastmoe_ops.runtime.tensor_map import descriptor
    # desc None: the runner encodes the map for its engine's copy of `tensor` (argument 1)
    extra = {} if desc is not None else {"tma": [(0, 1, tuple(box), swizzle)]}
    garg = tensor if desc is not None else tensor.view(_RAW[tensor.element_size()]).numpy()  # the bits
    return Case(f"tma_load_{swizzle}_{box}_{coords}", "tma_load_box", (1, 1, 1), (64, 1, 1),
                [descriptor(desc) if desc is not None else None, garg, poisoned((box_bytes,), np.uint8),
                 np.int32(x), np.int32(y), np.int32(z), np.uint32(box_bytes), np.int32(expect_delta),
                 np.int32(mode)],
                [2], check, shared_mem=box_bytes, sim_only=mode != 0 or expect_delta != 0, extra=extra)


def store_case(seed: int, reduce: int, coords) -> Case:
    """Store (or f32 add) an 8 x 32 f32 box image (128-byte swizzle) into a 36 x 32 tensor at
    `coords`: in-bounds elements written / added, the rest of the tensor unchanged."""
    g0 = random_tensor((36, 32), torch.float32, seed).numpy()
    src = random_tensor((8, 32), torch.float32, seed + 1).numpy()
    img = smem_image(src, (0, 0), (32, 8), 128)
    want = g0.astype(np.float64)
    x, y = coords
    for r in range(8):
        for c in range(32):
            if 0 <= y + r < 36 and 0 <= x + c < 32:
                want[y + r, x + c] = want[y + r, x + c] + src[r, c] if reduce else src[r, c]

    def check(outs):
        assert_equal_bits(outs[0], want.astype(np.float32), f"TMA {'reduce' if reduce else 'store'} at {coords}")

    return Case(f"tma_{'reduce' if reduce else 'store'}_{coords}", "tma_store_box", (1, 1, 1), (64, 1, 1),
                [None, g0, img, np.int32(x), np.int32(y), np.uint32(img.size), np.int32(reduce), np.int32(0)],
                [1], check, shared_mem=img.size, extra={"tma": [(0, 1, (32, 8), 128)]})


STSM_SOURCE = r"""
// Lane l's registers r_j = frag[l][j]; lane l gives row l % 8 of matrix l / 8 (16 B each, the
// four matrices 128 B apart); the 512 bytes of shared memory are copied out.
extern "C" __global__ void stsm_x4(const uint32_t* frag, unsigned char* out, int trans) {
  __shared__ __align__(16) unsigned char m[512];
  const int l = threadIdx.x;
  for (int i = l; i < 512; i += 32) m[i] = 0xEE;
  __syncwarp();
  const uint32_t* r = frag + 4 * l;
  if (trans) stmatrix_x4_trans(m + (l / 8) * 128 + (l % 8) * 16, r[0], r[1], r[2], r[3]);
  else stmatrix_x4(m + (l / 8) * 128 + (l % 8) * 16, r[0], r[1], r[2], r[3]);
  __syncwarp();
  for (int i = l; i < 512; i += 32) out[i] = m[i];
}

extern "C" __global__ void elect_kernel(int* out) { out[threadIdx.x] = elect_one_sync() ? 1 : 0; }
"""


def stmatrix_case(seed: int, trans: bool) -> Case:
    """stmatrix.x4: matrix j, row i, column c = b16 half (c % 2) of lane 4 i + c / 2's r_j (PTX
    ISA, "stmatrix": the fragment layout of ldmatrix); .trans stores the transpose."""
    rng = np.random.default_rng(seed)
    frag = rng.integers(0, 2 ** 32, size=(32, 4), dtype=np.uint32)
    halves = frag.view(np.uint16).reshape(32, 4, 2)
    want = np.empty((4, 8, 8), np.uint16)
    for j in range(4):
        for i in range(8):
            for c in range(8):
                a, b = (c, i) if trans else (i, c)
                want[j, i, c] = halves[4 * a + b // 2, j, b % 2]

    def check(outs):
        assert_equal_bits(outs[0].view(np.uint16).reshape(4, 8, 8), want, f"stmatrix.x4{' .trans' if trans else ''}")

    return Case(f"stmatrix_x4{'_trans' if trans else ''}", "stsm_x4", (1, 1, 1), (32, 1, 1),
                [frag, poisoned((512,), np.uint8), np.int32(trans)], [1], check)


def mbarrier_case() -> Case:
    """mbar_misuse mode 3: two phases of 32 arrivals each, waited with parity 0 then 1."""

    def check(outs):
        assert (outs[0] == 7).all(), outs[0]

    return Case("mbarrier_two_phases", "mbar_misuse", (1, 1, 1), (32, 1, 1),
                [np.int32(3), poisoned((32,), np.int32)], [1], check)


def elect_case(threads: int) -> Case:
    want = np.zeros(threads, np.int32)
    want[::32] = 1

    def check(outs):
        assert np.array_equal(outs[0], want), outs[0]

    return Case(f"elect_{threads}", "elect_kernel", (1, 1, 1), (threads, 1, 1), [poisoned((threads,), np.int32)],
                [0], check)


def cases(seed: int) -> list[Case]:
    """Every GPU conformance case of the family (tests/gpu/test_ptx_conformance.py)."""
    out = []
    g2 = random_tensor((45, 48), torch.float32, seed)
    for sw, dtype, cols in ((0, torch.float32, 24), (32, torch.bfloat16, 16), (64, torch.float32, 16),
                            (128, torch.float32, 32)):
        t = g2.to(dtype)
        for coords in ((0, 0), (8, 5), (-4, -3), (40, 37)):
            out.append(load_case(t, (cols, 16), coords, sw, None))
    g3 = random_tensor((3, 20, 32), torch.float32, seed + 1)
    out.append(load_case(g3, (32, 8, 2), (0, 15, 2), 128, None))
    for reduce in (0, 1):
        for coords in ((0, 0), (-8, 30)):
            out.append(store_case(seed + 2, reduce, coords))
    out += [stmatrix_case(seed + 3, False), stmatrix_case(seed + 4, True), mbarrier_case(), elect_case(64)]
    return out


SOURCE = SOURCE_TMA + STSM_SOURCE
