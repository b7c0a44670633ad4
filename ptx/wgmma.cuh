// ptx/wgmma.cuh: warpgroup-level asynchronous MMA on Hopper, wgmma (PTX ISA, "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate Instructions"), sm_90a.
//
//   wgmma.mma_async.sync.aligned.m64nNk32.f32.e4m3.e4m3  d, a-desc, b-desc, scale-d, 1, 1;  N = 16..256 (below;
//     the ISA's FP8 shapes are .m64n8k32 .. .m64n256k32 in steps of 8: "wgmma.mma_async", Syntax)
//     D[64xN] = A[64x32] * B[32xN] + (scale-d ? D : 0), f32 accumulate; A and B in shared
//     memory, both K-major (the only layout for 8-bit inputs), named by matrix descriptors.
//   wgmma.fence / commit_group / wait_group N: order register accesses, close a group of
//     issued MMAs, wait until at most N groups are pending. Every one is warpgroup-collective
//     (.sync.aligned: all 128 threads, converged per warp).
//
// Matrix descriptor (ISA "Matrix Descriptor Format"), 64 bits:
//   [0,14)  start address >> 4 (shared window, 18 bits)   [16,30) leading byte offset >> 4
//   [32,46) stride byte offset >> 4                      [49,52) base offset (we use 0)
//   [62,64) swizzle: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
// K-major layouts of an operand's element (row r of M or N, byte k along K), for 8-bit types
// (ISA "Shared Memory Matrix Layout"; a core matrix is 8 rows x 16 bytes):
//   none:        start + (r % 8) * 16 + (r / 8) * SBO + (k / 16) * LBO + k % 16
//   swizzle P:   u = start + (r % 8) * P + (r / 8) * SBO + k  (P = 32, 64, 128 byte rows; LBO "not
//                used, assumed 1": encode 16 bytes)
//                address = u ^ (((u >> 7) & (P / 16 - 1)) << 4): the 16-byte chunk index is
//                XORed with the row within the 8-row pattern, on absolute address bits, so the
//                pattern (8 * P bytes) must sit at a multiple of 8 * P, or base offset != 0.
// Accumulator fragment (ISA "Matrix Fragments for wgmma .m64nNk32", f32 D): thread t of the
// warpgroup, warp w = t / 32, g = (t % 32) / 4, q = t % 4; register i < N / 2 holds
//   row = 16 w + g + 8 ((i / 2) % 2),   col = 8 (i / 4) + 2 q + (i % 2).
//
// Emulation (FMO_SIM), asynchronous as the ISA defines it: mma_async only records the
// operation (accumulator address, descriptors, scale-d) in the thread's queue; commit_group
// closes a group; wait_group N executes the groups older than the newest N, in order: it
// then reads shared memory through the decoded descriptors and the accumulator registers,
// and writes D. So a kernel that reads D before the wait sees the old D, and one that
// overwrites the operands' shared memory before the wait multiplies the new bytes: both
// wrong on the GPU too, and both visible as wrong results here. mma_async without a fence
// since the thread's last wait_group (or ever) fails (the ISA requires wgmma.fence before the
// first MMA and between register accesses and an MMA using the same registers; touching the
// accumulators after a wait is such an access). Each call checks that the 32 lanes of the
// warp arrive together with identical descriptors / scale-d (warp_allgather), and the n-th
// MMA of each warp is compared with the warpgroup's other warps' n-th (a per-warpgroup log);
// a warp that never issues (a hang on the GPU) is not detected. Each thread computes its
// own N / 2 outputs with QGMMA's arithmetic (ptx/tensor_core_numerics.cuh): per instruction one
// fused step over the accumulator (D, or 0 when scale-d = 0) and the 32 exact products, every
// term truncated 13 bits below the largest exponent and the result to 13 fraction bits: the
// hardware's bits, not fp32 accumulation. Descriptor addresses map onto
// the dynamic shared memory buffer (its start is shared address 0 here; on the GPU put the
// tiles in dynamic shared memory at 1024-byte alignment); a nonzero base offset is refused.
#pragma once

#include "ptx/common.cuh"
#include "ptx/mbarrier.cuh"
#ifndef FMO_SIM
#include "ptx/wgmma_e4m3_asm.cuh"
#endif
#include "ptx/mma.cuh"

#if !defined(FMO_SIM) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "ptx/wgmma.cuh: wgmma exists only on sm_90a (compile with -arch=sm_90a); sm_89 kernels use mma.sync"
#endif

#ifdef FMO_SIM
// The module's dynamic shared memory buffer (defined by the simulator's compiler driver when
// the module declares an `extern __shared__` array; weak: null otherwise).
extern "C" __attribute__((weak)) unsigned char* fmo_sim_dynamic_smem();
#endif

namespace fmo {
namespace ptx {

enum class Swizzle : uint32_t { none = 0, b128 = 1, b64 = 2, b32 = 3 };

// Shared-window address of a generic pointer into (dynamic) shared memory.
#ifdef FMO_SIM
namespace sim_detail {
constexpr size_t kWgmmaWindow = 1u << 18;  // the descriptor's 18-bit address range
FMO_SIM_EMU uint32_t wgmma_shared_offset(const void* p) {
  const unsigned char* base = fmo_sim_dynamic_smem ? fmo_sim_dynamic_smem() : nullptr;
  const auto* c = static_cast<const unsigned char*>(p);
  if (base == nullptr || c < base || c >= base + fmo_sim::kDynamicSmemBytes)
    fmo_sim::fail("wgmma descriptor: %p is not in dynamic shared memory (the emulation maps descriptor "
                  "addresses onto the dynamic buffer)", p);
  return static_cast<uint32_t>(c - base);
}
}  // namespace sim_detail
#endif

FMO_DEVICE uint32_t wgmma_smem_addr(const void* p) {
#ifdef FMO_SIM
  return sim_detail::wgmma_shared_offset(p);
#else
  return smem_addr(p);
#endif
}

// Descriptor of a K-major operand starting at `p` (ISA "Matrix Descriptor Format"). Byte
// offsets must be multiples of 16 and below 2^18; base offset 0.
FMO_DEVICE uint64_t make_smem_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle sw) {
  const uint64_t addr = wgmma_smem_addr(p);
  return ((addr & 0x3ffffu) >> 4) | (uint64_t((lbo_bytes & 0x3ffffu) >> 4) << 16) |
         (uint64_t((sbo_bytes & 0x3ffffu) >> 4) << 32) | (uint64_t(sw) << 62);
}

#ifdef FMO_SIM
namespace sim_detail {

struct WgmmaDesc {  // a decoded descriptor
  uint32_t start, lbo, sbo, base_offset;
  Swizzle sw;
};
FMO_SIM_EMU WgmmaDesc decode_desc(uint64_t d) {
  return WgmmaDesc{uint32_t(d & 0x3fffu) << 4, uint32_t((d >> 16) & 0x3fffu) << 4,
                   uint32_t((d >> 32) & 0x3fffu) << 4, uint32_t((d >> 49) & 0x7u),
                   static_cast<Swizzle>(uint32_t(d >> 62))};
}

// Shared-window byte offset of element (row, k-byte) of a K-major 8-bit operand.
FMO_SIM_EMU uint32_t kmajor_offset(const WgmmaDesc& d, uint32_t row, uint32_t k) {
  if (d.sw == Swizzle::none) return d.start + (row % 8) * 16 + (row / 8) * d.sbo + (k / 16) * d.lbo + k % 16;
  const uint32_t pitch = d.sw == Swizzle::b128 ? 128 : d.sw == Swizzle::b64 ? 64 : 32;
  const uint32_t u = d.start + (row % 8) * pitch + (row / 8) * d.sbo + k;
  return u ^ (((u >> 7) & (pitch / 16 - 1)) << 4);
}

// One thread's rows of an operand, k = 0..31: 32 bytes read as two 16-byte chunks (each
// chunk stays contiguous under every layout above), reported to the checkers.
FMO_SIM_EMU void read_kmajor_row(const unsigned char* base, const WgmmaDesc& d, uint32_t row, float (&out)[32]) {
  for (uint32_t c = 0; c < 2; ++c) {
    const uint32_t off = kmajor_offset(d, row, 16 * c);
    if (off + 16 > fmo_sim::kDynamicSmemBytes)
      fmo_sim::fail("wgmma: operand row %u reaches shared offset %u, past the dynamic buffer", row, off + 16);
    fmo_sim::check_access(base + off, 16, false);
    for (uint32_t j = 0; j < 16; ++j) out[16 * c + j] = decode_e4m3(base[off + j]);
  }
}

struct WgmmaOp {
  float* d;
  uint64_t a, b;
  int n, scale_d;
  // Another instruction family's executor (ptx/wgmma_bf16.cuh) and its payload, owned by that
  // family and alive until the op retires; null: the e4m3 executor below.
  void (*exec)(const WgmmaOp&) = nullptr;
  const void* ext = nullptr;
  uint64_t seq = 0;  // the thread's MMA number in this CTA (set at issue; the same across the warpgroup)
};
constexpr int kWgmmaMaxPending = 32;  // emulation limit on issued, not yet retired MMAs (attention: 20 with MLA dims)
constexpr int kWgmmaMaxThreads = 512;    // 4 warpgroups
constexpr uint32_t kWgmmaMagic = 0x57474d4du;  // "WGMM": state set up in this CTA
struct WgmmaThread {
  uint32_t magic;
  int fenced, count, groups;   // fence since the last wait; queued ops; closed groups
  uint64_t issued;             // MMAs this thread has issued in this CTA
  int group_end[kWgmmaMaxPending];
  WgmmaOp ops[kWgmmaMaxPending];
};
// Per-thread queues live in the CTA's shared memory (module thread_locals are per CTA in
// flight), which the simulator poisons at each CTA start: a wrong magic means "empty".
// `static`, not `inline`: GCC makes an inline variable a GNU-unique symbol, which the dynamic
// loader binds process-wide even across RTLD_LOCAL modules, so a second kernel module would
// use the first module's TLS (outside its shared memory, never poisoned).
static thread_local WgmmaThread g_wgmma[kWgmmaMaxThreads];

FMO_SIM_EMU WgmmaThread& wgmma_thread() {
  const unsigned t = fmo_sim::cur()->linear_tid;
  if (t >= kWgmmaMaxThreads) fmo_sim::fail("wgmma emulation: at most %d threads per CTA", kWgmmaMaxThreads);
  WgmmaThread& s = g_wgmma[t];
  if (s.magic != kWgmmaMagic) {
    s.magic = kWgmmaMagic;
    s.fenced = s.count = s.groups = 0;
    s.issued = 0;
  }
  return s;
}

// B operand split once per warpgroup. Every thread of a warpgroup reads all k of N / 4 of B's
// columns, so each column was read, decoded and split 32 times per instruction (most of the
// emulation's time). Now the first thread to retire a warpgroup's MMA #seq (every thread issues the
// same sequence: wgmma_warpgroup_uniform) reads all N columns and keeps their splits in ring entry
// seq % kWgmmaBEntries, with a snapshot of the bytes they came from (B's 2N 16-byte chunks); a later
// thread uses them only if B's bytes in shared memory still equal the snapshot when it retires the
// MMA (else it refills the entry), so each thread multiplies what shared memory holds at its own
// wait_group, as before: a stage overwritten between two warps' waits still gives those warps
// different (wrong) results. A split is a pure function of the bytes: the outputs are bit for bit
// the uncached ones. A thread lagging a whole ring behind, or an operand over kWgmmaBMaxValues,
// reads its columns itself. Checking builds (racecheck/memcheck) keep every thread's own reads.
constexpr int kWgmmaBEntries = 32;       // = kWgmmaMaxPending: a whole queue retired by one wait
constexpr int kWgmmaBMaxValues = 4096;   // N x k: 16-bit N <= 256, e4m3 N <= 128
constexpr int kWgmmaBMaxChunks = 512;    // 2N
struct WgmmaBEntry {
  uint64_t tag;  // MMA number + 1; 0: empty
  uint64_t desc;
  int n, kind;   // columns; the caller's operand kind (format and major-ness)
  uint32_t chunk_off[kWgmmaBMaxChunks];
  uint64_t chunk[kWgmmaBMaxChunks][2];
  int16_t significand[kWgmmaBMaxValues];  // column mn's k values from mn * k (split_vector's, narrowed)
  int8_t exponent[kWgmmaBMaxValues];
  bool finite[256];
};
struct WgmmaBCache {
  uint32_t magic;
  WgmmaBEntry e[kWgmmaBEntries];
};
// In the CTA's shared memory like g_wgmma (poisoned at each CTA start: a wrong magic means empty).
static thread_local WgmmaBCache g_wgmma_b[kWgmmaMaxThreads / 128];

// Column mn of a filled entry, viewed as a split vector of k values.
struct WgmmaBColumn {
  const int16_t* significand;
  const int8_t* exponent;
  bool finite;
};
FMO_SIM_EMU WgmmaBColumn wgmma_b_column(const WgmmaBEntry& e, int k, uint32_t mn) {
  return WgmmaBColumn{e.significand + mn * k, e.exponent + mn * k, e.finite[mn]};
}

FMO_SIM_EMU bool wgmma_b_matches(const unsigned char* base, const WgmmaBEntry& e) {
  const int chunks = 2 * e.n;
  for (int i = 0; i < chunks; ++i) {
    uint64_t now[2];
    std::memcpy(now, base + e.chunk_off[i], 16);
    if (((now[0] ^ e.chunk[i][0]) | (now[1] ^ e.chunk[i][1])) != 0) return false;
  }
  return true;
}

// The split columns of MMA #seq's B (descriptor `desc`, n columns of k values, `kind` naming the
// caller's format and layout) as shared memory holds them now, or null (checking builds, too big,
// or this thread a whole ring behind). read_column(mn, values) reads column mn (with the uncached
// path's bounds checks); chunk_offset(i) is the shared offset of B's i-th 16-byte chunk, i < 2n
// (together they cover every byte read).
template <class ReadColumn, class ChunkOffset>
FMO_SIM_EMU const WgmmaBEntry* wgmma_b_split(const unsigned char* base, uint64_t seq, uint64_t desc, int n, int kind,
                                            int k, OperandFormat fmt, ReadColumn read_column,
                                            ChunkOffset chunk_offset) {
#if defined(FMO_SIM_CHECKING)
  (void)base, (void)seq, (void)desc, (void)n, (void)kind, (void)k, (void)fmt, (void)read_column, (void)chunk_offset;
  return nullptr;
#else
  if (n * k > kWgmmaBMaxValues) return nullptr;
  WgmmaBCache& cache = g_wgmma_b[fmo_sim::cur()->linear_tid / 128];
  if (cache.magic != kWgmmaMagic) {
    cache.magic = kWgmmaMagic;
    for (WgmmaBEntry& e : cache.e) e.tag = 0;
  }
  WgmmaBEntry& e = cache.e[seq % kWgmmaBEntries];
  if (e.tag > seq + 1) return nullptr;  // reused by a later MMA
  if (e.tag == seq + 1 && e.desc == desc && e.n == n && e.kind == kind && wgmma_b_matches(base, e)) return &e;
  e.tag = 0;
  for (int mn = 0; mn < n; ++mn) {
    float v[32];
    SplitVector split;
    read_column(static_cast<uint32_t>(mn), v);
    split_vector(v, k, fmt, split);
    e.finite[mn] = split.finite;
    if (!split.finite) continue;
    for (int i = 0; i < k; ++i) {
      e.significand[mn * k + i] = static_cast<int16_t>(split.significand[i]);
      e.exponent[mn * k + i] = static_cast<int8_t>(split.exponent[i]);
    }
  }
  for (int i = 0; i < 2 * n; ++i) {
    e.chunk_off[i] = chunk_offset(i);
    std::memcpy(e.chunk[i], base + e.chunk_off[i], 16);
  }
  e.desc = desc, e.n = n, e.kind = kind, e.tag = seq + 1;
  return &e;
#endif
}

// Warpgroup uniformity: the ISA requires the same descriptors (and instruction) from all four
// warps. Lane 0 of each warp logs or checks its n-th MMA in its warpgroup's ring: the first
// warp to issue MMA #n writes the entry, later warps compare with it (a warp more than
// kWgmmaLog MMAs behind the first finds the entry reused and is not checked).
constexpr int kWgmmaLog = 16;
struct WgmmaLogEntry {
  uint64_t tag;  // MMA number + 1; 0: empty
  uint64_t a, b;
  int n, scale_d;
};
struct WgmmaWarpgroupLog {
  uint32_t magic;
  WgmmaLogEntry e[kWgmmaLog];
};
static thread_local WgmmaWarpgroupLog g_wgmma_log[kWgmmaMaxThreads / 128];

FMO_SIM_EMU void wgmma_warpgroup_uniform(uint64_t seq, const WgmmaLogEntry& mine) {
  if (fmo_sim::lane_id() != 0) return;
  WgmmaWarpgroupLog& log = g_wgmma_log[fmo_sim::cur()->linear_tid / 128];
  if (log.magic != kWgmmaMagic) {
    std::memset(log.e, 0, sizeof log.e);
    log.magic = kWgmmaMagic;
  }
  WgmmaLogEntry& e = log.e[seq % kWgmmaLog];
  if (e.tag < seq + 1) {
    e = mine;
    e.tag = seq + 1;
  } else if (e.tag == seq + 1 && (e.a != mine.a || e.b != mine.b || e.n != mine.n || e.scale_d != mine.scale_d)) {
    fmo_sim::fail("wgmma.mma_async #%llu: warp %u of the warpgroup issued descriptors/scale-d different from "
                  "another warp's (they must be the same across the warpgroup)",
                  static_cast<unsigned long long>(seq), fmo_sim::warp_id() % 4);
  }
}

// .sync.aligned: the whole warp arrives together with the same operands.
struct WgmmaUniform {
  uint64_t a, b;
  int n, scale_d, kind, pad;
};
FMO_SIM_EMU void wgmma_warp_uniform(const char* what, WgmmaUniform mine) {
  WgmmaUniform all[32];
  fmo_sim::warp_allgather(0xffffffffu, &mine, all, sizeof(WgmmaUniform));
  for (int i = 0; i < 32; ++i)
    if (std::memcmp(&all[i], &mine, sizeof mine) != 0)
      fmo_sim::fail("%s: lane %d's operands differ from lane %u's (must be uniform across the warpgroup)", what, i,
                    fmo_sim::lane_id());
}

// D's N / 2 registers of this thread (fragment map at the top) from its rows of A (read and split)
// and B K-major in shared memory (desc b): the SS and RS e4m3 forms. B's columns come split from
// the warpgroup's cache (wgmma_b_split) while every value and the accumulator are finite; otherwise
// the thread reads its column itself (the IEEE path of fused_dot_add needs the floats).
FMO_SIM_EMU void wgmma_e4m3_rows_times_b(const unsigned char* base, const WgmmaDesc& db, uint64_t seq, uint64_t b,
                                         const float (&arow)[2][32], const SplitVector (&arow_split)[2], float* d,
                                         int n, int scale_d) {
  const uint32_t q = fmo_sim::cur()->linear_tid % 4;
  const WgmmaBEntry* cache = wgmma_b_split(
      base, seq, b, n, /*kind=*/0, 32, kE4M3Format,
      [&](uint32_t mn, float (&v)[32]) { read_kmajor_row(base, db, mn, v); },
      [&](int i) { return kmajor_offset(db, static_cast<uint32_t>(i / 2), 16 * static_cast<uint32_t>(i % 2)); });
  const bool a_finite = arow_split[0].finite && arow_split[1].finite;
  float bcol[32];
  SplitVector bcol_split;
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 2; ++c) {
      const uint32_t col = 8 * j + 2 * q + c;
      bool have_col = false;
      for (int h = 0; h < 2; ++h) {
        float* dst = d + 4 * j + 2 * h + c;  // register i = 4j + 2h + c
        const float acc = scale_d ? *dst : 0.0f;
        if (cache && a_finite && cache->finite[col] && std::isfinite(acc)) {  // all finite: b's floats unused
          *dst = fused_dot_add(arow[h], arow_split[h], arow[h], wgmma_b_column(*cache, 32, col), 32, acc, kE4M3Format,
                               kQgmmaRule);
          continue;
        }
        if (!have_col) {
          read_kmajor_row(base, db, col, bcol);
          split_vector(bcol, 32, kE4M3Format, bcol_split);
          have_col = true;
        }
        *dst = fused_dot_add(arow[h], arow_split[h], bcol, bcol_split, 32, acc, kE4M3Format, kQgmmaRule);
      }
    }
}

FMO_SIM_EMU void wgmma_execute(const WgmmaOp& op) {
  const unsigned char* base = fmo_sim_dynamic_smem();
  const WgmmaDesc da = decode_desc(op.a), db = decode_desc(op.b);
  if (da.base_offset != 0 || db.base_offset != 0)
    fmo_sim::fail("wgmma: descriptor base offset %u/%u: only 0 (patterns at their natural alignment) is emulated",
                  da.base_offset, db.base_offset);
  const unsigned t = fmo_sim::cur()->linear_tid % 128;
  const uint32_t w = t / 32, g = (t % 32) / 4;
  float arow[2][32];
  read_kmajor_row(base, da, 16 * w + g, arow[0]);
  read_kmajor_row(base, da, 16 * w + g + 8, arow[1]);
  SplitVector arow_split[2];
  for (int h = 0; h < 2; ++h) split_vector(arow[h], 32, kE4M3Format, arow_split[h]);
  wgmma_e4m3_rows_times_b(base, db, op.seq, op.b, arow, arow_split, op.d, op.n, op.scale_d);
}

// Queue one MMA of any family (op.exec null: e4m3) after the ISA's checks: operands uniform
// across the warp and the warpgroup, a wgmma.fence since the thread's last wait.
FMO_SIM_EMU void wgmma_issue_op(const WgmmaOp& op) {
  const uint64_t a = op.a, b = op.b;
  const int N = op.n, scale_d = op.scale_d;
  wgmma_warp_uniform("wgmma.mma_async", WgmmaUniform{a, b, N, scale_d, 1, 0});
  WgmmaThread& s = wgmma_thread();
  if (!s.fenced)
    fmo_sim::fail("wgmma.mma_async without a wgmma.fence since this thread's last wgmma.wait_group (the ISA "
                  "requires the fence before the first MMA and after accumulator register accesses)");
  if (s.count == kWgmmaMaxPending)
    fmo_sim::fail("wgmma emulation: more than %d MMAs issued and not yet retired", kWgmmaMaxPending);
  s.ops[s.count] = op;
  s.ops[s.count++].seq = s.issued;
  wgmma_warpgroup_uniform(s.issued++, WgmmaLogEntry{0, a, b, N, scale_d});
}

template <int N>
FMO_SIM_EMU void wgmma_issue(float* d, uint64_t a, uint64_t b, int scale_d) {
  wgmma_issue_op(WgmmaOp{d, a, b, N, scale_d});
}

FMO_SIM_EMU void wgmma_fence_emulate() {
  wgmma_warp_uniform("wgmma.fence", WgmmaUniform{0, 0, 0, 0, 2, 0});
  wgmma_thread().fenced = 1;
}

FMO_SIM_EMU void wgmma_commit_emulate() {
  wgmma_warp_uniform("wgmma.commit_group", WgmmaUniform{0, 0, 0, 0, 3, 0});
  WgmmaThread& s = wgmma_thread();
  const int prev = s.groups ? s.group_end[s.groups - 1] : 0;
  if (s.count > prev) s.group_end[s.groups++] = s.count;  // an empty group retires at once
}

FMO_SIM_EMU void wgmma_wait_emulate(int n) {
  wgmma_warp_uniform("wgmma.wait_group", WgmmaUniform{0, 0, 0, 0, 4, n});
  WgmmaThread& s = wgmma_thread();
  const int retire = s.groups > n ? s.groups - n : 0;
  const int done = retire ? s.group_end[retire - 1] : 0;
  for (int i = 0; i < done; ++i) {  // oldest first
    if (s.ops[i].exec)
      s.ops[i].exec(s.ops[i]);
    else
      wgmma_execute(s.ops[i]);
  }
  for (int i = done; i < s.count; ++i) s.ops[i - done] = s.ops[i];
  for (int i = retire; i < s.groups; ++i) s.group_end[i - retire] = s.group_end[i] - done;
  s.count -= done;
  s.groups -= retire;
  s.fenced = 0;  // the caller now reads the accumulators: the next MMA needs a fence
}

}  // namespace sim_detail
#endif  // FMO_SIM

// wgmma.fence.sync.aligned: prior register (and shared memory) accesses of this warpgroup are
// ordered before the following wgmma.mma_async.
FMO_DEVICE void wgmma_fence() {
#ifdef FMO_SIM
  sim_detail::wgmma_fence_emulate();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// wgmma.commit_group.sync.aligned: close the group of MMAs issued since the last commit.
FMO_DEVICE void wgmma_commit() {
#ifdef FMO_SIM
  sim_detail::wgmma_commit_emulate();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// wgmma.wait_group.sync.aligned N: at most N committed groups still pending afterwards.
template <int N>
FMO_DEVICE void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N is an integer constant 0..7");
#ifdef FMO_SIM
  sim_detail::wgmma_wait_emulate(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// fence.proxy.async.shared::cta: this thread's generic-proxy writes to shared memory (st.shared,
// cp.async) become visible to the async proxy, through which wgmma reads its operands. Each
// writer fences, then a barrier, then the MMAs. The emulation has one memory: nothing to do,
// so a missing proxy fence is not caught here (only the GPU shows it, as stale operands).
FMO_DEVICE void fence_proxy_async_shared() { fence_proxy_async(); }

// Keeps the compiler from moving accesses of the accumulator registers across the wgmma
// fence/commit/wait statements (they are not operands of those): an empty asm that
// "modifies" each register. Nothing to do in the emulation.
template <int R>
FMO_DEVICE void wgmma_fence_operands(float (&d)[R]) {
#ifndef FMO_SIM
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// D[64xN] (+)= A[64x32] * B[32xN], e4m3 x e4m3 -> f32; d: this thread's N/2 registers (fragment
// map at the top of the file). scale_d = 0: D = A * B. N: the sizes ptx/gen_wgmma_e4m3.py spells
// out (16, 24, 32, 40, 48, 56 for decode-sized GEMM tiles; 64, 96, 112, 128, 144, 160, 192, 256;
// the ISA allows any multiple of 8 up to 256: add one there). The emulation is the same for
// every N (B's N rows: N / 8 groups of 8 rows, SBO apart, an odd count as well as an even one).
template <int N>
FMO_DEVICE void wgmma_m64nNk32_e4m3(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk32: N is a multiple of 8 up to 256");
#ifdef FMO_SIM
  sim_detail::wgmma_issue<N>(d, desc_a, desc_b, scale_d);
#else
  WgmmaE4m3Asm<N>::mma(d, desc_a, desc_b, scale_d);
#endif
}

// The two sizes the first GEMM used, by their old names.
FMO_DEVICE void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  wgmma_m64nNk32_e4m3<128>(d, desc_a, desc_b, scale_d);
}

FMO_DEVICE void wgmma_m64n64k32_e4m3(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  wgmma_m64nNk32_e4m3<64>(d, desc_a, desc_b, scale_d);
}

}  // namespace ptx
}  // namespace fmo
