// The attention passes for __half inputs.
#include "passes_impl.cuh"

I2AM_INSTANTIATE_PASSES(__half)
