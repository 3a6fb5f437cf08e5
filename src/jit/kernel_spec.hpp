// A kernel request: which embedded source, which __global__ template, and its specialization.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "kiln/tensor.hpp"

namespace kiln::jit {

struct KernelSpec {
  // Embedded source path relative to src/, e.g. "ops/rope_flux/kernels/rope_flux.cuh".
  std::string source;
  // The __global__ function template, e.g. "kiln::rope_flux_kernel".
  std::string kernel;
  // Template arguments in order: {name, C++ value}, e.g. {"D", "128"}, {"Tin", "kiln::bf16"}.
  // An empty list names a plain (non-template) kernel.
  std::vector<std::pair<std::string, std::string>> params;
  // The only archs the kernel is written for (e.g. {"sm_90a"} for wgmma kernels); empty: every
  // arch. Asking for another arch is an "unsupported" error; warm-up and CI skip those pairs.
  std::vector<std::string> archs = {};

  // Whether the kernel is written for `arch`.
  bool targets(const std::string& arch) const;

  // "kiln::rope_flux_kernel<kiln::bf16, 128>": what NVRTC instantiates.
  std::string name_expression() const;
  // "kiln::rope_flux_kernel<Tin=kiln::bf16, D=128>": the specialization, for keys and logs.
  std::string key() const;
};

// The kernel-source type of a dtype: "float", "kiln::f16", "kiln::bf16", "kiln::e4m3" or
// "kiln::e5m2"; others throw kiln::Error (unsupported) naming `op`.
const char* cpp_type(const char* op, DType dtype);

// "true" or "false", for a bool template argument.
const char* cpp_bool(bool value);

}  // namespace kiln::jit
