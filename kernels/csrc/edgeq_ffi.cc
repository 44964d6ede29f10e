// TVM FFI entry points of the edgeq kernels, called from Relax with R.call_dps_packed
// (destination-passing style: outputs come last, allocated by the VM). Linked into a
// compiled module.so next to TVM's generated code, so the module needs nothing else at
// run time. A convolution's parameters travel as the bytes of edgeq_conv_params; other
// operators' as one int32 and one float32 tensor in the order written above each entry.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <cstring>

#include "edgeq_kernels.h"

namespace {

using tvm::ffi::TensorView;

template <typename T>
T* data(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()));
}

enum ConvFlag { kHasResidual = 0, kDepthwise = 1 };

// The struct arrives as its own bytes (edgeq/kernels/native.py ConvParams.words()), so its
// field order is written only in edgeq_kernels.h and in that one Python class.
edgeq_conv_params conv_params(const TensorView& words, const TensorView& flags) {
  TVM_FFI_ICHECK_EQ(words.numel() * sizeof(int32_t), sizeof(edgeq_conv_params)) << "edgeq conv: parameter block of the wrong size";
  TVM_FFI_ICHECK_EQ(flags.numel(), 2) << "edgeq conv: wrong flag count";
  edgeq_conv_params p;
  std::memcpy(&p, data<int32_t>(words), sizeof(edgeq_conv_params));
  return p;
}

void conv(TensorView x, TensorView weights, TensorView wsum, TensorView multiplier, TensorView bias, TensorView words, TensorView flag_tensor,
          TensorView residual, float* out_float, uint8_t* out_codes) {
  const edgeq_conv_params p = conv_params(words, flag_tensor);
  const int32_t* flags = data<int32_t>(flag_tensor);
  const float* res = flags[kHasResidual] ? data<float>(residual) : nullptr;
  const int status = flags[kDepthwise]
                         ? edgeq_depthwise_conv2d(&p, data<uint8_t>(x), data<uint8_t>(weights), data<float>(multiplier), data<float>(bias), res, out_float,
                                                  out_codes)
                         : edgeq_conv2d(&p, data<uint8_t>(x), data<uint8_t>(weights), data<int32_t>(wsum), data<float>(multiplier), data<float>(bias), res,
                                        out_float, out_codes);
  TVM_FFI_ICHECK_EQ(status, 0) << "edgeq conv kernel rejected its parameters";
}

void conv2d_float(TensorView x, TensorView weights, TensorView wsum, TensorView multiplier, TensorView bias, TensorView words, TensorView flags,
                  TensorView residual, TensorView out) {
  conv(x, weights, wsum, multiplier, bias, words, flags, residual, data<float>(out), nullptr);
}

void conv2d_codes(TensorView x, TensorView weights, TensorView wsum, TensorView multiplier, TensorView bias, TensorView words, TensorView flags,
                  TensorView residual, TensorView out) {
  conv(x, weights, wsum, multiplier, bias, words, flags, residual, nullptr, data<uint8_t>(out));
}

// ints: channels, pixels, nchw_input, zero, qmin, qmax; floats: scale
void quantize(TensorView x, TensorView ints, TensorView floats, TensorView out) {
  const int32_t* i = data<int32_t>(ints);
  edgeq_quantize(data<float>(x), i[0], i[1], i[2], data<float>(floats)[0], i[3], i[4], i[5], data<uint8_t>(out));
}

// ints: in_h, in_w, c, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left
void max_pool(TensorView x, TensorView ints, TensorView out) {
  const int32_t* i = data<int32_t>(ints);
  edgeq_max_pool(data<float>(x), i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8], i[9], i[10], data<float>(out));
}

void max_pool_codes(TensorView x, TensorView ints, TensorView out) {
  const int32_t* i = data<int32_t>(ints);
  edgeq_max_pool_codes(data<uint8_t>(x), i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8], i[9], i[10], data<uint8_t>(out));
}

// ints: pixels, c
void global_average_pool(TensorView x, TensorView ints, TensorView out) {
  const int32_t* i = data<int32_t>(ints);
  edgeq_global_average_pool(data<float>(x), i[0], i[1], data<float>(out));
}

// floats: lo, hi
void add_clamp(TensorView a, TensorView b, TensorView floats, TensorView out) {
  const float* f = data<float>(floats);
  edgeq_add_clamp(data<float>(a), b.numel() == a.numel() ? data<float>(b) : nullptr, a.numel(), f[0], f[1], data<float>(out));
}

// The float operators share one signature (see edgeq_kernels.h); b is a one-element
// placeholder where the operator takes one operand.
#define EDGEQ_FLOAT_OP_ENTRY(op)                                                                                   \
  void op##_entry(TensorView a, TensorView b, TensorView ints, TensorView floats, TensorView out) {                \
    op(static_cast<const float*>(a.data_ptr()), data<float>(b), data<int32_t>(ints), data<float>(floats), data<float>(out));               \
  }
EDGEQ_FLOAT_OP_ENTRY(edgeq_strided_copy)
EDGEQ_FLOAT_OP_ENTRY(edgeq_concat)
EDGEQ_FLOAT_OP_ENTRY(edgeq_dequantize)
EDGEQ_FLOAT_OP_ENTRY(edgeq_binary)
EDGEQ_FLOAT_OP_ENTRY(edgeq_layer_norm)
EDGEQ_FLOAT_OP_ENTRY(edgeq_softmax)
EDGEQ_FLOAT_OP_ENTRY(edgeq_gelu)
EDGEQ_FLOAT_OP_ENTRY(edgeq_activation)
EDGEQ_FLOAT_OP_ENTRY(edgeq_matmul)
EDGEQ_FLOAT_OP_ENTRY(edgeq_matmul_codes)

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_conv2d_float, conv2d_float);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_conv2d_codes, conv2d_codes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_quantize, quantize);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_max_pool, max_pool);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_max_pool_codes, max_pool_codes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_global_average_pool, global_average_pool);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_add_clamp, add_clamp);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_strided_copy, edgeq_strided_copy_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_concat, edgeq_concat_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_dequantize, edgeq_dequantize_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_binary, edgeq_binary_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_layer_norm, edgeq_layer_norm_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_softmax, edgeq_softmax_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_gelu, edgeq_gelu_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_activation, edgeq_activation_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_matmul, edgeq_matmul_entry);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgeq_matmul_codes, edgeq_matmul_codes_entry);
