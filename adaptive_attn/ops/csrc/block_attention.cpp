// Block-sparse attention over gathered key rows, forward and backward, for CPUs (the `cpu` backend).
//
// One call takes n rows (a query block of one sequence, or a whole-past prefix). Row r holds M = Q * H query
// rows q [M, D] (query i = t / H, its heads consecutive) and S key rows k [S, D], whose first v_dim columns are
// the values: first w selected past blocks of bs keys (slot j visible to every query where used[r, j]), then
// the diagonal keys, of which query i sees the first i + 1. A slot bias b[r, j] adds to the past slots' logits.
//
// Compared with SDPA on the same rows it multiplies the values over v_dim columns rather than D, skips
// unused slots and the causal diagonal's masked tiles, needs no additive mask, returns each key block's
// attention mass per query row, and takes the slot bias's gradient as the block sums of dlogits.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

constexpr int kTile = 64;  // query rows per task

// Row-major C [m, n] = alpha * op(A) [m, k] op(B) [k, n] + beta * C, through column-major BLAS (C^T = B^T A^T).
template <typename T>
void matmul(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
            T beta, T* c, int ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  else
    dgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// p[j] = exp(p[j] - shift) for j < n -> their sum
template <typename T>
T exp_sum(T* p, int n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(0), s(shift);
  int j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(p + j) - s).exp_u20();
    e.store(p + j);
    acc += e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - shift);
    sum += p[j];
  }
  return sum;
}

template <typename T>
T sum_of(const T* p, int n) {
  return at::vec::reduce_all<T>([](auto a, auto b) { return a + b; }, p, n);
}

template <typename T>
struct Rows {
  const T *q, *k, *bias;
  const bool* used;
  int n, M, S, D, v_dim, heads, slots, block;  // slots: the w past slots; block: keys per slot
  T scale;

  int past() const { return slots * block; }
  int visible(int t) const { return past() + t / heads + 1; }  // keys up to the last one query row t sees
  int mass_columns() const { return (S + block - 1) / block; }
  bool slot_used(int r, int j) const { return used == nullptr || used[(size_t)r * slots + j]; }

  // The logits of query rows [t0, t0 + rows) of row r, in p [rows, width] (ld S): scaled scores plus bias.
  void logits(int r, int t0, int rows, int width, T* p) const {
    matmul<T>(false, true, rows, width, D, scale, q + ((size_t)r * M + t0) * D, D, k + (size_t)r * S * D, D, T(0), p,
              S);
    if (bias == nullptr) return;
    for (int t = 0; t < rows; ++t)
      for (int j = 0; j < slots; ++j) {
        T b = bias[(size_t)r * slots + j];
        T* seg = p + (size_t)t * S + j * block;
        for (int s = 0; s < block; ++s) seg[s] += b;
      }
  }

  // exp(logit - shift) over the keys query row t sees, 0 elsewhere up to width -> their sum
  T softmax_numerators(int r, int t, T* p, int width, T shift) const {
    T sum = 0;
    for (int j = 0; j < slots; ++j) {
      T* seg = p + j * block;
      if (slot_used(r, j))
        sum += exp_sum<T>(seg, block, shift);
      else
        std::fill(seg, seg + block, T(0));
    }
    const int end = visible(t);
    sum += exp_sum<T>(p + past(), end - past(), shift);
    std::fill(p + end, p + width, T(0));
    return sum;
  }

  T max_logit(int r, int t, const T* p) const {
    using Vec = at::vec::Vectorized<T>;
    auto max = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
    T best = at::vec::reduce_all<T>(max, p + past(), visible(t) - past());  // its own key is always there
    for (int j = 0; j < slots; ++j)
      if (slot_used(r, j)) best = std::max(best, at::vec::reduce_all<T>(max, p + j * block, block));
    return best;
  }
};

template <typename T>
void forward_rows(const Rows<T>& x, T* out, T* lse, T* mass) {
  const int tiles = (x.M + kTile - 1) / kTile, columns = x.mass_columns();
  at::parallel_for(0, (int64_t)x.n * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer((size_t)kTile * x.S);
    T* p = buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int r = task / tiles, t0 = (task % tiles) * kTile, rows = std::min(kTile, x.M - t0);
      const int width = x.visible(t0 + rows - 1);
      x.logits(r, t0, rows, width, p);
      for (int t = 0; t < rows; ++t) {
        T* pt = p + (size_t)t * x.S;
        const size_t row = (size_t)r * x.M + t0 + t;
        const T shift = x.max_logit(r, t0 + t, pt);
        const T sum = x.softmax_numerators(r, t0 + t, pt, width, shift);
        const T inverse = T(1) / sum;
        at::vec::map<T>([inverse](auto v) { return v * at::vec::Vectorized<T>(inverse); }, pt, pt, width);
        lse[row] = shift + std::log(sum);
        for (int c = 0; c < columns; ++c) {
          const int start = c * x.block, stop = std::min(width, start + x.block);
          mass[row * columns + c] = stop > start ? sum_of<T>(pt + start, stop - start) : T(0);
        }
      }
      matmul<T>(false, false, rows, x.v_dim, width, T(1), p, x.S, x.k + (size_t)r * x.S * x.D, x.D, T(0),
                out + ((size_t)r * x.M + t0) * x.v_dim, x.v_dim);
    }
  });
}

// One thread's gradients of the keys and the bias of the row it is working on, added to the outputs when it
// moves to another row (two threads may share a row).
template <typename T>
struct RowGradients {
  const Rows<T>& x;
  T *grad_k, *grad_bias;
  std::mutex& lock;
  std::vector<T> dk, dv, db;
  int row = -1, width = 0;

  RowGradients(const Rows<T>& x, T* grad_k, T* grad_bias, std::mutex& lock)
      : x(x), grad_k(grad_k), grad_bias(grad_bias), lock(lock), dk((size_t)x.S * x.D), dv((size_t)x.S * x.v_dim),
        db(x.slots) {}

  void start(int r, int w) {
    if (r != row) {
      flush();
      row = r;
      width = 0;
      std::fill(dk.begin(), dk.end(), T(0));
      std::fill(dv.begin(), dv.end(), T(0));
      std::fill(db.begin(), db.end(), T(0));
    }
    width = std::max(width, w);
  }

  void flush() {
    if (row < 0) return;
    std::lock_guard<std::mutex> guard(lock);
    T* gk = grad_k + (size_t)row * x.S * x.D;
    for (int s = 0; s < width; ++s) {
      for (int c = 0; c < x.D; ++c) gk[(size_t)s * x.D + c] += dk[(size_t)s * x.D + c];
      for (int c = 0; c < x.v_dim; ++c) gk[(size_t)s * x.D + c] += dv[(size_t)s * x.v_dim + c];
    }
    if (grad_bias != nullptr)
      for (int j = 0; j < x.slots; ++j) grad_bias[(size_t)row * x.slots + j] += db[j];
  }
};

template <typename T>
void backward_rows(const Rows<T>& x, const T* out, const T* lse, const T* grad_out, T* grad_q, T* grad_k,
                   T* grad_bias) {
  const int tiles = (x.M + kTile - 1) / kTile;
  std::mutex lock;
  at::parallel_for(0, (int64_t)x.n * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs((size_t)kTile * x.S), dlogits((size_t)kTile * x.S), weights(kTile);
    RowGradients<T> acc(x, grad_k, grad_bias, lock);
    T *p = probs.data(), *dp = dlogits.data();
    for (int64_t task = begin; task < end; ++task) {
      const int r = task / tiles, t0 = (task % tiles) * kTile, rows = std::min(kTile, x.M - t0);
      const int width = x.visible(t0 + rows - 1);
      const size_t row0 = (size_t)r * x.M + t0;
      const T *q = x.q + row0 * x.D, *k = x.k + (size_t)r * x.S * x.D, *dout = grad_out + row0 * x.v_dim;
      acc.start(r, width);
      x.logits(r, t0, rows, width, p);
      for (int t = 0; t < rows; ++t) {
        x.softmax_numerators(r, t0 + t, p + (size_t)t * x.S, width, lse[row0 + t]);
        weights[t] = at::vec::map2_reduce_all<T>([](auto a, auto b) { return a * b; },
                                                 [](auto a, auto b) { return a + b; }, dout + (size_t)t * x.v_dim,
                                                 out + (row0 + t) * x.v_dim, x.v_dim);
      }
      matmul<T>(true, false, width, x.v_dim, rows, T(1), p, x.S, dout, x.v_dim, T(1), acc.dv.data(), x.v_dim);
      matmul<T>(false, true, rows, width, x.v_dim, T(1), dout, x.v_dim, k, x.D, T(0), dp, x.S);
      for (int t = 0; t < rows; ++t) {  // dlogits = p * (dp - dO . O)
        T *pt = p + (size_t)t * x.S, *dt = dp + (size_t)t * x.S;
        const T w = weights[t];
        at::vec::map2<T>([w](auto a, auto b) { return a * (b - at::vec::Vectorized<T>(w)); }, dt, pt, dt, width);
        if (grad_bias != nullptr)
          for (int j = 0; j < x.slots; ++j) acc.db[j] += sum_of<T>(dt + j * x.block, x.block);
      }
      matmul<T>(false, false, rows, x.D, width, x.scale, dp, x.S, k, x.D, T(0), grad_q + row0 * x.D, x.D);
      matmul<T>(true, false, width, x.D, rows, x.scale, dp, x.S, q, x.D, T(1), acc.dk.data(), x.D);
    }
    acc.flush();
  });
}

template <typename T>
Rows<T> rows_of(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& bias,
                const torch::Tensor& used, int64_t v_dim, int64_t heads, int64_t slots, int64_t block,
                double scale) {
  return Rows<T>{q.data_ptr<T>(), k.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr,
                 used.defined() ? used.data_ptr<bool>() : nullptr, (int)q.size(0), (int)q.size(1), (int)k.size(1),
                 (int)q.size(2), (int)v_dim, (int)heads, (int)slots, (int)block, (T)scale};
}

void check(const torch::Tensor& q, const torch::Tensor& k, int64_t v_dim, int64_t heads, int64_t slots,
           int64_t block) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && q.dim() == 3 && k.dim() == 3, "q, k: contiguous [n, M, D]");
  TORCH_CHECK(q.size(1) % heads == 0 && slots * block < k.size(1) && v_dim <= q.size(2), "bad row geometry");
  TORCH_CHECK(slots * block + q.size(1) / heads <= k.size(1), "a query's diagonal keys exceed the row");
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, std::optional<torch::Tensor> bias,
                                   std::optional<torch::Tensor> used, int64_t v_dim, int64_t heads, int64_t slots,
                                   int64_t block, double scale) {
  check(q, k, v_dim, heads, slots, block);
  const auto n = q.size(0), M = q.size(1), S = k.size(1);
  auto out = torch::empty({n, M, v_dim}, q.options());
  auto lse = torch::empty({n, M}, q.options());
  auto mass = torch::empty({n, M, (S + block - 1) / block}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_attention_forward", [&] {
    auto x = rows_of<scalar_t>(q, k, bias.value_or(torch::Tensor()), used.value_or(torch::Tensor()), v_dim, heads,
                               slots, block, scale);
    forward_rows<scalar_t>(x, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), mass.data_ptr<scalar_t>());
  });
  return {out, lse, mass};
}

std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, std::optional<torch::Tensor> bias,
                                    std::optional<torch::Tensor> used, torch::Tensor out, torch::Tensor lse,
                                    torch::Tensor grad_out, int64_t heads, int64_t slots, int64_t block,
                                    double scale) {
  check(q, k, out.size(2), heads, slots, block);
  auto grad_q = torch::empty_like(q), grad_k = torch::zeros_like(k);
  auto grad_bias = bias.has_value() ? torch::zeros_like(*bias) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_attention_backward", [&] {
    auto x = rows_of<scalar_t>(q, k, bias.value_or(torch::Tensor()), used.value_or(torch::Tensor()), out.size(2),
                               heads, slots, block, scale);
    backward_rows<scalar_t>(x, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                            grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                            bias.has_value() ? grad_bias.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_q, grad_k, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
