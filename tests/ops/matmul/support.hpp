// Helpers shared by the matmul tests (GEMV, GEMM, fp8_native and prepared-weight paths).
#pragma once

#include <cstddef>
#include <vector>

#include "kiln/tensor.hpp"
#include "support/buffers.hpp"

namespace kiln::test {

// Random fp8 codes (`format` f8_e4m3fn or f8_e5m2) of values uniform in [-range, range): normals
// and subnormals, no NaN.
void fill_fp8(void* data, DType format, std::size_t n, Rng& rng, float range);

// ||got - want|| / ||want|| (Frobenius); infinity when got holds a NaN. Fails the test when the
// reference is all zeros, where the comparison could not fail.
double relative_error(const std::vector<float>& got, const std::vector<float>& want);

}  // namespace kiln::test
