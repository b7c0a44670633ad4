// The fast launch path (fastmoe_ops/runtime/fast_launch.py): a warm call of a public op
// looked up, allocated, patched and launched in C++, with no Python in between.
//
// A Table belongs to one op. Python, on a miss, runs the op's own path (validation,
// heuristics, Params: the single source of truth) and registers what it did under the
// call's signature: the outputs it allocated and the launches it made, each a Params
// template whose pointer fields are patched per call from the call's tensors. A hit
// replays exactly that. The signature (key) is built from:
//   - every argument: a plain torch.Tensor's dtype, sizes, strides, device, requires_grad
//     and the 16-byte alignment of its data pointer; None; bool / int / float / str by
//     exact type and value (128 and 128.0 and True are three keys); a torch.dtype;
//   - the state every launcher reads: every FMO_* variable of the environment (engine,
//     SM budget, trace, sync and checker switches), the `use_backend` override and the
//     SM-budget module's globals.
// Anything else (a tensor subclass, a list, a Python dispatch or function mode in force,
// grad mode with a tensor that requires grad) is no key: the op runs its Python path.
//
// Launch targets: `cuda` calls cuLaunchKernel (its address handed in from Python, so this
// file links against no CUDA library) with a CUfunction on torch's current stream; `sim`
// hands the Params bytes to a Python hook that launches on the simulator (its checkers
// and its benchmark switch live there).
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#ifdef FMO_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

extern char** environ;

namespace py = pybind11;

namespace {

// cuLaunchKernel(f, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedMemBytes, hStream,
// kernelParams, extra): CUresult is an int-sized enum, CUfunction and CUstream pointers.
using LaunchKernelFn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                               void**, void**);
LaunchKernelFn g_launch_kernel = nullptr;

// Set once by configure() and kept for the life of the process (handles, never released:
// a static py::object would be destroyed after the interpreter is gone).
py::handle g_sim_hook;       // hook(target, params: bytes, tensors: tuple) -> None
py::handle g_launch_error;   // the exception class a failed launch raises (fastmoe_ops LaunchError)
py::handle g_override;       // backends._override: the `use_backend` ContextVar
py::handle g_budget_globals; // fastmoe_ops.budget's module dict: _comm_sms, _in_flight

bool g_poison = false;  // tests: a hit's empty outputs start as 0xFF bytes (CPU)
int g_recording = 0;  // > 0 while Python records a miss: nested routed ops take their Python path
constexpr size_t kMaxPlans = 4096;  // token counts vary per batch: bound it, a miss is cheap

enum Tag : char { kTensor = 'T', kNone = 'N', kBool = 'B', kInt = 'I', kFloat = 'F', kStr = 'S', kDtype = 'D' };

struct Patch {
  int64_t offset;  // byte offset of the pointer field in Params
  bool output;     // the pointer comes from an output (else from an argument)
  int index;       // which argument / output
};

struct TensorRef {
  bool output;
  int index;
};

struct Launch {
  std::string params;  // the template: every field right but the patched pointers
  std::vector<Patch> patches;
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_mem;
  bool cuda;
  void* function;          // cuda: the CUfunction
  py::object sim_target;   // sim: what the hook launches
  std::vector<TensorRef> tensors;  // sim: the tensors the Params point into (memory checker)
  std::string name;
};

struct Output {
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
  at::Device device{at::kCPU};
  bool zero;
};

struct Plan {
  std::vector<Output> outputs;
  std::vector<Launch> launches;
  std::vector<int> result;  // which outputs the op returns, in order
  bool single;              // the op returns result[0] itself, not a tuple
};

// An output as the Python path makes it (torch.empty / torch.zeros, contiguous). CPU
// allocations skip the dispatcher (no Python mode is in force on a hit, so nothing would
// intercept it): that is most of what at::empty costs at decode sizes.
at::Tensor allocate(const Output& o) {
  at::Tensor t;
  if (o.device.is_cpu()) {
    t = at::detail::empty_cpu(o.sizes, o.dtype, /*pin_memory=*/false, at::MemoryFormat::Contiguous);
  } else {
    t = at::empty(o.sizes, at::TensorOptions().dtype(o.dtype).device(o.device));
  }
  if (o.zero) {
    t.zero_();
  } else if (g_poison && t.is_cpu()) {
    std::memset(t.data_ptr(), 0xFF, t.nbytes());  // NaN in every float format: an unwritten byte shows
  }
  return t;
}

template <typename T>
void put(std::string& key, T value) {
  key.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Every FMO_* entry of the process environment, as it stands now: os.environ writes go
// through putenv/unsetenv, so this sees what fastmoe_ops.env reads. One pass over environ
// is cheaper than a getenv per variable, and it covers variables added later.
void put_environment(std::string& key, bool& disabled) {
  for (char** e = environ; *e != nullptr; ++e) {
    const char* s = *e;
    if (s[0] == 'F' && s[1] == 'M' && s[2] == 'O' && s[3] == '_') {
      if (std::strncmp(s, "FMO_FAST_LAUNCH=", 16) == 0) {
        const char* v = s + 16;
        if (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "no") == 0 ||
            std::strcmp(v, "off") == 0) {
          disabled = true;
        }
      }
      key.append(s);
      key.push_back('\0');
    }
  }
}

bool put_scalar(std::string& key, PyObject* o) {
  PyTypeObject* type = Py_TYPE(o);
  if (o == Py_None) {
    key.push_back(kNone);
  } else if (type == &PyBool_Type) {
    key.push_back(kBool);
    key.push_back(o == Py_True ? 1 : 0);
  } else if (type == &PyLong_Type) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0) return false;
    key.push_back(kInt);
    put<long long>(key, v);
  } else if (type == &PyFloat_Type) {
    key.push_back(kFloat);  // by bits: a plan exists only for values validation accepted
    put<double>(key, PyFloat_AS_DOUBLE(o));
  } else if (THPDtype_Check(o)) {
    key.push_back(kDtype);
    put<int8_t>(key, static_cast<int8_t>(reinterpret_cast<THPDtype*>(o)->scalar_type));
  } else if (type == &PyUnicode_Type) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    key.push_back(kStr);
    put<Py_ssize_t>(key, n);
    key.append(s, n);
  } else {
    return false;
  }
  return true;
}

// The process state every launcher reads besides its arguments.
bool put_state(std::string& key, bool& disabled) {
  put_environment(key, disabled);
  key.push_back('|');
  PyObject* value = nullptr;
  if (PyContextVar_Get(g_override.ptr(), Py_None, &value) < 0) {
    PyErr_Clear();
    return false;
  }
  bool ok = put_scalar(key, value);
  Py_XDECREF(value);
  if (!ok) return false;
  PyObject* comm = PyDict_GetItemString(g_budget_globals.ptr(), "_comm_sms");      // borrowed
  PyObject* in_flight = PyDict_GetItemString(g_budget_globals.ptr(), "_in_flight");
  if (comm == nullptr || in_flight == nullptr || !put_scalar(key, comm) || !put_scalar(key, in_flight)) {
    return false;
  }
  return true;
}

// The call's key, or nullopt when the call is not one the table covers.
std::optional<std::string> make_key(PyObject* const* args, size_t nargs, std::vector<const at::Tensor*>& tensors,
                                    bool& disabled) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::impl::PythonTorchFunctionTLS::stack_len() > 0) {
    return std::nullopt;  // a Python mode intercepts torch calls: the Python path lets it
  }
  std::string key;
  key.reserve(256);
  if (!g_override || g_recording > 0 || !put_state(key, disabled) || disabled) return std::nullopt;
  const bool grad = at::GradMode::is_enabled();
  tensors.assign(nargs, nullptr);
  for (size_t i = 0; i < nargs; ++i) {
    PyObject* o = args[i];
    if (THPVariable_CheckExact(o)) {
      const at::Tensor& t = THPVariable_Unpack(o);
      if (t.layout() != at::kStrided || t.is_nested() || t.is_conj() || t.is_neg()) return std::nullopt;
      if (t.requires_grad() && grad) return std::nullopt;  // autograd builds a node: the Python path
      key.push_back(kTensor);
      put<int8_t>(key, static_cast<int8_t>(t.scalar_type()));
      put<int8_t>(key, static_cast<int8_t>(t.device().type()));
      put<int8_t>(key, t.device().index());
      put<int8_t>(key, t.requires_grad());
      put<int8_t>(key, (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0);
      put<int8_t>(key, static_cast<int8_t>(t.dim()));
      for (int64_t s : t.sizes()) put<int64_t>(key, s);
      for (int64_t s : t.strides()) put<int64_t>(key, s);
      tensors[i] = &t;
    } else if (!put_scalar(key, o)) {
      return std::nullopt;
    }
  }
  return key;
}

class Table {
 public:
  explicit Table(std::string name) : name_(std::move(name)) {}

  // The op's outputs on a hit; None on a miss (the caller runs the Python path).
  py::object call(PyObject* const* args, size_t nargs) {
    std::vector<const at::Tensor*> inputs;
    bool disabled = false;
    auto key = make_key(args, nargs, inputs, disabled);
    if (!key) return py::none();
    auto it = plans_.find(*key);
    if (it == plans_.end()) {
      ++misses_;
      return py::none();
    }
    ++hits_;
    const Plan& plan = it->second;
    std::vector<at::Tensor> outputs;
    outputs.reserve(plan.outputs.size());
    for (const Output& o : plan.outputs) outputs.push_back(allocate(o));
    for (const Launch& l : plan.launches) run(l, args, inputs, outputs);
    if (plan.single) return py::reinterpret_steal<py::object>(THPVariable_Wrap(outputs[plan.result[0]]));
    py::tuple out(plan.result.size());
    for (size_t i = 0; i < plan.result.size(); ++i) {
      out[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(outputs[plan.result[i]]));
    }
    return out;
  }

  // Whether a call with `args` has a key (what `register` would file it under).
  bool keyable(const py::args& args) {
    std::vector<const at::Tensor*> inputs;
    bool disabled = false;
    return make_key(PySequence_Fast_ITEMS(args.ptr()), args.size(), inputs, disabled).has_value();
  }

  // A builtin function object calling call(): CPython's vectorcall convention, without
  // pybind11's argument machinery (a third of a microsecond per call).
  py::object bound_call() {
    static PyMethodDef def = {"fast_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&Table::fast_call)),
                              METH_FASTCALL, "The op's outputs on a hit, else None."};
    py::capsule self(this);
    return py::reinterpret_steal<py::object>(PyCFunction_NewEx(&def, self.ptr(), nullptr));
  }

  // plan: (outputs, launches, result, single), lists of tuples built by fast_launch.py.
  bool add(const py::tuple& args, const py::tuple& spec) {
    std::vector<const at::Tensor*> inputs;
    bool disabled = false;
    auto key = make_key(PySequence_Fast_ITEMS(args.ptr()), args.size(), inputs, disabled);
    if (!key) return false;
    Plan plan;
    for (py::handle h : spec[0]) {
      auto o = h.cast<py::tuple>();
      Output out;
      out.sizes = o[0].cast<std::vector<int64_t>>();
      out.dtype = o[1].cast<at::ScalarType>();
      out.device = o[2].cast<at::Device>();
      out.zero = o[3].cast<bool>();
      plan.outputs.push_back(std::move(out));
    }
    for (py::handle h : spec[1]) {
      auto d = h.cast<py::tuple>();
      Launch l;
      l.name = d[0].cast<std::string>();
      l.params = d[1].cast<std::string>();
      for (py::handle p : d[2]) {
        auto t = p.cast<py::tuple>();
        Patch patch{t[0].cast<int64_t>(), t[1].cast<bool>(), t[2].cast<int>()};
        if (patch.offset < 0 || patch.offset + 8 > static_cast<int64_t>(l.params.size())) return false;
        l.patches.push_back(patch);
      }
      auto grid = d[3].cast<std::vector<unsigned>>();
      auto block = d[4].cast<std::vector<unsigned>>();
      if (grid.size() != 3 || block.size() != 3) return false;
      for (int i = 0; i < 3; ++i) l.grid[i] = grid[i], l.block[i] = block[i];
      l.shared_mem = d[5].cast<unsigned>();
      l.cuda = d[6].cast<bool>();
      if (l.cuda) {
        l.function = reinterpret_cast<void*>(d[7].cast<uintptr_t>());
      } else {
        l.function = nullptr;
        l.sim_target = py::reinterpret_borrow<py::object>(d[7]);
      }
      for (py::handle r : d[8]) {
        auto t = r.cast<py::tuple>();
        l.tensors.push_back({t[0].cast<bool>(), t[1].cast<int>()});
      }
      plan.launches.push_back(std::move(l));
    }
    plan.result = spec[2].cast<std::vector<int>>();
    plan.single = spec[3].cast<bool>();
    if (plan.result.empty()) return false;
    for (int r : plan.result) {
      if (r < 0 || r >= static_cast<int>(plan.outputs.size())) return false;
    }
    for (const Launch& l : plan.launches) {
      for (const Patch& p : l.patches) {
        int n = p.output ? static_cast<int>(plan.outputs.size()) : static_cast<int>(inputs.size());
        if (p.index < 0 || p.index >= n || (!p.output && inputs[p.index] == nullptr)) return false;
      }
    }
    if (plans_.size() >= kMaxPlans) plans_.clear();
    plans_[*key] = std::move(plan);
    return true;
  }

  void clear() { plans_.clear(); }
  size_t size() const { return plans_.size(); }
  py::tuple counts() const { return py::make_tuple(hits_, misses_); }
  const std::string& name() const { return name_; }

 private:
  static PyObject* fast_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    try {
      auto* table = static_cast<Table*>(PyCapsule_GetPointer(self, nullptr));
      return table->call(args, static_cast<size_t>(nargs)).release().ptr();
    } catch (py::error_already_set& e) {
      e.restore();
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
  }

  void run(const Launch& l, PyObject* const* args, const std::vector<const at::Tensor*>& inputs,
           const std::vector<at::Tensor>& outputs) {
    // Params are small (a few hundred bytes at most): a stack copy per launch.
    char buffer[1024];
    std::string heap;
    char* params = buffer;
    if (l.params.size() > sizeof(buffer)) {
      heap = l.params;
      params = heap.data();
    } else {
      std::memcpy(buffer, l.params.data(), l.params.size());
    }
    for (const Patch& p : l.patches) {
      void* ptr = p.output ? outputs[p.index].data_ptr() : inputs[p.index]->data_ptr();
      std::memcpy(params + p.offset, &ptr, sizeof(ptr));
    }
    if (l.cuda) {
      void* stream = nullptr;
#ifdef FMO_WITH_CUDA
      const at::Tensor& first = outputs.empty() ? *inputs[0] : outputs[0];
      if (first.is_cuda()) stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
#endif
      if (g_launch_kernel == nullptr) throw std::runtime_error(l.name + ": fast launch: no cuLaunchKernel registered");
      void* arg_ptrs[1] = {params};
      int rc = g_launch_kernel(l.function, l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2],
                               l.shared_mem, stream, arg_ptrs, nullptr);
      if (rc != 0) {
        PyErr_SetString(g_launch_error.ptr(),
                        (l.name + ": cuLaunchKernel failed (CUresult " + std::to_string(rc) + ")").c_str());
        throw py::error_already_set();
      }
      return;
    }
    py::tuple tensors(l.tensors.size());
    for (size_t i = 0; i < l.tensors.size(); ++i) {
      const TensorRef& r = l.tensors[i];
      tensors[i] = r.output ? py::reinterpret_steal<py::object>(THPVariable_Wrap(outputs[r.index]))
                            : py::reinterpret_borrow<py::object>(args[r.index]);
    }
    g_sim_hook(l.sim_target, py::bytes(params, l.params.size()), tensors);
  }

  std::string name_;
  std::unordered_map<std::string, Plan> plans_;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmoe_ops fast launch path (csrc/launcher/fast_launch.cpp)";
  py::class_<Table>(m, "Table")
      .def(py::init<std::string>())
      .def("bound_call", &Table::bound_call)
      .def("keyable", &Table::keyable)
      .def("add", &Table::add)
      .def("clear", &Table::clear)
      .def("__len__", &Table::size)
      .def("counts", &Table::counts)
      .def_property_readonly("name", &Table::name);
  m.def("configure", [](py::object sim_hook, py::object launch_error, py::object override_var, py::dict budget_globals) {
    g_sim_hook = sim_hook.release();
    g_launch_error = launch_error.release();
    g_override = override_var.release();
    g_budget_globals = budget_globals.release();
  });
  m.def("set_sim_hook", [](py::object hook) {
    auto previous = py::reinterpret_steal<py::object>(g_sim_hook);  // its reference passes to the caller
    g_sim_hook = hook.release();
    return previous;
  });
  m.def("poison_outputs", [](bool on) { g_poison = on; });
  m.def("recording", [](int delta) { g_recording += delta; });
  m.def("set_launch_kernel", [](uintptr_t address) { g_launch_kernel = reinterpret_cast<LaunchKernelFn>(address); });
  m.attr("with_cuda") =
#ifdef FMO_WITH_CUDA
      true;
#else
      false;
#endif
}
