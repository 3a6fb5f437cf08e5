// KILN_JIT_DUMP=<dir>: every specialization the process compiles is also written to <dir>, as
// DeepGEMM's JIT does, for reading the code ptxas saw and the code it made:
//   <stem>.cu     the translation unit with every embedded header pasted in, compilable alone
//   <stem>.ptx    the PTX ptxas compiled
//   <stem>.cubin  the cubin kiln loads
//   <stem>.sass   its disassembly (nvdisasm, else cuobjdump, from PATH or the CUDA toolkit)
//   <stem>.log    NVRTC's log with ptxas's report (registers, stack frame, spill bytes)
// stem = <kernel>.<arch>.<16 hex digits of the specialization's key>.
#pragma once

#include <string>

#include "jit/kernel_cache.hpp"
#include "jit/kernel_spec.hpp"

namespace kiln::jit {

// $KILN_JIT_DUMP, "" when unset.
std::string dump_dir_from_env();

// `#include "<spec.source>"` with every embedded source it includes pasted in place (each once,
// as #pragma once has it), then (for nvcc; NVRTC is given the name) a use of the specialization
// that instantiates it.
std::string translation_unit(const KernelSpec& spec);

// "kernel.sm_90a.0123456789abcdef": the file name of (spec, arch) in a dump folder, less its
// extension.
std::string dump_stem(const KernelSpec& spec, const std::string& arch);

// The disassembler KILN_JIT_DUMP runs on cubins: nvdisasm or cuobjdump found on PATH, else in
// $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda/bin; "" when there is none.
const std::string& disassembler();

// Writes the files of one compile into `dir` (created if missing). Returns "" or what failed;
// a missing disassembler is not a failure (no .sass, and one log line per process says why).
std::string write_dump(const std::string& dir, const KernelSpec& spec, const Cubin& cubin,
                       const std::string& ptx, const std::string& log);

}  // namespace kiln::jit
