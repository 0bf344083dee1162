// Entry point of the Python extension qatx._C. Importing it loads the shared object, whose
// static TORCH_LIBRARY blocks register the qatx ops; Python then reaches them as torch.ops.qatx.*.
// Its own functions control the CPU output cache (qatx/ops/output_memory.h).
// Only setup.py builds this file: the CMake library is for C++ programs.
#include <Python.h>

#include "qatx/ops/output_memory.h"

namespace {

PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  const qatx::ops::CpuCacheStats s = qatx::ops::cpu_cache_stats();
  return Py_BuildValue("(LLLL)", static_cast<long long>(s.cached_bytes), static_cast<long long>(s.limit_bytes),
                       static_cast<long long>(s.reused), static_cast<long long>(s.allocated));
}

PyObject* set_cpu_cache_limit(PyObject*, PyObject* arg) {
  const long long limit = PyLong_AsLongLong(arg);
  if (limit == -1 && PyErr_Occurred()) return nullptr;
  if (limit < 0) {
    PyErr_Format(PyExc_ValueError, "limit_bytes must be >= 0, got %lld", limit);
    return nullptr;
  }
  return PyLong_FromLongLong(qatx::ops::set_cpu_cache_limit(limit));
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) { return PyLong_FromLongLong(qatx::ops::empty_cpu_cache()); }

PyMethodDef methods[] = {
    {"cpu_cache_stats", cpu_cache_stats, METH_NOARGS, "(cached_bytes, limit_bytes, reused, allocated)"},
    {"set_cpu_cache_limit", set_cpu_cache_limit, METH_O, "Sets the limit in bytes; returns the previous one."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the cached blocks; returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef qatx_c_module = {PyModuleDef_HEAD_INIT, "_C", "qatx operator library", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&qatx_c_module); }
