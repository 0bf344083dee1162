// qatx_run: loads a TorchScript model saved by qatx.export.torchscript and runs one input.
//
//   qatx_run MODEL (--input TENSOR.pt | --shape 1,3,32,32) [--expected TENSOR.pt [--atol A]]
//
// --input reads a tensor saved from Python with torch.save(tensor, path); --shape runs
// torch::ones of that shape. The outputs are printed (shape and first values). With --expected
// (a torch.save'd tensor) the exit status says whether every output element is within --atol
// (default 0: bit for bit) of it.
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "qatx/qatx.h"  // links libqatx, which registers the qatx ops the model calls

namespace {

at::Tensor read_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  for (std::string part; std::getline(ss, part, ',');) {
    const long long d = std::atoll(part.c_str());
    if (d <= 0) throw std::runtime_error("--shape: dimensions must be positive integers, got '" + text + "'");
    shape.push_back(d);
  }
  return shape;
}

int usage() {
  std::fprintf(stderr, "usage: qatx_run MODEL (--input TENSOR.pt | --shape D0,D1,...) [--expected TENSOR.pt [--atol A]]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string model_path = argv[1], input_path, shape_text, expected_path;
  double atol = 0.0;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    if (arg == "--input") input_path = argv[++i];
    else if (arg == "--shape") shape_text = argv[++i];
    else if (arg == "--expected") expected_path = argv[++i];
    else if (arg == "--atol") atol = std::atof(argv[++i]);
    else return usage();
  }
  if (input_path.empty() == shape_text.empty()) return usage();
  try {
    torch::jit::Module module = torch::jit::load(model_path);
    module.eval();
    const at::Tensor input = input_path.empty() ? torch::ones(parse_shape(shape_text)) : read_tensor(input_path);
    torch::NoGradGuard no_grad;
    const at::Tensor output = module.forward({input}).toTensor().contiguous();
    std::printf("qatx %lld, model %s, input %s -> output %s\n", static_cast<long long>(qatx::version()),
                model_path.c_str(), c10::str(input.sizes()).c_str(), c10::str(output.sizes()).c_str());
    const at::Tensor flat = output.to(at::kFloat).flatten();
    for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), 10); ++i) std::printf("%s%.7g", i ? " " : "", flat[i].item<float>());
    std::printf("%s\n", flat.numel() > 10 ? " ..." : "");
    if (expected_path.empty()) return 0;
    const at::Tensor expected = read_tensor(expected_path).to(at::kFloat);
    if (expected.sizes() != output.sizes()) {
      std::printf("FAIL: output shape %s, expected %s\n", c10::str(output.sizes()).c_str(), c10::str(expected.sizes()).c_str());
      return 1;
    }
    const double max_diff = (output.to(at::kFloat) - expected).abs().max().item<double>();
    const bool ok = max_diff <= atol;
    std::printf("max |output - expected| = %.3g (atol %.3g): %s\n", max_diff, atol, ok ? "OK" : "FAIL");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qatx_run: %s\n", e.what());
    return 1;
  }
}
