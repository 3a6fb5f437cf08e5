// kiln::Error: the one exception type kiln throws. Its message names the op, the argument,
// what was expected and what came, e.g.
//   kiln::rope_flux: pe has shape [4096, 64, 2, 2], expected [4608, 64, 2, 2] (L = 4608, D/2 = 64)
#pragma once

#include <stdexcept>
#include <string>

namespace kiln {

enum class ErrorCode {
  invalid_argument,  // a shape, dtype, stride, device or value the op does not accept
  unsupported,       // a valid request kiln does not implement (e.g. no CUDA device)
  out_of_memory,     // a device or host allocation failed
  cuda_error,        // the CUDA runtime reported an error
  compile_error,     // NVRTC rejected a kernel; the message carries its log and specialization
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace kiln
