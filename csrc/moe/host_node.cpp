// The node-local host transport (fastmoe_ops/moe/node.py): ranks on one machine move CPU
// rows by reading each other's memory with process_vm_readv (Linux cross-memory attach,
// "CMA") and meet at flags in one shared-memory control block instead of MPI messages.
//
// Why: MPI's single-copy path copies pre-packed buffers, so a gather (dispatch) or a
// scatter (combine) costs one extra pass over the rows, and each exchange pays MPI's
// rendezvous. Here the receiver's read *is* the gather: one remote iovec per run of
// consecutive source rows, straight into the output, one copy in all.
//
// Control block (int64 cells; each rank's flags on their own 64-byte line):
//   arrive[R] | done[R] | error[R] | arrive_wake | done_wake | table[2][R][width]
// A call's handshake: rank r writes its row of table[epoch % 2] (metadata, counts,
// addresses), then releases arrive[r] = epoch; every rank acquires until all arrive[p] >=
// epoch and copies the table out. Two tables suffice: a rank writes epoch e + 1's table
// only after every rank arrived at e, i.e. after every rank copied out e - 1's.
// After its reads a rank releases done[r] = epoch (error[r] = errno or 0); before
// returning, every rank waits for all done[p] >= epoch, since peers may still be reading
// its tensors until then.
// Waiting: a short spin, then sleep on a futex word (arrive_wake or done_wake) that every
// arrival bumps and wakes. Ranks may outnumber cores; a sleeping rank gives its core to
// the ranks still working, where spinning or yielding would compete with them for it.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLine = 8;   // int64 cells per 64-byte line
constexpr int kSpins = 64;   // looks before sleeping (a few microseconds: ranks may share cores)

int64_t* arrive_cell(int64_t* ctrl, int64_t rank) { return ctrl + rank * kLine; }
int64_t* done_cell(int64_t* ctrl, int64_t ranks, int64_t rank) { return ctrl + (ranks + rank) * kLine; }
int64_t* error_cell(int64_t* ctrl, int64_t ranks, int64_t rank) { return ctrl + (2 * ranks + rank) * kLine; }
uint32_t* wake_word(int64_t* ctrl, int64_t ranks, int which) {   // 0: arrive, 1: done
    return reinterpret_cast<uint32_t*>(ctrl + (3 * ranks + which) * kLine);
}
int64_t* table(int64_t* ctrl, int64_t ranks, int64_t width, int64_t epoch) {
    return ctrl + (3 * ranks + 2) * kLine + (epoch & 1) * ranks * width;
}

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes.
void futex_wait(uint32_t* word, uint32_t seen, double seconds) {
    timespec ts{time_t(seconds), long((seconds - double(time_t(seconds))) * 1e9)};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, nullptr, 0);   // EAGAIN/EINTR/ETIMEDOUT: look again
}

void publish(int64_t* cell, uint32_t* wake, int64_t epoch) {
    __atomic_store_n(cell, epoch, __ATOMIC_RELEASE);
    __atomic_fetch_add(wake, 1u, __ATOMIC_RELEASE);
    syscall(SYS_futex, wake, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Wait until cell(p) >= epoch for every p, or timeout_s passes. Returns the number of
// ranks still missing (listed in missing).
template <typename Cell>
int64_t wait_all(Cell cell, uint32_t* wake, int64_t ranks, int64_t epoch, double timeout_s, int64_t* missing) {
    const double deadline = now_s() + timeout_s;
    for (int spins = 0;; ++spins) {
        const uint32_t seen = __atomic_load_n(wake, __ATOMIC_ACQUIRE);
        int64_t late = 0;
        for (int64_t p = 0; p < ranks; ++p)
            if (__atomic_load_n(cell(p), __ATOMIC_ACQUIRE) < epoch) late++;
        if (late == 0) return 0;
        if (spins < kSpins) {
            cpu_relax();
            continue;
        }
        const double left = deadline - now_s();
        if (left <= 0) {
            int64_t n = 0;
            for (int64_t p = 0; p < ranks; ++p)
                if (__atomic_load_n(cell(p), __ATOMIC_ACQUIRE) < epoch) missing[n++] = p;
            return n;
        }
        futex_wait(wake, seen, left < 0.05 ? left : 0.05);
    }
}

// One process_vm_readv of the whole list. It stops short only at an unreadable remote page
// (a peer published a range its tensor does not cover), which is reported as EFAULT like an
// outright failure. Returns 0 or an errno.
int read_all(pid_t pid, iovec* local, size_t nlocal, iovec* remote, size_t nremote) {
    size_t want = 0;
    for (size_t i = 0; i < nremote; ++i) want += remote[i].iov_len;
    ssize_t got = process_vm_readv(pid, local, nlocal, remote, nremote, 0);
    if (got < 0) return errno;
    if (size_t(got) != want) return EFAULT;   // a peer's tensor ended early: never expected
    return 0;
}

}  // namespace

// Bytes of the control block for `ranks` ranks and handshake rows of `width` cells.
extern "C" int64_t fmo_node_control_bytes(int64_t ranks, int64_t width) {
    return int64_t(sizeof(int64_t)) * ((3 * ranks + 2) * kLine + 2 * ranks * width);
}

// Publish this rank's row of the handshake table for `epoch` and wait for every rank's.
// Returns 0 with every row copied to table_out [ranks][width], or the number of ranks that
// did not arrive within timeout_s (their indices in missing).
extern "C" int64_t fmo_node_handshake(int64_t* ctrl, int64_t ranks, int64_t width, int64_t rank, int64_t epoch,
                                      const int64_t* row, double timeout_s, int64_t* table_out, int64_t* missing) {
    int64_t* mine = table(ctrl, ranks, width, epoch) + rank * width;
    std::memcpy(mine, row, size_t(width) * sizeof(int64_t));
    uint32_t* wake = wake_word(ctrl, ranks, 0);
    publish(arrive_cell(ctrl, rank), wake, epoch);
    const int64_t late = wait_all([&](int64_t p) { return arrive_cell(ctrl, p); }, wake, ranks, epoch, timeout_s, missing);
    if (late) return late;
    std::memcpy(table_out, table(ctrl, ranks, width, epoch), size_t(ranks * width) * sizeof(int64_t));
    return 0;
}

// This rank has finished reading its peers' memory for `epoch` (error: 0 or an errno).
extern "C" void fmo_node_signal_done(int64_t* ctrl, int64_t ranks, int64_t rank, int64_t epoch, int64_t error) {
    __atomic_store_n(error_cell(ctrl, ranks, rank), error, __ATOMIC_RELAXED);
    publish(done_cell(ctrl, ranks, rank), wake_word(ctrl, ranks, 1), epoch);
}

// Wait until every rank has signalled done for `epoch`; errors_out [ranks] gets their
// error cells. Returns 0 or the number of ranks still reading after timeout_s (in missing).
extern "C" int64_t fmo_node_wait_done(int64_t* ctrl, int64_t ranks, int64_t epoch, double timeout_s,
                                      int64_t* errors_out, int64_t* missing) {
    const int64_t late = wait_all([&](int64_t p) { return done_cell(ctrl, ranks, p); }, wake_word(ctrl, ranks, 1), ranks,
                                  epoch, timeout_s, missing);
    if (late) return late;
    for (int64_t p = 0; p < ranks; ++p) errors_out[p] = __atomic_load_n(error_cell(ctrl, ranks, p), __ATOMIC_RELAXED);
    return 0;
}

// Contiguous reads, one per entry: nbytes[i] bytes at address remote[i] in process pid[i]
// (pid 0: this process, a memcpy) to local[i]. Returns 0, or an errno with *failed = i.
extern "C" int fmo_node_read(int64_t n, const int64_t* pid, const int64_t* remote, const int64_t* local,
                             const int64_t* nbytes, int64_t* failed) {
    for (int64_t i = 0; i < n; ++i) {
        if (nbytes[i] == 0) continue;
        void* dst = reinterpret_cast<void*>(static_cast<uintptr_t>(local[i]));
        void* src = reinterpret_cast<void*>(static_cast<uintptr_t>(remote[i]));
        if (pid[i] == 0) {
            std::memcpy(dst, src, size_t(nbytes[i]));
            continue;
        }
        iovec l{dst, size_t(nbytes[i])}, r{src, size_t(nbytes[i])};
        if (int err = read_all(pid_t(pid[i]), &l, 1, &r, 1)) {
            *failed = i;
            return err;
        }
    }
    return 0;
}

// Row gathers, one per entry: count[i] rows of row_bytes each, row j read from
// remote_base[i] + source[i][j] * row_bytes in process pid[i] (pid 0: this process), written
// contiguously from local[i]. source[i] is this process's int64 array of source rows, read
// with a stride of index_stride bytes (the rows arrive with their source index beside them).
// Runs of consecutive source rows become one iovec. Returns 0, or an errno with *failed = i.
extern "C" int fmo_node_gather(int64_t n, const int64_t* pid, const int64_t* count, const int64_t* source,
                               int64_t index_stride, const int64_t* remote_base, const int64_t* local,
                               int64_t row_bytes, int64_t* failed) {
    std::vector<iovec> remote;
    remote.reserve(IOV_MAX);
    for (int64_t i = 0; i < n; ++i) {
        const char* index = reinterpret_cast<const char*>(static_cast<uintptr_t>(source[i]));
        auto src_row = [&](int64_t j) {
            int64_t v;
            std::memcpy(&v, index + j * index_stride, sizeof v);
            return v;
        };
        const uintptr_t base = static_cast<uintptr_t>(remote_base[i]);
        char* out = reinterpret_cast<char*>(static_cast<uintptr_t>(local[i]));
        if (pid[i] == 0) {
            for (int64_t j = 0; j < count[i]; ++j)
                std::memcpy(out + j * row_bytes, reinterpret_cast<const void*>(base + src_row(j) * row_bytes), size_t(row_bytes));
            continue;
        }
        int64_t j = 0;
        while (j < count[i]) {
            remote.clear();
            const int64_t first = j;
            while (j < count[i] && remote.size() < size_t(IOV_MAX)) {
                const int64_t start = src_row(j);
                int64_t run = 1;
                while (j + run < count[i] && src_row(j + run) == start + run) run++;
                remote.push_back({reinterpret_cast<void*>(base + start * row_bytes), size_t(run * row_bytes)});
                j += run;
            }
            iovec l{out + first * row_bytes, size_t((j - first) * row_bytes)};
            if (int err = read_all(pid_t(pid[i]), &l, 1, remote.data(), remote.size())) {
                *failed = i;
                return err;
            }
        }
    }
    return 0;
}

// Defined in host_combine.cpp (the same library): the fixed-order sum over rows at bases.
extern "C" int fmo_host_combine(const int64_t* base, const int64_t* index, void* out, int64_t tokens, int64_t ranks,
                                int64_t hidden, int dtype);

// Combine's read and sum, fused: out [T, hidden] = for each token the ascending-rank sum of
// its rows, as fmo_host_combine computes it. Rank r's rows for this rank lie contiguously
// at first_row[r] in process pid[r] (pid 0: this process, read in place), row i there having
// index value row_index0[r] + i in index [T, R] (combine_index). Tokens go in blocks: each
// peer's rows for a block are consecutive (ascending token), so one read per peer brings
// them into `scratch`, where the sum finds them still in cache: the rows cross memory once
// instead of being written to a receive buffer and read back. Returns 0, -1 for an unknown
// dtype, or an errno with *failed = the rank whose read failed.
extern "C" int fmo_node_combine(int64_t ranks, const int64_t* pid, const int64_t* first_row, const int64_t* row_index0,
                                const int64_t* index, void* out, int64_t tokens, int64_t hidden, int dtype,
                                int64_t element_bytes, void* scratch, int64_t scratch_bytes, int64_t* failed) {
    const int64_t row_bytes = hidden * element_bytes;
    const int64_t block = std::max<int64_t>(1, scratch_bytes / std::max<int64_t>(1, ranks * row_bytes));
    char* area = static_cast<char*>(scratch);
    std::vector<int64_t> base(static_cast<size_t>(ranks));
    for (int64_t t0 = 0; t0 < tokens; t0 += block) {
        const int64_t n = std::min(block, tokens - t0);
        for (int64_t r = 0; r < ranks; ++r) {
            if (pid[r] == 0) {   // read where they lie (integer arithmetic: may point before them)
                base[r] = first_row[r] - row_index0[r] * row_bytes;
                continue;
            }
            int64_t lo = -1, hi = -1;
            for (int64_t t = t0; t < t0 + n; ++t) {
                const int64_t row = index[t * ranks + r];
                if (row < 0) continue;
                if (lo < 0) lo = row;
                hi = row + 1;
            }
            if (lo < 0) continue;   // no token of this block went to r
            char* dst = area + r * block * row_bytes;
            iovec l{dst, size_t((hi - lo) * row_bytes)};
            iovec rem{reinterpret_cast<void*>(static_cast<uintptr_t>(first_row[r] + (lo - row_index0[r]) * row_bytes)),
                      size_t((hi - lo) * row_bytes)};
            if (int err = read_all(pid_t(pid[r]), &l, 1, &rem, 1)) {
                *failed = r;
                return err;
            }
            base[r] = int64_t(reinterpret_cast<uintptr_t>(dst)) - lo * row_bytes;
        }
        char* dst = static_cast<char*>(out) + t0 * row_bytes;
        if (fmo_host_combine(base.data(), index + t0 * ranks, dst, n, ranks, hidden, dtype) != 0) return -1;
    }
    return 0;
}

// Dispatch's small per-row extras in send order, the rows peers read beside x's: row i of
// packed [S, stride] is send_src[i] (int64), then row send_src[i] of each of n tensors
// (contiguous, width[j] bytes a row at src[j]) side by side.
extern "C" void fmo_node_pack(const int64_t* send_src, int64_t rows, int64_t n, const int64_t* src, const int64_t* width,
                              char* packed, int64_t stride) {
    for (int64_t i = 0; i < rows; ++i) {
        char* dst = packed + i * stride;
        std::memcpy(dst, &send_src[i], sizeof(int64_t));
        int64_t at = sizeof(int64_t);
        for (int64_t j = 0; j < n; ++j) {
            std::memcpy(dst + at, reinterpret_cast<const char*>(static_cast<uintptr_t>(src[j])) + send_src[i] * width[j],
                        size_t(width[j]));
            at += width[j];
        }
    }
}

// The receiver's side: the extras of `rows` received packed rows into their tensors
// (width[j] bytes a row at out[j]).
extern "C" void fmo_node_unpack(const char* packed, int64_t rows, int64_t stride, int64_t n, const int64_t* out,
                                const int64_t* width) {
    for (int64_t i = 0; i < rows; ++i) {
        int64_t at = sizeof(int64_t);
        for (int64_t j = 0; j < n; ++j) {
            std::memcpy(reinterpret_cast<char*>(static_cast<uintptr_t>(out[j])) + i * width[j], packed + i * stride + at,
                        size_t(width[j]));
            at += width[j];
        }
    }
}

// ---------------------------------------------------------------- one call per exchange
// What the Python side would otherwise compute per peer with a dozen small array ops:
// counts [R][R] (row p: the rows p sends each rank; contiguous), addresses: each rank's
// published pair (x or y, then the packed extras), addresses[p * address_stride + j].

// Dispatch on this rank: every sender's packed extras for it into recv_packed [N, stride],
// the x rows they name into recv_x (row_bytes each), rank-major (x read by row_pid: 0 where
// the caller mapped a sender's x and rewrote its address, the sender's pid elsewhere); signal done (with the
// error, if any); then the extras' columns into their tensors. Returns 0 or an errno
// (*failed = the rank whose read failed).
extern "C" int fmo_node_dispatch(int64_t* ctrl, int64_t ranks, int64_t rank, int64_t epoch, const int64_t* pid,
                                 const int64_t* row_pid, const int64_t* counts, const int64_t* addresses, int64_t address_stride,
                                 char* recv_packed, int64_t stride, char* recv_x, int64_t row_bytes, int64_t n_extras,
                                 const int64_t* extra_out, const int64_t* extra_width, int64_t* failed) {
    std::vector<int64_t> count(ranks), remote(ranks), local(ranks), nbytes(ranks), bases(ranks), targets(ranks);
    int64_t received = 0;
    for (int64_t p = 0; p < ranks; ++p) {
        count[p] = counts[p * ranks + rank];
        int64_t before_me = 0;   // rows p sends to ranks before this one: where its rows for us start
        for (int64_t q = 0; q < rank; ++q) before_me += counts[p * ranks + q];
        remote[p] = addresses[p * address_stride + 1] + before_me * stride;
        local[p] = int64_t(reinterpret_cast<uintptr_t>(recv_packed + received * stride));
        nbytes[p] = count[p] * stride;
        bases[p] = addresses[p * address_stride];
        targets[p] = int64_t(reinterpret_cast<uintptr_t>(recv_x + received * row_bytes));
        received += count[p];
    }
    int err = fmo_node_read(ranks, pid, remote.data(), local.data(), nbytes.data(), failed);
    if (!err) err = fmo_node_gather(ranks, row_pid, count.data(), local.data(), stride, bases.data(), targets.data(), row_bytes, failed);
    fmo_node_signal_done(ctrl, ranks, rank, epoch, err);
    if (!err) fmo_node_unpack(recv_packed, received, stride, n_extras, extra_out, extra_width);
    return err;
}

// Combine on this rank: out [T, hidden] from every rank's rows for it (rank p's in its y at
// addresses[p * address_stride], after the rows p received from ranks before this one),
// summed in ascending rank order; then signal done. Returns what fmo_node_combine does.
extern "C" int fmo_node_combine_all(int64_t* ctrl, int64_t ranks, int64_t rank, int64_t epoch, const int64_t* pid,
                                    const int64_t* counts, const int64_t* addresses, int64_t address_stride,
                                    const int64_t* index, void* out, int64_t tokens, int64_t hidden, int dtype,
                                    int64_t element_bytes, void* scratch, int64_t scratch_bytes, int64_t* failed) {
    std::vector<int64_t> first(ranks), index0(ranks);
    int64_t sent = 0;
    for (int64_t p = 0; p < ranks; ++p) {
        int64_t before_me = 0;   // rows p received from ranks before this one
        for (int64_t s = 0; s < rank; ++s) before_me += counts[s * ranks + p];
        first[p] = addresses[p * address_stride] + before_me * hidden * element_bytes;
        index0[p] = sent;
        sent += counts[rank * ranks + p];
    }
    const int err = fmo_node_combine(ranks, pid, first.data(), index0.data(), index, out, tokens, hidden, dtype,
                                     element_bytes, scratch, scratch_bytes, failed);
    fmo_node_signal_done(ctrl, ranks, rank, epoch, err > 0 ? err : 0);
    return err;
}
