// Fine-tuning a scripted QAT model from C++: loads the training-mode LSQ model written by the
// Python tests (tests/python/test_export.py), runs SGD steps with torch::optim, and checks that
// the loss decreases and the learned weight scales change. Skipped when the fixture is absent
// (run pytest first: `make test` does).
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <filesystem>
#include <string>
#include <vector>

#include "qatx/qatx.h"

namespace {

std::string fixture(const std::string& name) { return std::string(QATX_FIXTURE_DIR) + "/" + name; }

}  // namespace

TEST(Finetune, ScriptedLsqModelTrainsFromCpp) {
  const std::string path = fixture("mlp_lsq_train.pt");
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " is missing: run pytest tests/python/test_export.py first";
  torch::jit::Module module = torch::jit::load(path);
  module.train();
  std::vector<at::Tensor> params;
  std::vector<std::pair<std::string, at::Tensor>> scales;
  for (const auto& p : module.named_parameters()) {
    params.push_back(p.value);
    if (p.name.find("weight_quantizer.scale") != std::string::npos) scales.emplace_back(p.name, p.value.detach().clone());
  }
  ASSERT_EQ(scales.size(), 3u);  // one learned weight scale per Linear
  torch::manual_seed(0);
  const at::Tensor x = torch::randn({32, 32});
  const at::Tensor target = torch::randn({32, 10});
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.05));
  std::vector<double> losses;
  for (int step = 0; step < 20; ++step) {
    const at::Tensor loss = torch::mse_loss(module.forward({x}).toTensor(), target);
    opt.zero_grad();
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), losses.front());
  for (const auto& p : module.named_parameters()) {
    for (const auto& [name, before] : scales) {
      if (p.name == name) EXPECT_FALSE(torch::equal(p.value.detach(), before)) << name << " did not change";
    }
  }
}
