// The launch shared by the kernels of this library: optionally as a programmatic dependent of the previous
// kernel in the stream (Hopper and later), so its prologue overlaps that kernel's tail. The kernel itself
// must execute griddepcontrol.wait before it reads anything the previous kernel writes.
#pragma once

#include <cuda_runtime.h>

template <typename Kernel, typename Args>
cudaError_t launch_kernel(cudaLaunchConfig_t config, bool pdl, Kernel kernel, const Args& args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args);
}

// Dynamic shared memory past 48 KB (less the kernel's static) needs an opt-in per kernel, as large as the
// largest launch so far.
template <auto KERNEL>
cudaError_t allow_dynamic_smem(size_t bytes) {
  static size_t allowed = 0;
  if (bytes <= allowed) return cudaSuccess;
  const cudaError_t rc = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (rc == cudaSuccess) allowed = bytes;
  return rc;
}
