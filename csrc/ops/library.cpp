// Claims the tpswarp operator namespace; each op's schemas are in csrc/ops/<op>.cpp.
#include <torch/library.h>

TORCH_LIBRARY(tpswarp, m) {}
