// CUDA implementations of the epilogue schemas declared in csrc/ops.cpp (epilogue_op.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "vae/epilogue_cuda.h"
#include "vae/epilogue_op.h"

namespace sora_kernels {
namespace {

vae::FloatType float_type(at::ScalarType t) {
  return t == at::kFloat ? vae::FloatType::kFloat32
                         : t == at::kHalf ? vae::FloatType::kFloat16 : vae::FloatType::kBFloat16;
}

at::Tensor frames_to_uint8_cuda_op(const at::Tensor& video) {
  vae::check_frames(video, /*float32_only=*/false);
  const c10::cuda::CUDAGuard guard(video.device());
  const at::Tensor x = video.contiguous();
  at::Tensor out = at::empty({x.size(1), x.size(2), x.size(3), x.size(0)}, x.options().dtype(at::kByte));
  const int err = vae::launch_frames_to_uint8_cuda(x.data_ptr(), float_type(x.scalar_type()), out.data_ptr<uint8_t>(),
                                                   x.size(0), x.size(1) * x.size(2) * x.size(3),
                                                   at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "frames_to_uint8 kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_denorm_cuda_op(const at::Tensor& z, const at::Tensor& scale,
                                                         const at::Tensor& shift) {
  vae::check_latent(z, scale, shift, /*float32_only=*/false);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), k = scale.contiguous(), m = shift.contiguous();
  at::Tensor out = at::empty_like(zc);
  at::Tensor nan = at::zeros({z.size(0), z.size(2)}, z.options().dtype(at::kInt));
  const int err = vae::launch_latent_denorm_cuda(zc.data_ptr(), out.data_ptr(), float_type(zc.scalar_type()),
                                                 k.data_ptr<float>(), m.data_ptr<float>(), nan.data_ptr<int32_t>(),
                                                 z.size(0), z.size(1), z.size(2), z.size(3) * z.size(4),
                                                 at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "latent_denorm kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {out, nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(sora_kernels, CUDA, m) {
  m.impl("frames_to_uint8", frames_to_uint8_cuda_op);
  m.impl("latent_denorm", latent_denorm_cuda_op);
}

}  // namespace sora_kernels
