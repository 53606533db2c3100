// The dvgs_fast operator namespace. Each op declares its schema in its own file,
// csrc/ops/<op>.cpp, with TORCH_LIBRARY_FRAGMENT(dvgs_fast, m); its kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL), and its fake kernel and
// autograd in dvgs_fast/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(dvgs_fast, m) {}
