// CPU reference of conv2d: written to be read, not to be fast.
#include <vector>

#include "core/numeric.hpp"
#include "ops/conv2d/conv2d.hpp"

namespace kiln::conv2d_detail {

void reference(const TensorView& x, const TensorView& w, const std::optional<TensorView>& bias,
               const TensorView& out, const Conv2dOptions& options) {
  const std::int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::int64_t OC = w.size(0), KH = w.size(2), KW = w.size(3);
  const std::int64_t OH = out.size(2), OW = out.size(3);
  const auto [stride_h, stride_w] = options.stride;
  const auto [pad_h, pad_w] = options.padding;
  const auto [dil_h, dil_w] = options.dilation;

  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t oc = 0; oc < OC; ++oc) {
      const double b =
          bias ? numeric::load_float(bias->data(), bias->dtype(), oc * bias->stride(0)) : 0.0;
      for (std::int64_t oh = 0; oh < OH; ++oh) {
        for (std::int64_t ow = 0; ow < OW; ++ow) {
          // out[n, oc, oh, ow] = bias[oc] + sum_{c, kh, kw} x[n, c, ih, iw] * w[oc, c, kh, kw]
          // with ih = oh * stride - pad + kh * dilation (taps outside the image are zeros).
          double sum = b;
          for (std::int64_t c = 0; c < C; ++c) {
            for (std::int64_t kh = 0; kh < KH; ++kh) {
              const std::int64_t ih = oh * stride_h - pad_h + kh * dil_h;
              if (ih < 0 || ih >= H) continue;
              for (std::int64_t kw = 0; kw < KW; ++kw) {
                const std::int64_t iw = ow * stride_w - pad_w + kw * dil_w;
                if (iw < 0 || iw >= W) continue;
                const double xv = numeric::load_float(
                    x.data(), x.dtype(),
                    n * x.stride(0) + c * x.stride(1) + ih * x.stride(2) + iw * x.stride(3));
                const double wv = numeric::load_float(
                    w.data(), w.dtype(),
                    oc * w.stride(0) + c * w.stride(1) + kh * w.stride(2) + kw * w.stride(3));
                sum += xv * wv;
              }
            }
          }
          numeric::store_float(
              out.data(), out.dtype(),
              n * out.stride(0) + oc * out.stride(1) + oh * out.stride(2) + ow * out.stride(3),
              static_cast<float>(sum));
        }
      }
    }
  }
}

}  // namespace kiln::conv2d_detail
