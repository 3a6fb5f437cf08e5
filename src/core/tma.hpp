// Host side of the Hopper bulk tensor copy (TMA): tensor maps encoded through the driver entry
// point that the CUDA runtime exposes, so kiln links no libcuda. Maps are written into
// TensorMapBytes members of kernel parameter structs (device/tensor_map.cuh).
#pragma once

#include <cstdint>
#include <span>

#include "device/tensor_map.cuh"
#include "kiln/tensor.hpp"

namespace kiln::tma {

// A tiled map of an f16/bf16 or byte (u8, fp8) tensor: dims innermost first, strides (in bytes) of
// every dim but the innermost, which is contiguous; boxes of `box` elements, swizzled by the box's
// row of box[0] elements (128, 64 or 32 bytes: the 128-, 64- or 32-byte swizzle), out-of-bounds
// elements read as zeros. Throws kiln::Error (invalid_argument) naming op and arg
// when the driver rejects the layout, and (unsupported) when the driver has no TMA.
TensorMapBytes tiled(const char* op, const char* arg, DType dtype, const void* base,
                     std::span<const std::uint64_t> dims, std::span<const std::uint64_t> strides,
                     std::span<const std::uint32_t> box);

// An im2col map of a 4-D channels-last f16/bf16 tensor x (dims C, W, H, N; strides of W, H, N in
// bytes) for a convolution with a square window: `channels` per pixel and `pixels` per load,
// window corners from -pad to pad - dilation (kernel - 1) on both spatial dims, traversal stride
// `stride`. 128-byte swizzle; pixels outside x read as zeros.
TensorMapBytes im2col(const char* op, const char* arg, DType dtype, const void* base,
                      std::span<const std::uint64_t, 4> dims,
                      std::span<const std::uint64_t, 3> strides, int channels, int pixels,
                      int kernel, int stride, int pad, int dilation);

// Whether a view suits a map with `inner` as its contiguous dim: a 16-byte aligned start, unit
// stride in `inner`, and the other strides multiples of 16 bytes below 2^40 (size-1 dims
// excepted).
bool compatible(const TensorView& t, int inner);

}  // namespace kiln::tma
