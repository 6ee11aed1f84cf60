// Block-sparse attention over gathered key rows, forward and backward, for CPUs (the `cpu` backend).
//
// One call takes n rows (a query block of one sequence, or a whole-past prefix). Row r holds M = Q * H query
// rows q [M, D] (query i = t / H, its heads consecutive) and S key rows k [S, D], whose first v_dim columns are
// the values: first w selected past blocks of bs keys (slot j visible to every query where used[r, j]), then
// the diagonal keys, of which query i sees the first i + 1. A slot bias b[r, j] adds to the past slots' logits.
//
// Compared with SDPA on the same rows it multiplies the values over v_dim columns rather than D, skips the
// slots after a row's last used one and the diagonal keys no query of a tile sees, needs no additive mask,
// returns each key block's attention mass per query row, and takes the slot bias's gradient as the block
// sums of dlogits. Threads split the query rows in tiles of kTile; BLAS (torch's own) does the products.
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

// Column ranges of a tile: the past keys up to the last used slot, then the diagonal keys up to `width`
// (one range where every slot is in use). Slots after the last used one are never read.
struct Spans {
  int n = 0, begin[2], end[2];
  Spans(int used_end, int past, int width) {
    if (used_end == past) {
      add(0, width);
    } else {
      add(0, used_end);
      add(past, width);
    }
  }
  void add(int b, int e) {
    if (e > b) begin[n] = b, end[n++] = e;
  }
};

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
  T slot_bias(int r, int j) const { return bias == nullptr ? T(0) : bias[(size_t)r * slots + j]; }
  int used_slots(int r) const {  // one past the last used slot
    int j = slots;
    while (j > 0 && !slot_used(r, j - 1)) --j;
    return j;
  }
  const T* keys(int r) const { return k + (size_t)r * S * D; }

  // Scaled scores of query rows [t0, t0 + rows) of row r over the spans, in p [rows, S]
  void scores(int r, int t0, int rows, const Spans& spans, T* p) const {
    const T* qr = q + ((size_t)r * M + t0) * D;
    for (int i = 0; i < spans.n; ++i)
      matmul<T>(false, true, rows, spans.end[i] - spans.begin[i], D, scale, qr, D,
                keys(r) + (size_t)spans.begin[i] * D, D, T(0), p + spans.begin[i], S);
  }

  // The largest logit (score plus slot bias) query row t sees
  T max_logit(int r, int t, const T* p, int used_slots) const {
    using Vec = at::vec::Vectorized<T>;
    auto max = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
    T best = at::vec::reduce_all<T>(max, p + past(), visible(t) - past());  // its own key is always there
    for (int j = 0; j < used_slots; ++j)
      if (slot_used(r, j))
        best = std::max(best, at::vec::reduce_all<T>(max, p + j * block, block) + slot_bias(r, j));
    return best;
  }

  // p <- exp(logit - shift) over the keys query row t sees, 0 elsewhere in its spans -> their sum; each key
  // block's part of it in block_sums [mass_columns()] unless that is null
  T softmax_numerators(int r, int t, T* p, int used_slots, int width, T shift, T* block_sums = nullptr) const {
    const int end = visible(t);
    T sum = 0;
    for (int c = 0; c < mass_columns(); ++c) {
      T part = 0;
      T* seg = p + c * block;
      if (c < slots) {
        if (c < used_slots && slot_used(r, c))
          part = exp_sum<T>(seg, block, shift - slot_bias(r, c));
        else if (c < used_slots)
          std::fill(seg, seg + block, T(0));
      } else if (c * block < end) {
        part = exp_sum<T>(seg, std::min(end - c * block, block), shift);
      }
      sum += part;
      if (block_sums != nullptr) block_sums[c] = part;
    }
    std::fill(p + end, p + width, T(0));
    return sum;
  }
};

template <typename T>
void forward_rows(const Rows<T>& x, T* out, T* lse, T* mass) {
  using Vec = at::vec::Vectorized<T>;
  const int tiles = (x.M + kTile - 1) / kTile, columns = x.mass_columns();
  at::parallel_for(0, (int64_t)x.n * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer((size_t)kTile * x.S), inverse(kTile);
    T* p = buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int r = task / tiles, t0 = (task % tiles) * kTile, rows = std::min(kTile, x.M - t0);
      const int width = x.visible(t0 + rows - 1), used_slots = x.used_slots(r);
      const Spans spans(used_slots * x.block, x.past(), width);
      x.scores(r, t0, rows, spans, p);
      for (int t = 0; t < rows; ++t) {  // the numerators; the sums normalise the masses here, the output below
        const size_t row = (size_t)r * x.M + t0 + t;
        T* row_mass = mass + row * columns;
        const T shift = x.max_logit(r, t0 + t, p + (size_t)t * x.S, used_slots);
        const T sum = x.softmax_numerators(r, t0 + t, p + (size_t)t * x.S, used_slots, width, shift, row_mass);
        inverse[t] = T(1) / sum;
        for (int c = 0; c < columns; ++c) row_mass[c] *= inverse[t];
        lse[row] = shift + std::log(sum);
      }
      T* o = out + ((size_t)r * x.M + t0) * x.v_dim;
      for (int i = 0; i < spans.n; ++i)
        matmul<T>(false, false, rows, x.v_dim, spans.end[i] - spans.begin[i], T(1), p + spans.begin[i], x.S,
                  x.keys(r) + (size_t)spans.begin[i] * x.D, x.D, T(i > 0), o, x.v_dim);
      for (int t = 0; t < rows; ++t) {
        const T w = inverse[t];
        at::vec::map<T>([w](Vec v) { return v * Vec(w); }, o + (size_t)t * x.v_dim, o + (size_t)t * x.v_dim, x.v_dim);
      }
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

// d[j] <- p[j] * (d[j] - w) for j < n -> their sum
template <typename T>
T dlogits(const T* p, T* d, int n, T w) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(0), vw(w);
  int j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec g = Vec::loadu(p + j) * (Vec::loadu(d + j) - vw);
    g.store(d + j);
    acc += g;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
  for (; j < n; ++j) {
    d[j] = p[j] * (d[j] - w);
    sum += d[j];
  }
  return sum;
}

template <typename T>
void backward_rows(const Rows<T>& x, const T* out, const T* lse, const T* grad_out, T* grad_q, T* grad_k,
                   T* grad_bias) {
  const int tiles = (x.M + kTile - 1) / kTile;
  std::mutex lock;
  at::parallel_for(0, (int64_t)x.n * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs((size_t)kTile * x.S), grads((size_t)kTile * x.S), weights(kTile);
    RowGradients<T> acc(x, grad_k, grad_bias, lock);
    T *p = probs.data(), *dp = grads.data();
    for (int64_t task = begin; task < end; ++task) {
      const int r = task / tiles, t0 = (task % tiles) * kTile, rows = std::min(kTile, x.M - t0);
      const int width = x.visible(t0 + rows - 1), used_slots = x.used_slots(r);
      const Spans spans(used_slots * x.block, x.past(), width);
      const size_t row0 = (size_t)r * x.M + t0;
      const T *q = x.q + row0 * x.D, *k = x.keys(r), *dout = grad_out + row0 * x.v_dim;
      acc.start(r, width);
      x.scores(r, t0, rows, spans, p);
      for (int t = 0; t < rows; ++t) {
        x.softmax_numerators(r, t0 + t, p + (size_t)t * x.S, used_slots, width, lse[row0 + t]);
        weights[t] = at::vec::map2_reduce_all<T>([](auto a, auto b) { return a * b; },
                                                 [](auto a, auto b) { return a + b; }, dout + (size_t)t * x.v_dim,
                                                 out + (row0 + t) * x.v_dim, x.v_dim);
      }
      for (int i = 0; i < spans.n; ++i) {
        const int c0 = spans.begin[i], c = spans.end[i] - c0;
        matmul<T>(true, false, c, x.v_dim, rows, T(1), p + c0, x.S, dout, x.v_dim, T(1),
                  acc.dv.data() + (size_t)c0 * x.v_dim, x.v_dim);
        matmul<T>(false, true, rows, c, x.v_dim, T(1), dout, x.v_dim, k + (size_t)c0 * x.D, x.D, T(0), dp + c0, x.S);
      }
      for (int t = 0; t < rows; ++t) {  // dlogits = p * (dp - dO . O); a slot bias's gradient sums them
        const T *pt = p + (size_t)t * x.S;
        T* dt = dp + (size_t)t * x.S;
        for (int j = 0; j < used_slots; ++j)
          acc.db[j] += dlogits<T>(pt + j * x.block, dt + j * x.block, x.block, weights[t]);
        dlogits<T>(pt + x.past(), dt + x.past(), width - x.past(), weights[t]);
      }
      for (int i = 0; i < spans.n; ++i) {
        const int c0 = spans.begin[i], c = spans.end[i] - c0;
        matmul<T>(false, false, rows, x.D, c, x.scale, dp + c0, x.S, k + (size_t)c0 * x.D, x.D, T(i > 0),
                  grad_q + row0 * x.D, x.D);
        matmul<T>(true, false, c, x.D, rows, x.scale, dp + c0, x.S, q, x.D, T(1), acc.dk.data() + (size_t)c0 * x.D,
                  x.D);
      }
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
