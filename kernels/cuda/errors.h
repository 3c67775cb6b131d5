// Errors inside the library are exceptions; the C entry points turn them into status codes
// and a message for i2am_last_error().
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "i2am_cuda.h"

namespace i2am {

struct Error : std::runtime_error {
    int status;
    Error(int status, const std::string& what) : std::runtime_error(what), status(status) {}
};

inline void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw Error(I2AM_CUDA_ERROR, std::string(what) + " failed: " + cudaGetErrorName(e) + " (" +
                                         cudaGetErrorString(e) + ")");
}

// After a kernel launch: launch-configuration errors and earlier asynchronous faults.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace i2am
