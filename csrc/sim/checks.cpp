// memcheck, racecheck and cp.async emulation of the SIMT simulator.
//
// Checking builds of a module (FMO_SIM_RACECHECK / FMO_SIM_MEMCHECK) are compiled with
// -fsanitize=thread but linked without libtsan: the module's own __tsan_* callbacks forward
// every load and store here (sim/tsan_hooks.h).
//   memcheck: an access must lie in a tensor of the launch (or an extra range), the current
//             thread's stack, shared memory (dynamic: below the launch's shared_mem), or the
//             module's own loaded segments.
//   racecheck: per shared-memory byte, the last writer and up to two readers with their
//             barrier epoch and warp-sync epoch; a conflicting access by another thread in the
//             same barrier interval (same warp: with no __syncwarp between) is a race.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace fmo_sim {

int is_shared(const void* p) {
  Worker* w = this_worker();
  auto* c = static_cast<const unsigned char*>(p);
  return w && c >= w->tls_lo && c < w->tls_hi;
}

static std::string hex(std::uintptr_t x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, x);
  return buf;
}

static std::string thread_of(const Worker* w, unsigned tid) {
  const Launch* L = w->L;
  char buf[64];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", tid % L->block[0], (tid / L->block[0]) % L->block[1],
                tid / (L->block[0] * L->block[1]));
  return buf;
}

static std::string smem_place(const Worker* w, const unsigned char* p) {
  if (p >= w->dyn_lo && p < w->dyn_lo + kDynamicSmemBytes)
    return "dynamic shared memory offset " + std::to_string(p - w->dyn_lo);
  std::size_t off = p - w->tls_lo;
  for (const TlsSymbol& s : w->L->mod->shared_vars)
    if (off >= s.offset && off < s.offset + s.size)
      return "shared variable `" + s.name + "` byte offset " + std::to_string(off - s.offset);
  return "static shared memory offset " + std::to_string(off) + " of the module's shared block";
}

static inline bool conflicts(const Worker* w, const ShadowRec& r, unsigned tid, unsigned warp) {
  if (!r.tid1 || r.epoch != w->epoch || unsigned(r.tid1 - 1) == tid) return false;
  unsigned rwarp = (r.tid1 - 1) / 32;
  return rwarp != warp || r.wepoch == w->warps[warp].epoch;
}

static void race(const Worker* w, const Fiber* f, const unsigned char* p, std::size_t bytes, bool is_write,
                 const ShadowRec& other, bool other_write) {
  std::string msg = std::string("shared-memory race: ") + (is_write ? "write" : "read") + " of " +
                    std::to_string(bytes) + " bytes at " + smem_place(w, p) + " by this thread conflicts with a " +
                    (other_write ? "write" : "read") + " by " + thread_of(w, other.tid1 - 1) +
                    " of the same block in the same barrier interval (missing __syncthreads or __syncwarp?)";
  (void)f;
  fail_current(msg);
}

static void racecheck(Worker* w, Fiber* f, const unsigned char* p, std::size_t bytes, bool is_write) {
  unsigned tid = f->abi.linear_tid, warp = f->abi.warp;
  ShadowRec me{w->epoch, (std::uint16_t)(tid + 1), w->warps[warp].epoch};
  std::size_t off = p - w->tls_lo;
  for (std::size_t i = 0; i < bytes && off + i < w->shadow.size(); ++i) {
    Shadow& s = w->shadow[off + i];
    if (conflicts(w, s.w, tid, warp)) race(w, f, p, bytes, is_write, s.w, true);
    if (is_write) {
      if (conflicts(w, s.r1, tid, warp)) race(w, f, p, bytes, true, s.r1, false);
      if (conflicts(w, s.r2, tid, warp)) race(w, f, p, bytes, true, s.r2, false);
      s.w = me;
    } else {
      if (s.r1.epoch != w->epoch || s.r1.tid1 == me.tid1 || !s.r1.tid1)
        s.r1 = me;
      else
        s.r2 = me;
    }
  }
}

static std::string nearest_range(const Launch* L, std::uintptr_t a) {
  const Range* best = nullptr;
  std::uintptr_t dist = ~(std::uintptr_t)0;
  for (const Range& r : L->ranges) {
    std::uintptr_t d = a < r.lo ? r.lo - a : (a >= r.hi ? a - r.hi + 1 : 0);
    if (d < dist) {
      dist = d;
      best = &r;
    }
  }
  if (!best) return "no tensors were passed";
  std::string name = best->index >= 0 ? "argument " + std::to_string(best->index) : std::string("extra range");
  std::string rel = a < best->lo ? std::to_string(best->lo - a) + " bytes before its start"
                                 : std::to_string(a - best->hi) + " bytes past its end";
  return "nearest tensor: " + name + " [" + hex(best->lo) + ", " + hex(best->hi) + ") of " +
         std::to_string(best->hi - best->lo) + " bytes; the access is " + rel;
}

void check_access(const void* p, std::size_t bytes, int kind) {
  Worker* w = this_worker();
  if (!w || !w->current) return;
  Fiber* f = w->current;
  const Launch* L = w->L;
  auto* c = static_cast<const unsigned char*>(p);
  std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (c >= w->tls_lo && c < w->tls_hi) {
    if (L->memcheck && c + bytes > w->dyn_lo + L->shared_mem && c < w->dyn_lo + kDynamicSmemBytes)
      fail_current("out-of-bounds dynamic shared memory " + std::string(kind == kRead ? "read" : "write") + " of " +
                   std::to_string(bytes) + " bytes at offset " + std::to_string(c - w->dyn_lo) +
                   "; the launch has shared_mem=" + std::to_string(L->shared_mem));
    if (L->racecheck && kind != kAtomic) racecheck(w, f, c, bytes, kind == kWrite);
    return;
  }
  if (!L->memcheck) return;
  std::uintptr_t base = reinterpret_cast<std::uintptr_t>(f) & ~(std::uintptr_t)(kStackBytes - 1);
  if (a >= base && a + bytes <= base + kStackBytes) return;  // this thread's stack
  for (const Range& r : L->ranges)
    if (a >= r.lo && a + bytes <= r.hi) return;
  for (auto& s : L->mod->segments)
    if (a >= s.first && a + bytes <= s.second) return;
  fail_current("out-of-bounds global " + std::string(kind == kRead ? "read" : kind == kWrite ? "write" : "atomic") +
               " of " + std::to_string(bytes) + " bytes at address " + hex(a) + "; " + nearest_range(L, a));
}

// ---- cp.async: bytes are read at issue, land at the wait that retires their group -------
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
  Worker* w = this_worker();
  Fiber* f = w->current;
  if (!is_shared(dst)) fail_current("cp.async destination " + hex(reinterpret_cast<std::uintptr_t>(dst)) +
                                    " is not in this CTA's shared memory");
  if (src_bytes > bytes) src_bytes = bytes;
  check_access(src, src_bytes, kRead);
  std::size_t off = f->copy_data.size();
  f->copy_data.resize(off + bytes, 0);
  std::memcpy(f->copy_data.data() + off, src, src_bytes);
  f->copies.push_back(PendingCopy{dst, bytes, f->open_group, off});
}

void cp_async_commit() {
  Fiber* f = this_worker()->current;
  f->open_group++;
}

void cp_async_wait(int n) {
  Fiber* f = this_worker()->current;
  // committed groups are 1 .. open_group-1; retire those older than the newest n
  std::uint64_t newest = f->open_group - 1;
  std::uint64_t limit = newest >= (std::uint64_t)n ? newest - n : 0;  // retire groups <= limit
  std::size_t keep = 0;
  for (std::size_t i = 0; i < f->copies.size(); ++i) {
    PendingCopy& c = f->copies[i];
    if (c.group <= limit) {
      check_access(c.dst, c.bytes, kWrite);
      std::memcpy(c.dst, f->copy_data.data() + c.data_off, c.bytes);
    } else {
      f->copies[keep++] = c;
    }
  }
  f->copies.resize(keep);
  if (keep == 0) f->copy_data.clear();
}

}  // namespace fmo_sim
