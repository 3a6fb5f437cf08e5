// kiln: fused, shape-specialized GPU kernels for generative-model inference.
#pragma once

#include "kiln/activation.hpp"
#include "kiln/attention.hpp"
#include "kiln/conv2d.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/jit.hpp"
#include "kiln/matmul.hpp"
#include "kiln/norm.hpp"
#include "kiln/rope_flux.hpp"
#include "kiln/tensor.hpp"
