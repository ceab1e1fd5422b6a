// The Python module `qlora_kernels._C`. Importing it loads this library, whose static
// initializers register the ops below in torch's dispatcher; the module itself is empty.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
