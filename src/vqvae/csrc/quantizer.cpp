// CPU kernels of vqvae's vector quantizer (src/vqvae/nearest.py builds this file with torch's
// cpp_extension on first use and falls back to PyTorch ops where it cannot).
//
// Key: B batch, D code dim, K codebook size, L positions per item (prod of the spatial shape S).
// nearest_codes: blocks of columns in parallel, each scored by a matmul and reduced to its per-column
// first maximum in one vectorised pass (torch.argmax over a block is not vectorised and costs as much as
// the matmul). gather_residual / residual_backward / scatter_sum: the loss's forward, backward and the
// EMA sums, one pass each over the (B, D, L) latents. All take float32 CPU tensors.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>

// For each column c of the (rows, n) block s (row stride ld): where a row beats best[c], take it. Strict >
// keeps the first maximum, and the first NaN wins, as torch.argmax does. Branch-free, so it vectorises
// across columns; compiled for AVX-512, AVX2 and plain x86-64, chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void column_argmax(const float* s, int64_t rows, int64_t n, int64_t ld, int32_t first_code,
                          float* best, int32_t* index) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = s + k * ld;
    const int32_t code = first_code + static_cast<int32_t>(k);
    for (int64_t c = 0; c < n; ++c) {
      const float v = row[c], b = best[c];
      const bool take = (v > b) | ((v != v) & (b == b));
      best[c] = take ? v : b;
      index[c] = take ? code : index[c];
    }
  }
}

// z (B, D, L) float32, any strides; e_aug (K, D+1) = [e, -|e|^2/2] -> codes (B, L) int64. A job is a
// block of at most `cols` positions, contiguous in (B, L) order: a slice of one item, or whole items.
torch::Tensor nearest_codes(torch::Tensor z, torch::Tensor e_aug, int64_t tile, int64_t cols) {
  const int64_t B = z.size(0), D = z.size(1), L = z.size(2), K = e_aug.size(0);
  const bool slices = L >= cols;
  const int64_t per_item = (L + cols - 1) / cols, items = slices ? 1 : cols / L;
  const int64_t jobs = slices ? B * per_item : (B + items - 1) / items;
  auto index = torch::empty({B * L}, z.options().dtype(torch::kInt));
  at::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
    auto z_aug = torch::empty({D + 1, cols}, z.options());  // a block of z's columns over a row of ones
    z_aug[D].fill_(1);
    auto scores = torch::empty({std::min(tile, K), cols}, z.options());
    std::vector<float> best(cols);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b0 = slices ? job / per_item : job * items, nb = std::min(items, B - b0);
      const int64_t l0 = slices ? (job % per_item) * cols : 0, nl = slices ? std::min(cols, L - l0) : L;
      const int64_t n = nb * nl;
      auto block = z_aug.narrow(1, 0, n);
      block.narrow(0, 0, D).view({D, nb, nl}).copy_(z.narrow(0, b0, nb).narrow(2, l0, nl).transpose(0, 1));
      int32_t* out = index.data_ptr<int32_t>() + b0 * L + l0;
      std::fill(best.begin(), best.begin() + n, -std::numeric_limits<float>::infinity());
      std::fill(out, out + n, 0);
      for (int64_t k0 = 0; k0 < K; k0 += tile) {
        const int64_t rows = std::min(tile, K - k0);
        auto s = scores.narrow(0, 0, rows).narrow(1, 0, n);
        at::mm_out(s, e_aug.narrow(0, k0, rows), block);  // (rows, n) scores
        column_argmax(s.data_ptr<float>(), rows, n, s.stride(0), static_cast<int32_t>(k0), best.data(), out);
      }
    }
  });
  return index.to(torch::kLong).view({B, L});
}

// Forward of the loss in one pass: z_q = codebook[codes] written channels-first, diff = z - z_q and the
// sum of diff^2. z (B, D, L), codebook (K, D), codes (B, L), all contiguous. z_q and diff live in one
// (2, B, D, L) buffer: `workspace` again once nothing else holds it (last step's z_q and gradient are
// gone), else a new one, returned for next time. glibc hands freed buffers this large back to the
// system, and faulting them in again page by page costs more than the gather itself.
std::vector<torch::Tensor> gather_residual(torch::Tensor z, torch::Tensor codebook, torch::Tensor codes,
                                           c10::optional<torch::Tensor> workspace) {
  const int64_t B = z.size(0), D = z.size(1), L = z.size(2), K = codebook.size(0);
  auto table = codebook.t().contiguous();  // (D, K): row d is dimension d of every code
  const bool reuse = workspace.has_value() && workspace->defined() && workspace->numel() == 2 * B * D * L &&
                     workspace->storage().use_count() == 1;
  auto both = reuse ? *workspace : torch::empty({2, B, D, L}, z.options());
  auto z_q = torch::empty({0}, z.options()).set_(both.storage(), 0, z.sizes(), z.strides());
  auto diff = torch::empty({0}, z.options()).set_(both.storage(), B * D * L, z.sizes(), z.strides());
  std::vector<double> partial(B * D);
  const float *zp = z.data_ptr<float>(), *tp = table.data_ptr<float>();
  const int64_t* cp = codes.data_ptr<int64_t>();
  float *qp = z_q.data_ptr<float>(), *rp = diff.data_ptr<float>();
  at::parallel_for(0, B * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = b * D + d
      const float* t = tp + (row % D) * K;
      const int64_t* c = cp + (row / D) * L;
      const float* zr = zp + row * L;
      float *q = qp + row * L, *r = rp + row * L;
      float acc = 0;
      #pragma omp simd reduction(+ : acc)
      for (int64_t l = 0; l < L; ++l) {
        const float e = t[c[l]], v = zr[l] - e;
        q[l] = e;
        r[l] = v;
        acc += v * v;
      }
      partial[row] = acc;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return {z_q, diff, torch::tensor(total, z.options().dtype(torch::kDouble)), both};
}

// sums[c[l], d0:d1] += v[d0:d1, l] for one item v (D, L), c (L), through a transposed tile of 64
// positions so that each add is a contiguous row.
static void add_to_codes(const float* v, const int64_t* c, int64_t D, int64_t L, int64_t d0, int64_t d1,
                         float* sums, float* tile) {
  const int64_t w = d1 - d0;
  for (int64_t l0 = 0; l0 < L; l0 += 64) {
    const int64_t n = std::min<int64_t>(64, L - l0);
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t j = 0; j < n; ++j) tile[j * w + (d - d0)] = v[d * L + l0 + j];
    for (int64_t j = 0; j < n; ++j) {
      float* dst = sums + c[l0 + j] * D + d0;
      const float* src = tile + j * w;
      for (int64_t i = 0; i < w; ++i) dst[i] += src[i];
    }
  }
}

// Sums of the vectors assigned to each code: values (B, D, L), codes (B, L) -> (K, D). Each thread owns
// a range of d, so no two write the same element.
torch::Tensor scatter_sum(torch::Tensor values, torch::Tensor codes, int64_t K) {
  const int64_t B = values.size(0), D = values.size(1), L = values.size(2);
  auto sums = torch::zeros({K, D}, values.options());
  const float* vp = values.data_ptr<float>();
  const int64_t* cp = codes.data_ptr<int64_t>();
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    std::vector<float> tile(64 * (d1 - d0));
    for (int64_t b = 0; b < B; ++b)
      add_to_codes(vp + b * D * L, cp + b * L, D, L, d0, d1, sums.data_ptr<float>(), tile.data());
  });
  return sums;
}

// Backward of the loss in one pass over diff (B, D, L): if want_sums, the sums of diff per code (K, D),
// read first; then diff <- grad_z_q + scale * diff in place (no grad_z_q: zero).
torch::Tensor residual_backward(torch::Tensor diff, torch::Tensor codes, c10::optional<torch::Tensor> grad_z_q,
                                double scale, int64_t K, bool want_sums) {
  const int64_t B = diff.size(0), D = diff.size(1), L = diff.size(2);
  auto sums = want_sums ? torch::zeros({K, D}, diff.options()) : torch::Tensor();
  float* rp = diff.data_ptr<float>();
  const float* gp = grad_z_q.has_value() ? grad_z_q->data_ptr<float>() : nullptr;
  const int64_t* cp = codes.data_ptr<int64_t>();
  const float k = static_cast<float>(scale);
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    std::vector<float> tile(64 * (d1 - d0));
    for (int64_t b = 0; b < B; ++b) {
      if (want_sums) add_to_codes(rp + b * D * L, cp + b * L, D, L, d0, d1, sums.data_ptr<float>(), tile.data());
      for (int64_t d = d0; d < d1; ++d) {
        float* r = rp + (b * D + d) * L;
        const float* g = gp ? gp + (b * D + d) * L : nullptr;
        for (int64_t l = 0; l < L; ++l) r[l] = (g ? g[l] : 0.0f) + k * r[l];
      }
    }
  });
  return sums;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nearest_codes", torch::wrap_pybind_function(nearest_codes), "nearest code of each column");
  m.def("gather_residual", torch::wrap_pybind_function(gather_residual), "z_q, z - z_q and sum (z - z_q)^2");
  m.def("scatter_sum", torch::wrap_pybind_function(scatter_sum), "sums of the vectors assigned to each code");
  m.def("residual_backward", torch::wrap_pybind_function(residual_backward), "backward of the loss, in place");
}
