// The attention passes for float inputs.
#include "passes_impl.cuh"

I2AM_INSTANTIATE_PASSES(float)
