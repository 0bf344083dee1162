// Entry point of the Python extension qatx._C. Importing it loads the shared object, whose
// static TORCH_LIBRARY blocks register the qatx ops; Python then reaches them as torch.ops.qatx.*.
// Only setup.py builds this file: the CMake library is for C++ programs.
#include <Python.h>

static struct PyModuleDef qatx_c_module = {PyModuleDef_HEAD_INIT, "_C", "qatx operator library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&qatx_c_module); }
