// The Python module sora_kernels._C. It holds no Python functions: importing it
// runs the static TORCH_LIBRARY registrations, after which the ops live in
// torch.ops.sora_kernels. (Plain Python.h keeps the build free of pybind11.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sora_kernels compiled operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
