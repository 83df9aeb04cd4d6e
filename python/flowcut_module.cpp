// flowcut_kernels._C: the Python module of the native backend.
// Importing it loads the op library linked into it (csrc/ops.cpp registers torch.ops.flowcut.native_*
// when the shared object is loaded) and exposes how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

// The build passes bare tokens (-DFLOWCUT_VERSION=0.1.0 -DFLOWCUT_CUDA_ARCHS=sm_80,sm_90,compute_90: the
// machine code and PTX targets of the CUDA kernels), stringified here so that no quoting has to survive the
// shell and ninja.
#ifndef FLOWCUT_VERSION
#error "FLOWCUT_VERSION must be defined by the build (setup.py or CMakeLists.txt)"
#endif
#ifndef FLOWCUT_WITH_CUDA
#define FLOWCUT_WITH_CUDA 0
#endif
#ifndef FLOWCUT_CUDA_ARCHS
#define FLOWCUT_CUDA_ARCHS
#endif
#define FLOWCUT_STR_(...) #__VA_ARGS__
#define FLOWCUT_STR(...) FLOWCUT_STR_(__VA_ARGS__)

namespace {

// "sm_80,sm_90,compute_90" -> ["sm_80", "sm_90", "compute_90"]
std::vector<std::string> split_archs(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "flowcut_kernels native backend: torch.ops.flowcut.native_flow_scores / native_select_gather, their "
      "packed forms native_flow_scores_varlen / native_select_gather_varlen, and the generic primitives "
      "native_attention_scores / native_text_guided_scores / native_topk_select / native_merge_nearest";
  m.attr("__version__") = FLOWCUT_STR(FLOWCUT_VERSION);
  m.attr("WITH_CUDA") = bool(FLOWCUT_WITH_CUDA);
  m.attr("CUDA_ARCHS") = split_archs(FLOWCUT_STR(FLOWCUT_CUDA_ARCHS));
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["version"] = FLOWCUT_STR(FLOWCUT_VERSION);
        info["with_cuda"] = bool(FLOWCUT_WITH_CUDA);
        info["cuda_archs"] = split_archs(FLOWCUT_STR(FLOWCUT_CUDA_ARCHS));
        return info;
      },
      "How the extension was built: {'version': str, 'with_cuda': bool, 'cuda_archs': [str, ...]}.");
}
