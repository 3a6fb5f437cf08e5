// kiln._C: the Python binding of kiln's C++ API (nanobind). Each op family binds itself in
// bindings/<family>.cpp; this file puts the parts together.
#include "common.hpp"

NB_MODULE(_C, m) {
  m.doc() = "kiln's C++ API; use the kiln package rather than this module.";
  kiln_python::bind_errors(m);
  kiln_python::bind_jit(m);
  kiln_python::bind_matmul(m);
  kiln_python::bind_rope_flux(m);
  kiln_python::bind_attention(m);
  kiln_python::bind_conv2d(m);
  kiln_python::bind_norm(m);
  kiln_python::bind_activation(m);
}
