// pybind11 bindings of the fused kernels as megatron_lpa._C; the kernels live in the .cu files.

#include <torch/extension.h>

#include "lpa_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lpa fused CUDA kernels (see megatron_lpa/ops for the Python side)";
  m.def("cross_entropy_stats", &cross_entropy_stats, "per-row max, sum of exp, label logit",
        py::arg("logits"), py::arg("labels"), py::arg("vocab_start"));
  m.def("cross_entropy_backward", &cross_entropy_backward, "(softmax - one_hot) * grad",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("grad"),
        py::arg("vocab_start"));
  m.def("rope", &rope, "rotary embedding (or its transpose with backward=True)", py::arg("t"),
        py::arg("freqs"), py::arg("interleaved"), py::arg("backward"));
  m.def("rms_norm_forward", &rms_norm_forward, "x * rsqrt(mean(x^2) + eps) * weight, and rstd",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_backward", &rms_norm_backward, "input and weight gradients of rms_norm",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("rstd"));
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up", py::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, "input gradient of swiglu", py::arg("grad"),
        py::arg("x"));
}
