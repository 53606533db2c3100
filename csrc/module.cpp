// The dvgs_fast._C Python module. It holds no functions: importing it loads this shared
// library, whose static initialisers (TORCH_LIBRARY* in csrc/ops, csrc/cpu, csrc/cuda)
// register the operators with the PyTorch dispatcher as torch.ops.dvgs_fast.*.
// Only the CPython limited API is used, so there is no dependency on libtorch_python.
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#ifndef DVGS_TORCH_VERSION
#define DVGS_TORCH_VERSION "unknown"
#endif

static struct PyModuleDef dvgs_fast_module = {
    PyModuleDef_HEAD_INIT, "_C", "dvgs_fast compiled operators (see torch.ops.dvgs_fast)", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

extern "C" PyObject* PyInit__C(void) {
  PyObject* m = PyModule_Create(&dvgs_fast_module);
  if (m == nullptr) return nullptr;
  // Build facts, read by dvgs_fast.build_info().
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", DVGS_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_VERSION", DVGS_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", DVGS_CUDA_ARCH_LIST) < 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", DVGS_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
