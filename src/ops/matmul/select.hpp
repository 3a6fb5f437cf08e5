// The automatic choices of the matmul family, measured on the GPU (select.cpp has the numbers).
#pragma once

#include <string>

#include "ops/matmul/matmul.hpp"

namespace kiln::matmul_detail {

// The layout prepare_weight(w, automatic) builds for a weight of `format` on a device of `arch`.
WeightLayout prepared_layout_cuda(WeightFormat format, const std::string& arch);

}  // namespace kiln::matmul_detail
