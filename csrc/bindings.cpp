// The only pybind11 file. Python passes raw pointers (tensor.data_ptr()) and sizes in a dict;
// simplenet_fast/_fused.py has checked every one of them before it gets here (STYLE.md).
#include <pybind11/pybind11.h>

#include <string>

#include "head.h"

namespace py = pybind11;
using simplenet_fast::DType;
using simplenet_fast::FusedHeadParams;

namespace {

template <typename T>
T* pointer(const py::dict& d, const char* key) {
  return reinterpret_cast<T*>(d[key].cast<uintptr_t>());
}

// A pointer only one device's kernel reads (head.h: the CPU kernel's pooling tables): null when
// the caller leaves it out.
template <typename T>
T* optional_pointer(const py::dict& d, const char* key) {
  return d.contains(key) ? pointer<T>(d, key) : nullptr;
}

int32_t int_field(const py::dict& d, const char* key) { return d[key].cast<int32_t>(); }

FusedHeadParams params_from_dict(const py::dict& d) {
  FusedHeadParams p{};
  p.batch = int_field(d, "batch");
  p.c2 = int_field(d, "c2");
  p.h2 = int_field(d, "h2");
  p.w2 = int_field(d, "w2");
  p.c3 = int_field(d, "c3");
  p.h3 = int_field(d, "h3");
  p.w3 = int_field(d, "w3");
  p.hidden = int_field(d, "hidden");
  p.feature_dtype = static_cast<DType>(int_field(d, "feature_dtype"));
  p.compute_dtype = static_cast<DType>(int_field(d, "compute_dtype"));
  p.negative_slope = d["negative_slope"].cast<float>();
  p.pool2 = {pointer<const int32_t>(d, "pool2_index"), pointer<const float>(d, "pool2_weight"),
             optional_pointer<const int64_t>(d, "pool2_offset"), optional_pointer<const int32_t>(d, "pool2_neighbour"),
             int_field(d, "pool2_columns"), int_field(d, "pool2_width")};
  p.pool3 = {pointer<const int32_t>(d, "pool3_index"), pointer<const float>(d, "pool3_weight"),
             optional_pointer<const int64_t>(d, "pool3_offset"), optional_pointer<const int32_t>(d, "pool3_neighbour"),
             int_field(d, "pool3_columns"), int_field(d, "pool3_width")};
  p.up_y = {pointer<const int32_t>(d, "up_y_i0"), pointer<const int32_t>(d, "up_y_i1"),
            pointer<const float>(d, "up_y_lambda1")};
  p.up_x = {pointer<const int32_t>(d, "up_x_i0"), pointer<const int32_t>(d, "up_x_i1"),
            pointer<const float>(d, "up_x_lambda1")};
  p.layer2 = pointer<const void>(d, "layer2");
  p.layer3 = pointer<const void>(d, "layer3");
  p.weight2 = pointer<const void>(d, "weight2");
  p.weight3 = pointer<const void>(d, "weight3");
  p.bias = pointer<const float>(d, "bias");
  p.w_out = pointer<const float>(d, "w_out");
  p.workspace = pointer<float>(d, "workspace");
  p.scores = pointer<float>(d, "scores");
  return p;
}

py::dict build_info() {
  py::dict info;
  info["cpu_isa"] = simplenet_fast::cpu_isa();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef SIMPLENET_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(SIMPLENET_FAST_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef SIMPLENET_FAST_SANITIZE
  info["sanitizers"] = true;
#else
  info["sanitizers"] = false;
#endif
  info["compiler"] = std::string(SIMPLENET_FAST_COMPILER);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "simplenet_fast compiled core: the fused SimpleNet head (SPEC.md section 4)";
  m.attr("MAX_HIDDEN_SPLITS") = simplenet_fast::kMaxHiddenSplits;  // sizes the workspace (head.h)
  m.def("build_info", &build_info, "What this binary was compiled with, and the CPU path it runs");
  m.def(
      "fused_head_cpu",
      [](const py::dict& d) {
        FusedHeadParams p = params_from_dict(d);
        py::gil_scoped_release release;
        simplenet_fast::fused_head_cpu(p);
      },
      "Fused head on the CPU; call simplenet_fast._fused instead, which checks the inputs");
  m.def("packed_weight_floats_cpu", &simplenet_fast::packed_weight_floats_cpu,
        "Floats of a [rows, depth] weight packed for fused_head_cpu (the running CPU path's layout)");
  m.def(
      "pack_weight_cpu",
      [](uintptr_t weight, int32_t rows, int32_t depth, uintptr_t packed) {
        py::gil_scoped_release release;
        simplenet_fast::pack_weight_cpu(reinterpret_cast<const float*>(weight), rows, depth,
                                        reinterpret_cast<float*>(packed));
      },
      "Packs a float32 [rows, depth] weight into a buffer of packed_weight_floats_cpu floats; call "
      "simplenet_fast._fused instead, which checks the inputs");
#ifdef SIMPLENET_FAST_WITH_CUDA
  m.def(
      "fused_head_cuda",
      [](const py::dict& d, uintptr_t stream) {
        FusedHeadParams p = params_from_dict(d);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = simplenet_fast::fused_head_cuda(p, reinterpret_cast<void*>(stream));
        }
        if (error != nullptr) throw std::runtime_error(std::string("fused_head_cuda: ") + error);
      },
      "Fused head on the GPU on the given stream; call simplenet_fast._fused instead");
#endif
}
