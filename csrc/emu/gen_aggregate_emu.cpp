// The emulated build of gen_aggregate: the CUDA source itself, compiled for the CPU (csrc/simt.h).
#include "cuda/gen_aggregate_cuda.cu"
