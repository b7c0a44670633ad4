// Python bindings of the SIMT simulator runtime: load a host-compiled module, read its
// kernels' parameter layouts, launch (with the GIL released), and look up its globals.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>

#include "runtime.h"

namespace py = pybind11;

namespace fmo_sim {

unsigned char* module_tls_block(Module* m) {
  void* p = nullptr;
  if (dlinfo(m->handle, RTLD_DI_TLS_DATA, &p) != 0 || !p)
    throw std::runtime_error("module has no TLS block on this thread: " + m->path);
  return static_cast<unsigned char*>(p);
}

namespace {

struct PhdrQuery {
  ElfW(Addr) base;
  Module* m;
};

int phdr_cb(struct dl_phdr_info* info, size_t, void* data) {
  auto* q = static_cast<PhdrQuery*>(data);
  if (info->dlpi_addr != q->base) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS) q->m->tls_size = ph.p_memsz;
    if (ph.p_type == PT_LOAD)
      q->m->segments.emplace_back(info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
  }
  return 1;
}

// Static __shared__ variables are TLS symbols of the module's .symtab (local ones too): read
// them so race reports can name the variable.
std::vector<TlsSymbol> read_shared_vars(const std::string& path) {
  std::vector<TlsSymbol> out;
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return out;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return out;
  }
  void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return out;
  auto* base = static_cast<const unsigned char*>(map);
  auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
    const char* strs = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
    std::size_t n = sh[i].sh_size / sizeof(ElfW(Sym));
    for (std::size_t k = 0; k < n; ++k) {
      if (ELF64_ST_TYPE(syms[k].st_info) != STT_TLS || syms[k].st_size == 0) continue;
      std::string name = strs + syms[k].st_name;
      if (name == "fmo_sim_dynamic_smem_buf") continue;
      int status = 0;
      char* dm = abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status);
      if (dm) {
        name = dm;
        std::free(dm);
      }
      out.push_back(TlsSymbol{syms[k].st_value, syms[k].st_size, name});
    }
  }
  munmap(map, st.st_size);
  return out;
}

class PyModule {
 public:
  explicit PyModule(const std::string& path) {
    m_.path = path;
    m_.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!m_.handle) throw std::runtime_error(std::string("dlopen failed: ") + dlerror());
    auto bind = reinterpret_cast<int (*)(const RuntimeApi*)>(dlsym(m_.handle, "fmo_sim_bind"));
    if (!bind) throw std::runtime_error("module lacks fmo_sim_bind: " + path);
    int abi = bind(runtime_api());
    if (abi != kAbiVersion)
      throw std::runtime_error("module built for simulator ABI " + std::to_string(abi) + ", runtime is " +
                               std::to_string(kAbiVersion));
    m_.dynamic_smem = reinterpret_cast<unsigned char* (*)()>(dlsym(m_.handle, "fmo_sim_dynamic_smem"));
    if (!m_.dynamic_smem) throw std::runtime_error("module lacks fmo_sim_dynamic_smem: " + path);
    struct link_map* lm = nullptr;
    dlinfo(m_.handle, RTLD_DI_LINKMAP, &lm);
    PhdrQuery q{lm->l_addr, &m_};
    dl_iterate_phdr(phdr_cb, &q);
    if (!m_.tls_size) throw std::runtime_error("module has no TLS segment (shared memory): " + path);
    m_.shared_vars = read_shared_vars(path);
  }

  py::list signature(int index) {
    std::string name = "fmo_sim_sig_" + std::to_string(index);
    auto sig = reinterpret_cast<int (*)(unsigned*, int)>(dlsym(m_.handle, name.c_str()));
    if (!sig) throw std::runtime_error("module lacks " + name);
    unsigned buf[2 * 256];
    int n = sig(buf, 2 * 256);
    py::list out;
    for (int i = 0; i < n; ++i) out.append(py::make_tuple(buf[2 * i], buf[2 * i + 1]));
    return out;
  }

  std::string launch(int index, const std::string& kernel, std::vector<unsigned> grid, std::vector<unsigned> block,
                     std::size_t shared_mem, py::bytes args, std::vector<std::tuple<std::uintptr_t, std::uintptr_t, int>> ranges,
                     unsigned workers, double timeout_s, bool memcheck, bool racecheck) {
    std::string name = "fmo_sim_body_" + std::to_string(index);
    auto body = reinterpret_cast<void (*)(const unsigned char*)>(dlsym(m_.handle, name.c_str()));
    if (!body) throw std::runtime_error("module lacks " + name);
    auto L = std::make_shared<Launch>();
    L->mod = &m_;
    L->body = body;
    L->kernel = kernel;
    std::string a = args;
    L->args.assign(a.begin(), a.end());
    L->args.resize(L->args.size() + 16, 0);
    for (int i = 0; i < 3; ++i) {
      L->grid[i] = grid.at(i);
      L->block[i] = block.at(i);
    }
    L->nctas = L->grid[0] * L->grid[1] * L->grid[2];
    L->nthreads = L->block[0] * L->block[1] * L->block[2];
    L->shared_mem = shared_mem;
    L->memcheck = memcheck;
    L->racecheck = racecheck;
    for (auto& r : ranges) L->ranges.push_back(Range{std::get<0>(r), std::get<1>(r), std::get<2>(r)});
    py::gil_scoped_release nogil;
    return fmo_sim::launch(L, workers, timeout_s);
  }

  py::tuple symbol(const std::string& name) {
    void* p = dlsym(m_.handle, name.c_str());
    if (!p) return py::make_tuple(0, 0);
    Dl_info info;
    const ElfW(Sym)* sym = nullptr;
    std::size_t size = 0;
    if (dladdr1(p, &info, (void**)(&sym), RTLD_DL_SYMENT) && sym) size = sym->st_size;
    return py::make_tuple(reinterpret_cast<std::uintptr_t>(p), size);
  }

  std::size_t tls_size() const { return m_.tls_size; }

 private:
  Module m_;  // never dlclose'd: detached workers may still hold its TLS
};

// Cost of one fiber switch (there and back = 2 switches).
void* g_bench_sp;
void* g_fiber_sp;
void bench_body(Fiber*) {
  for (;;) fmo_sim_switch(&g_fiber_sp, g_bench_sp);
}

double switch_ns(long n) {
  Fiber* f = alloc_fiber();
  std::uintptr_t top = reinterpret_cast<std::uintptr_t>(f);  // the stack starts below the control block
  auto* sp = reinterpret_cast<std::uint64_t*>(top);
  *--sp = reinterpret_cast<std::uint64_t>(&fmo_sim_fiber_start);
  *--sp = 0;
  *--sp = 0;
  *--sp = reinterpret_cast<std::uint64_t>(f);
  *--sp = reinterpret_cast<std::uint64_t>(&bench_body);
  *--sp = 0;
  *--sp = 0;
  std::uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::uint64_t word;
  std::memcpy(&word, csr, 8);
  *--sp = word;
  g_fiber_sp = sp;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) fmo_sim_switch(&g_bench_sp, g_fiber_sp);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<Fiber*> v{f};
  free_fibers(v);
  return s * 1e9 / (2.0 * n);
}

}  // namespace
}  // namespace fmo_sim

PYBIND11_MODULE(_simrt, m) {
  m.doc() = "CPU SIMT simulator runtime of fastmoe-ops (see csrc/sim/runtime.h)";
  m.attr("ABI_VERSION") = fmo_sim::kAbiVersion;
  m.attr("DYNAMIC_SMEM_BYTES") = fmo_sim::kDynamicSmemBytes;
  py::class_<fmo_sim::PyModule>(m, "Module")
      .def(py::init<const std::string&>())
      .def("signature", &fmo_sim::PyModule::signature)
      .def("launch", &fmo_sim::PyModule::launch)
      .def("symbol", &fmo_sim::PyModule::symbol)
      .def_property_readonly("tls_size", &fmo_sim::PyModule::tls_size);
  m.def("switch_ns", &fmo_sim::switch_ns, py::arg("n") = 1000000);
}
