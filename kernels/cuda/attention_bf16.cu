// The attention passes for __nv_bfloat16 inputs.
#include "passes_impl.cuh"

I2AM_INSTANTIATE_PASSES(__nv_bfloat16)
