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
