// The Python module ouroboros_kernels._C: importing it registers the ops (pool_ops.cpp);
// it adds a direct twin of each registered op and the build information.
//
// Direct twins: _C.pool_X takes the positional arguments of torch.ops.ouroboros_kernels.pool_X
// and runs the same C++ entry point, minus the dispatcher's per-call overhead (a few µs,
// which is most of a CPU step). The lookups also take three result buffers after their
// arguments (out_phrases, out_counts, out_slots: contiguous int32 [M, k, L], [M], [M, k] on
// the pool's device), write the result into them and return None; without them they
// return a new (phrases, counts, slots) tuple like the op.
//
// They are plain CPython METH_FASTCALL functions rather than pybind11 ones. A pool op is a
// few hundred ns of work, and in a decoding step it runs with cold caches (the model ran
// in between): measured over the benchmark's step, pybind11's generic argument machinery
// cost about 0.4 µs per call there, unpacking the tensors directly well under 0.05 µs.
// Errors from the checks come out as the same ValueError / TypeError as from the
// registered ops.
#include "pool.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <exception>
#include <string>

namespace {

using ouroboros::LookupOut;

void translate_exception() {
  try {
    throw;
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(nargs == expected, fn, ": expected ", expected,
                   " positional arguments, got ", nargs);
}

// A lookup twin takes `expected` arguments, or those and the three result buffers.
bool lookup_has_out(Py_ssize_t nargs, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(nargs == expected || nargs == expected + 3, fn, ": expected ", expected,
                   " positional arguments (or ", expected + 3,
                   " with out_phrases, out_counts, out_slots), got ", nargs);
  return nargs == expected + 3;
}

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a torch.Tensor, got ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

int64_t int_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(obj) && !PyBool_Check(obj), name, ": expected an int, got ",
                   Py_TYPE(obj)->tp_name);
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, name, ": out of the int64 range");
  }
  return value;
}

// The buffers args[0..3) of a lookup with out, or an empty LookupOut (allocate).
LookupOut lookup_out_args(PyObject* const* args, bool has_out) {
  if (!has_out) return {};
  return {tensor_arg(args[0], "out.phrases"), tensor_arg(args[1], "out.counts"),
          tensor_arg(args[2], "out.slots")};
}

// The result of a lookup twin: None when it wrote into the caller's buffers, else the
// new (phrases, counts, slots).
PyObject* lookup_result(LookupOut&& out, bool has_out) {
  if (has_out) Py_RETURN_NONE;
  PyObject* result = PyTuple_New(3);
  if (result == nullptr) return nullptr;
  at::Tensor* parts[3] = {&out.phrases, &out.counts, &out.slots};
  for (Py_ssize_t i = 0; i < 3; ++i) {
    PyObject* item = THPVariable_Wrap(std::move(*parts[i]));
    if (item == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, i, item);  // steals the reference
  }
  return result;
}

// Each twin: check the count, unpack, call; any C++ exception becomes a Python one.
template <typename Body>
PyObject* guarded(Body&& body) {
  try {
    return body();
  } catch (...) {
    translate_exception();
    return nullptr;
  }
}

PyObject* none() { Py_RETURN_NONE; }

// pool_insert(phrases, stamps, clock, keys, new_phrases)
PyObject* fast_insert(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 5, "pool_insert");
    at::Tensor phrases = tensor_arg(args[0], "phrases");
    at::Tensor stamps = tensor_arg(args[1], "stamps");
    at::Tensor clock = tensor_arg(args[2], "clock");
    ouroboros::pool_insert(phrases, stamps, clock, tensor_arg(args[3], "keys"),
                           tensor_arg(args[4], "new_phrases"));
    return none();
  });
}

// pool_lookup(phrases, stamps, keys, k[, out_phrases, out_counts, out_slots])
PyObject* fast_lookup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    const bool has_out = lookup_has_out(nargs, 4, "pool_lookup");
    LookupOut out = lookup_out_args(args + 4, has_out);
    ouroboros::pool_lookup(tensor_arg(args[0], "phrases"), tensor_arg(args[1], "stamps"),
                           tensor_arg(args[2], "keys"), int_arg(args[3], "k"), out);
    return lookup_result(std::move(out), has_out);
  });
}

// pool_refine(phrases, stamps, keys, slots, new_phrases)
PyObject* fast_refine(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 5, "pool_refine");
    at::Tensor phrases = tensor_arg(args[0], "phrases");
    at::Tensor stamps = tensor_arg(args[1], "stamps");
    ouroboros::pool_refine(phrases, stamps, tensor_arg(args[2], "keys"),
                           tensor_arg(args[3], "slots"), tensor_arg(args[4], "new_phrases"));
    return none();
  });
}

// The packed twins take the buffer and its dimensions first (as the ops do), so that a
// caller can bind them once (functools.partial) and pass only the step's arguments.

// pool_insert_packed(record, clock, capacity, phrase_len, keys, new_phrases)
PyObject* fast_insert_packed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 6, "pool_insert_packed");
    at::Tensor record = tensor_arg(args[0], "record");
    at::Tensor clock = tensor_arg(args[1], "clock");
    ouroboros::pool_insert_packed_cpu(record, clock, int_arg(args[2], "capacity"),
                                      int_arg(args[3], "phrase_len"), tensor_arg(args[4], "keys"),
                                      tensor_arg(args[5], "new_phrases"));
    return none();
  });
}

// pool_lookup_packed(record, capacity, phrase_len, keys, k[, out_phrases, out_counts,
//                    out_slots])
PyObject* fast_lookup_packed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    const bool has_out = lookup_has_out(nargs, 5, "pool_lookup_packed");
    LookupOut out = lookup_out_args(args + 5, has_out);
    ouroboros::pool_lookup_packed_cpu(tensor_arg(args[0], "record"), int_arg(args[1], "capacity"),
                                      int_arg(args[2], "phrase_len"), tensor_arg(args[3], "keys"),
                                      int_arg(args[4], "k"), out);
    return lookup_result(std::move(out), has_out);
  });
}

// pool_refine_packed(record, capacity, phrase_len, keys, slots, new_phrases)
PyObject* fast_refine_packed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 6, "pool_refine_packed");
    at::Tensor record = tensor_arg(args[0], "record");
    ouroboros::pool_refine_packed_cpu(record, int_arg(args[1], "capacity"),
                                      int_arg(args[2], "phrase_len"), tensor_arg(args[3], "keys"),
                                      tensor_arg(args[4], "slots"),
                                      tensor_arg(args[5], "new_phrases"));
    return none();
  });
}

template <typename F>
PyCFunction as_pycfunction(F* fn) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn));
}

PyMethodDef fast_methods[] = {
    {"pool_insert", as_pycfunction(fast_insert), METH_FASTCALL,
     "pool_insert(phrases, stamps, clock, keys, new_phrases): "
     "torch.ops.ouroboros_kernels.pool_insert without the dispatcher"},
    {"pool_lookup", as_pycfunction(fast_lookup), METH_FASTCALL,
     "pool_lookup(phrases, stamps, keys, k[, out_phrases, out_counts, out_slots]): "
     "torch.ops.ouroboros_kernels.pool_lookup without the dispatcher; with the three "
     "buffers (contiguous int32 [M, k, L], [M], [M, k]) it writes into them, returns None"},
    {"pool_refine", as_pycfunction(fast_refine), METH_FASTCALL,
     "pool_refine(phrases, stamps, keys, slots, new_phrases): "
     "torch.ops.ouroboros_kernels.pool_refine without the dispatcher"},
    {"pool_insert_packed", as_pycfunction(fast_insert_packed), METH_FASTCALL,
     "pool_insert_packed(record, clock, capacity, phrase_len, keys, new_phrases): "
     "torch.ops.ouroboros_kernels.pool_insert_packed without the dispatcher"},
    {"pool_lookup_packed", as_pycfunction(fast_lookup_packed), METH_FASTCALL,
     "pool_lookup_packed(record, capacity, phrase_len, keys, k[, out_phrases, out_counts, "
     "out_slots]): torch.ops.ouroboros_kernels.pool_lookup_packed without the dispatcher; "
     "with the three buffers it writes into them, returns None"},
    {"pool_refine_packed", as_pycfunction(fast_refine_packed), METH_FASTCALL,
     "pool_refine_packed(record, capacity, phrase_len, keys, slots, new_phrases): "
     "torch.ops.ouroboros_kernels.pool_refine_packed without the dispatcher"},
    {nullptr, nullptr, 0, nullptr}};

std::string torch_build_version() {
#if defined(TORCH_VERSION_MAJOR)
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Ouroboros candidate-pool ops (registered as torch.ops.ouroboros_kernels.*)";
#ifdef OUROBOROS_WITH_CUDA
  m.def("set_cuda_insert_cached", &ouroboros::set_cuda_insert_cached,
        "Experimental CUDA insert path: the leader warp keeps the key's row in registers");
  m.def("cuda_insert_cached", &ouroboros::cuda_insert_cached);
  m.attr("built_with_cuda") = true;
  const int64_t v = ouroboros::cuda_runtime_build_version();
  m.attr("cuda_version") = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_version") = pybind11::none();
#endif
  m.attr("torch_version") = torch_build_version();
  if (PyModule_AddFunctions(m.ptr(), fast_methods) != 0) throw pybind11::error_already_set();
}
