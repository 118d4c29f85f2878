// Trainable parameters as one flat allocation (llm.c style): every tensor is a named slice of
// `value`, with its gradient at the same offset in `grad`. The optimizer and checkpoints see one
// array; the router and the relaxed cache see their slices.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

namespace dk {

template <typename T>
class ParamStore {
 public:
  struct Tensor {
    std::string name;
    size_t offset = 0;
    size_t size = 0;
    bool decay = true;       // AdamW weight decay applies (matrices yes, biases and offsets no)
    double lr_scale = 1.0;   // this tensor's learning rate relative to the schedule's
  };

  // Reserves a tensor of `size` numbers, zero-initialised; returns its index. Add every tensor
  // before taking pointers (adding reallocates).
  size_t Add(const std::string& name, size_t size, bool decay, double lr_scale = 1.0) {
    tensors_.push_back(Tensor{name, value_.size(), size, decay, lr_scale});
    value_.resize(value_.size() + size, T(0));
    grad_.resize(value_.size(), T(0));
    return tensors_.size() - 1;
  }
  T* value(size_t tensor) { return value_.data() + tensors_[tensor].offset; }
  const T* value(size_t tensor) const { return value_.data() + tensors_[tensor].offset; }
  T* grad(size_t tensor) { return grad_.data() + tensors_[tensor].offset; }
  void ZeroGrad() { std::fill(grad_.begin(), grad_.end(), T(0)); }

  size_t size() const { return value_.size(); }
  const std::vector<Tensor>& tensors() const { return tensors_; }
  std::vector<T>& values() { return value_; }
  const std::vector<T>& values() const { return value_; }
  std::vector<T>& grads() { return grad_; }

 private:
  std::vector<Tensor> tensors_;
  std::vector<T> value_, grad_;
};

}  // namespace dk
