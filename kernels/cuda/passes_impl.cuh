// Definitions of the attention-pass launchers; each attention_<dtype>.cu instantiates them for
// one input type so the heavy units compile in parallel.
#pragma once

#include <string>

#include "errors.h"
#include "main_pass.cuh"
#include "passes.h"
#include "stats_pass.cuh"

namespace i2am {

template <class Kernel>
void launch(Kernel kernel, size_t smem, const Params& p, int n_record, cudaStream_t stream, const char* name) {
    // Above 48 KiB a kernel must opt in; fails on devices with less shared memory per block.
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               (std::string("reserving ") + std::to_string(smem) + " bytes of shared memory for " + name).c_str());
    launch_kernel(kernel, dim3(p.slots, p.heads, n_record), kThreads, smem, stream, p);
    check_launch(name);
}

template <class T, int D>
void launch_pass_for(Pass pass, const Params& p, int n_record, cudaStream_t stream) {
    if (pass == Pass::kStats)
        launch(stats_pass<T, D>, StatsSmem<T, D>::kBytes, p, n_record, stream, "stats_pass");
    else
        launch(main_pass<T, D>, MainSmem<T, D>::kBytes, p, n_record, stream, "main_pass");
}

template <class T>
void launch_attention_pass(Pass pass, const Params& p, int n_record, int head_dim, cudaStream_t stream) {
    switch (head_dim) {
        case 64: return launch_pass_for<T, 64>(pass, p, n_record, stream);
        case 128: return launch_pass_for<T, 128>(pass, p, n_record, stream);
        case 256: return launch_pass_for<T, 256>(pass, p, n_record, stream);
    }
    throw Error(I2AM_INTERNAL, "no kernel for head-dim bucket " + std::to_string(head_dim));
}

}  // namespace i2am

#define I2AM_INSTANTIATE_PASSES(T) \
    template void i2am::launch_attention_pass<T>(i2am::Pass, const i2am::Params&, int, int, cudaStream_t);
