// Fused CPU kernels of the reference backend's gathered conv (float32 rows).
//
// The pure-PyTorch path spends most of a sparse frame outside the GEMMs: about 35 small tensor
// ops per conv to find candidate pixels, build tap indices, gather, and run the nonlinear update
// with truncation. Each function here does one of those stages in a single pass over the active
// pixels; conv_rows / conv_act_rows / depthwise_rows do the whole conv (an implicit GEMM reading
// the taps in place, with the update in its epilogue) where AVX2 + FMA are available, else the
// GEMM stays a torch matmul. Semantics are the reference backend's (deltacnn/backends/reference.py),
// which the tests compare against.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Geometry {
  int64_t n, h, w, ho, wo, kh, kw, sh, sw, dh, dw, pt, pl;
};

Geometry geometry(const std::vector<int64_t>& g) {
  TORCH_CHECK(g.size() == 13, "geometry needs 13 integers");
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12]};
}

// A bool mask of `numel` elements, read as 0/1 bytes (the kernels OR them without normalising).
const uint8_t* mask_ptr(const torch::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBool && t.is_contiguous() && t.numel() == numel,
              name, " must be a contiguous bool mask of ", numel, " elements");
  return static_cast<const uint8_t*>(t.data_ptr());
}

// float32 rows of `c` channels: a row-contiguous matrix of at least `rows` rows (an ext matrix), or
// an (N, C, H, W) channels_last tensor with N*H*W == rows.
float* rows_ptr(const torch::Tensor& t, int64_t rows, int64_t c, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat, name, " must be float32");
  if (t.dim() == 2) {
    TORCH_CHECK(t.size(1) == c && t.stride(1) == 1 && t.stride(0) == c && t.size(0) >= rows,
                name, " must be a row-contiguous matrix of at least ", rows, " rows of ", c, " channels");
  } else {
    TORCH_CHECK(t.dim() == 4 && t.size(1) == c && t.size(0) * t.size(2) * t.size(3) == rows &&
                    t.is_contiguous(at::MemoryFormat::ChannelsLast),
                name, " must be a channels_last (N, ", c, ", H, W) tensor of ", rows, " pixels");
  }
  return t.data_ptr<float>();
}

// A new delta of (N, C, H, W), laid out as tensor.new_rows_ext does: its (N*H*W + 1, C) ext
// matrix (last row zero), the channels_last values view of the ext's first rows, and an
// all-false (N, 1, H, W) mask.
// (Three ATen ops, not seven: each costs ~1-2 us of dispatch, and every delta conv makes one.)
std::vector<torch::Tensor> new_delta(int64_t n, int64_t c, int64_t h, int64_t w) {
  auto ext = torch::empty({n * h * w + 1, c}, torch::kFloat);
  std::memset(ext.data_ptr<float>() + n * h * w * c, 0, sizeof(float) * c);
  auto values = ext.as_strided({n, c, h, w}, {h * w * c, 1, w * c, c});
  auto mask = torch::empty({n, 1, h, w}, torch::kBool);
  std::memset(mask.data_ptr(), 0, n * h * w);
  return {ext, values, mask};
}

uint8_t* mask_out(const torch::Tensor& mask) { return static_cast<uint8_t*>(mask.data_ptr()); }

// new_delta, or with `kept_ext` (a DeltaConvPlan's last output ext) that ext's memory again when no tensor but
// kept_ext uses it any more (its storage's use count: what Python gets is always a view of kept_ext, a tensor of
// its own, so a delta still alive anywhere, or any view of it, counts): a conv's output ext of more than
// glibc's mmap threshold (32 MB, e.g. CenterFace's 96-channel maps at 288 x 384) is otherwise fresh pages every
// frame, one ~2 us page fault per 4 KB its rows touch. Rows are undefined, as a new ext's; the zero row is
// zeroed again.
std::vector<torch::Tensor> output_delta(int64_t n, int64_t c, int64_t h, int64_t w, torch::Tensor* kept_ext) {
  if (kept_ext == nullptr) return new_delta(n, c, h, w);
  const int64_t total = n * h * w;
  if (!(kept_ext->defined() && kept_ext->storage().use_count() == 1 && kept_ext->size(0) == total + 1 &&
        kept_ext->size(1) == c))
    *kept_ext = new_delta(n, c, h, w)[0];
  auto ext = kept_ext->view({total + 1, c});
  std::memset(ext.data_ptr<float>() + total * c, 0, sizeof(float) * c);
  auto values = ext.as_strided({n, c, h, w}, {h * w * c, 1, w * c, c});
  auto mask = torch::empty({n, 1, h, w}, torch::kBool);
  std::memset(mask.data_ptr(), 0, total);
  return {ext, values, mask};
}

// A layer's last output ext kept between frames (see output_delta), for kernels called once a frame per layer
// outside a DeltaConvPlan: the input layer's sparsify, whose 5 MB delta of a 768 x 576 RGB frame is otherwise
// fresh pages every frame (glibc maps it anew), one page fault per 4 KB its sent pixels touch.
struct OutputBuffer {
  torch::Tensor kept;
};

// Flat indices of the set entries of `flags`, ascending; with `base`, the entries of base instead.
torch::Tensor compact(const uint8_t* __restrict flags, int64_t count_all, const int64_t* base = nullptr) {
  int64_t count = 0;
  for (int64_t i = 0; i < count_all; ++i) count += flags[i] != 0;
  auto idx = torch::empty({count}, torch::kLong);
  int64_t* ip = idx.data_ptr<int64_t>();
  int64_t i = 0, k = 0;
  for (; i + 8 <= count_all; i += 8) {  // skip 8 clear flags at a time (most of a sparse mask)
    uint64_t word;
    std::memcpy(&word, flags + i, 8);
    if (!word) continue;
    for (int64_t j = i; j < i + 8; ++j)
      if (flags[j]) ip[k++] = base ? base[j] : j;
  }
  for (; i < count_all; ++i)
    if (flags[i]) ip[k++] = base ? base[i] : i;
  return idx;
}

// Truncation score of a change row: 0 max |o|, 1 L2 norm.
template <int SCORE>
inline float row_score(const float* o, int64_t c) {
  float s = 0.f;
  if (SCORE == 0) {
#pragma omp simd reduction(max : s)
    for (int64_t j = 0; j < c; ++j) s = std::max(s, std::fabs(o[j]));
    return s;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < c; ++j) s += o[j] * o[j];
  return std::sqrt(s);
}

// Send change row o of pixel r: out row = o, state row += o (E, or the input layer's reference).
inline void send_row(const float* o, float* out, float* state, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    out[j] = o[j];
    state[j] += o[j];
  }
}

}  // namespace

// Candidate output pixels: the receptive-field dilation of `in_mask` ((N, 1, H, W) bool), OR
// `extra` ((N, 1, Ho, Wo) bool, optional). Returns (flat indices ascending, the (N, 1, Ho, Wo) mask).
// Separable: OR over the kernel's columns, then over its rows (out-of-bounds taps never count).
std::vector<torch::Tensor> candidates(torch::Tensor in_mask, c10::optional<torch::Tensor> extra,
                                      std::vector<int64_t> geo) {
  const Geometry g = geometry(geo);
  const uint8_t* __restrict m = mask_ptr(in_mask, g.n * g.h * g.w, "in_mask");
  const uint8_t* __restrict e = extra ? mask_ptr(*extra, g.n * g.ho * g.wo, "extra") : nullptr;
  std::unique_ptr<uint8_t[]> cols(new uint8_t[std::max<int64_t>(1, g.n * g.h * g.wo)]);  // no ATen op
  auto out = torch::empty({g.n, 1, g.ho, g.wo}, torch::kBool);
  uint8_t* __restrict c = cols.get();
  uint8_t* __restrict o = mask_out(out);
  // byte passes are cheap: threads only pay off on very large maps (waking them costs more)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, g.w));
  at::parallel_for(0, g.n * g.h, grain, [&](int64_t b, int64_t end) {
    // private copies: the lambda's captures are references, which byte stores could alias
    const int64_t w = g.w, wo = g.wo, kw = g.kw, sw = g.sw, dw = g.dw, pl = g.pl;
    for (int64_t r = b; r < end; ++r) {
      const uint8_t* __restrict row = m + r * w;
      uint8_t* __restrict crow = c + r * wo;
      std::memset(crow, 0, wo);
      uint8_t any = 0;
      for (int64_t ix = 0; ix < w; ++ix) any |= row[ix];
      if (!any) continue;  // most rows of a sparse mask
      for (int64_t kx = 0; kx < kw; ++kx) {
        // output columns whose tap kx lands inside the row: 0 <= ox * sw + off < w
        const int64_t off = kx * dw - pl;
        const int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
        const int64_t hi = std::min(wo, w - 1 - off >= 0 ? (w - 1 - off) / sw + 1 : 0);
        if (sw == 1) {
          for (int64_t ox = lo; ox < hi; ++ox) crow[ox] |= row[ox + off];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) crow[ox] |= row[ox * sw + off];
        }
      }
    }
  });
  at::parallel_for(0, g.n * g.ho, grain, [&](int64_t b, int64_t end) {
    const int64_t h = g.h, ho = g.ho, wo = g.wo, kh = g.kh, sh = g.sh, dh = g.dh, pt = g.pt;
    for (int64_t r = b; r < end; ++r) {
      const int64_t n = r / ho, oy = r % ho;
      uint8_t* __restrict orow = o + r * wo;
      std::memset(orow, 0, wo);
      for (int64_t ky = 0; ky < kh; ++ky) {
        const int64_t iy = oy * sh - pt + ky * dh;
        if (iy < 0 || iy >= h) continue;
        const uint8_t* __restrict crow = c + (n * h + iy) * wo;
        for (int64_t ox = 0; ox < wo; ++ox) orow[ox] |= crow[ox];
      }
      if (e) {
        const uint8_t* __restrict erow = e + r * wo;
        for (int64_t ox = 0; ox < wo; ++ox) orow[ox] |= erow[ox];
      }
    }
  });
  return {compact(o, g.n * g.ho * g.wo), out};
}

// Implicit-GEMM operand: row p holds, for each tap of output pixel idx[p], the Cin values of the
// input pixel it reads, or zeros where that pixel is outside the image or not updated.
// ext: the input delta's float32 rows (see rows_ptr; rows of non-updated pixels are never read).
torch::Tensor gather_taps(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx, std::vector<int64_t> geo) {
  const Geometry g = geometry(geo);
  const uint8_t* m = mask_ptr(in_mask, g.n * g.h * g.w, "in_mask");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  const int64_t cin = ext.size(1), taps = g.kh * g.kw, p_count = idx.numel();
  const float* x = rows_ptr(ext, g.n * g.h * g.w, cin, "ext");
  auto out = torch::empty({p_count, taps * cin}, torch::kFloat);
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const size_t row_bytes = sizeof(float) * cin;
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p) {
      const int64_t q = ip[p];
      const int64_t n = q / (g.ho * g.wo), rem = q % (g.ho * g.wo);
      const int64_t oy = rem / g.wo, ox = rem % g.wo;
      float* dst = op + p * taps * cin;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.pt + ky * g.dh;
        const bool vy = iy >= 0 && iy < g.h;
        const int64_t ix0 = ox * g.sw - g.pl;
        if (vy && g.dw == 1 && ix0 >= 0 && ix0 + g.kw <= g.w) {
          // the window row is kw neighbouring pixels, i.e. kw consecutive rows: one copy when all
          // are updated, one fill when none is (7 calls fewer per row for an RGB stem's 7x7 window)
          const int64_t src0 = (n * g.h + iy) * g.w + ix0;
          int64_t set = 0;
          for (int64_t kx = 0; kx < g.kw; ++kx) set += m[src0 + kx] != 0;
          if (set == g.kw || set == 0) {
            if (set) std::memcpy(dst, x + src0 * cin, row_bytes * g.kw);
            else std::memset(dst, 0, row_bytes * g.kw);
            dst += g.kw * cin;
            continue;
          }
        }
        for (int64_t kx = 0; kx < g.kw; ++kx, dst += cin) {
          const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
          const int64_t src = (n * g.h + iy) * g.w + ix;
          if (vy && ix >= 0 && ix < g.w && m[src])
            std::memcpy(dst, x + src * cin, row_bytes);
          else
            std::memset(dst, 0, row_bytes);
        }
      }
    }
  });
  return out;
}

namespace {

// Activation codes shared with cpu_kernels.py (ACT_CODES).
template <int CODE>
inline float activate(float a, float lo, float hi, float slope) {
  if (CODE == 1) return a > 0.f ? a : 0.f;                  // relu
  if (CODE == 2) return a < lo ? lo : (a > hi ? hi : a);    // hardtanh, relu6
  if (CODE == 3) return a > 0.f ? a : a * slope;            // leaky_relu
  return a;                                                 // identity
}

struct ActArgs {
  const float* y;
  const int64_t* idx;
  const float* res;
  const uint8_t* res_mask;
  float* acc;
  float* emitted;
  float* out;
  uint8_t* out_mask;
  uint8_t* keep;
  int64_t c;
  float lo, hi, slope, tau;
  bool by_pixel;  // y holds a full map's rows (indexed by pixel), not one row per candidate
};

// One candidate pixel p: A += v, o = f(A) - E into `o`; emit when the score passes tau.
// Templated on the activation and score so that the channel loops vectorise.
template <int CODE, int SCORE>
void act_pixel(const ActArgs& k, int64_t p, float* o) {
  const int64_t r = k.idx[p], c = k.c;
  const float* yr = k.y + (k.by_pixel ? r : p) * c;
  float* ar = k.acc + r * c;
  const float* er = k.emitted + r * c;
  if (k.res && k.res_mask[r]) {
    const float* rr = k.res + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) ar[j] += yr[j] + rr[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) ar[j] += yr[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) o[j] = activate<CODE>(ar[j], k.lo, k.hi, k.slope) - er[j];
  k.keep[p] = row_score<SCORE>(o, c) > k.tau;
  if (k.keep[p]) {
    send_row(o, k.out + r * c, k.emitted + r * c, c);
    k.out_mask[r] = 1;
  }
}

template <int CODE, int SCORE>
void act_range(const ActArgs& k, int64_t b, int64_t end) {
  std::vector<float> o(k.c);
  for (int64_t p = b; p < end; ++p) act_pixel<CODE, SCORE>(k, p, o.data());
}

template <int CODE>
void act_range_score(const ActArgs& k, int64_t score, int64_t b, int64_t end) {
  if (score == 0) act_range<CODE, 0>(k, b, end);
  else act_range<CODE, 1>(k, b, end);
}

}  // namespace

// Nonlinear update at candidate pixels idx with incoming change rows y (P, C), or with by_pixel
// a full map's rows (channels_last (N, C, H, W) or ext, a dense conv's output) indexed by pixel:
//   v = y (+ residual rows where res_mask), A += v, o = f(A) - E, emit where score(o) > tau,
//   E += o there. acc, emitted (and residual): channels_last (N, C, H, W) float32.
// Returns the emitted delta: [pixel indices (ascending, as idx is), ext, values, mask]
// (see new_delta). score: 0 max |o|, 1 L2 norm.
// (A += y + r rounds like the reference's A + (y + r): the sum y + r is formed first.)
std::vector<torch::Tensor> act_update(torch::Tensor y, torch::Tensor idx, c10::optional<torch::Tensor> residual,
                                      c10::optional<torch::Tensor> res_mask, torch::Tensor acc, torch::Tensor emitted,
                                      int64_t code, double lo, double hi, double slope, double tau, int64_t score,
                                      bool by_pixel) {
  TORCH_CHECK(emitted.dim() == 4, "emitted must be (N, C, H, W)");
  const int64_t n = emitted.size(0), c = emitted.size(1), h = emitted.size(2), w = emitted.size(3);
  const int64_t p_count = idx.numel(), total = n * h * w;
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  TORCH_CHECK(code >= 0 && code <= 3, "unknown activation code ", code);
  TORCH_CHECK(residual.has_value() == res_mask.has_value(), "residual and res_mask come together");
  auto out = new_delta(n, c, h, w);
  std::vector<uint8_t> keep(p_count);
  const ActArgs k{rows_ptr(y, by_pixel ? total : p_count, c, "y"), idx.data_ptr<int64_t>(),
                  residual ? rows_ptr(*residual, total, c, "residual") : nullptr,
                  res_mask ? mask_ptr(*res_mask, total, "res_mask") : nullptr, rows_ptr(acc, total, c, "acc"),
                  rows_ptr(emitted, total, c, "emitted"), out[0].data_ptr<float>(), mask_out(out[2]), keep.data(),
                  c, static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(slope),
                  static_cast<float>(tau), by_pixel};
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    switch (code) {
      case 1: act_range_score<1>(k, score, b, end); break;
      case 2: act_range_score<2>(k, score, b, end); break;
      case 3: act_range_score<3>(k, score, b, end); break;
      default: act_range_score<0>(k, score, b, end); break;
    }
  });
  return {compact(keep.data(), p_count, k.idx), out[0], out[1], out[2]};
}

namespace {

// Change score of each pixel of image row `row` (n * H + y) of x against ref, into sr (W floats): max |x - ref|
// over channels (score 0) or the L2 norm (1). Channel by channel, so that the loops run over pixels and
// vectorise (frames have few channels); an RGB frame with contiguous rows (NCHW) in one loop over pixels whose
// three channel reads and stride-3 ref reads vectorise. Inlined into one wrapper per ISA below (AVX2 without FMA
// contraction: the L2 sums round as the baseline build's).
__attribute__((always_inline)) inline void row_scores_body(const float* xp, const float* rp, int64_t row, int64_t H,
                                                           int64_t W, int64_t C, int64_t SN, int64_t SC, int64_t SH,
                                                           int64_t SW, int score_kind, float* __restrict sr) {
  const float* xrow = xp + (row / H) * SN + (row % H) * SH;
  const float* __restrict rrow = rp + row * W * C;
  if (C == 3 && SW == 1) {
    const float* __restrict x0 = xrow;
    const float* __restrict x1 = xrow + SC;
    const float* __restrict x2 = xrow + 2 * SC;
    if (score_kind == 0) {
      for (int64_t xi = 0; xi < W; ++xi)
        sr[xi] = std::max(std::max(std::fabs(x0[xi] - rrow[3 * xi]), std::fabs(x1[xi] - rrow[3 * xi + 1])),
                          std::fabs(x2[xi] - rrow[3 * xi + 2]));
    } else {
      for (int64_t xi = 0; xi < W; ++xi) {
        const float d0 = x0[xi] - rrow[3 * xi], d1 = x1[xi] - rrow[3 * xi + 1], d2 = x2[xi] - rrow[3 * xi + 2];
        float s = 0.f;
        s += d0 * d0;
        s += d1 * d1;
        s += d2 * d2;
        sr[xi] = std::sqrt(s);
      }
    }
    return;
  }
  std::fill(sr, sr + W, 0.f);
  for (int64_t j = 0; j < C; ++j) {
    const float* xj = xrow + j * SC;
    if (score_kind == 0) {
      for (int64_t xi = 0; xi < W; ++xi) sr[xi] = std::max(sr[xi], std::fabs(xj[xi * SW] - rrow[xi * C + j]));
    } else {
      for (int64_t xi = 0; xi < W; ++xi) {
        const float dj = xj[xi * SW] - rrow[xi * C + j];
        sr[xi] += dj * dj;
      }
    }
  }
  if (score_kind == 1)
    for (int64_t xi = 0; xi < W; ++xi) sr[xi] = std::sqrt(sr[xi]);
}

void row_scores_base(const float* xp, const float* rp, int64_t row, int64_t H, int64_t W, int64_t C, int64_t SN,
                     int64_t SC, int64_t SH, int64_t SW, int score_kind, float* __restrict sr) {
  row_scores_body(xp, rp, row, H, W, C, SN, SC, SH, SW, score_kind, sr);
}

__attribute__((target("avx2"))) void row_scores_avx2(
    const float* xp, const float* rp, int64_t row, int64_t H, int64_t W, int64_t C, int64_t SN, int64_t SC,
    int64_t SH, int64_t SW, int score_kind, float* __restrict sr) {
  row_scores_body(xp, rp, row, H, W, C, SN, SC, SH, SW, score_kind, sr);
}

bool cpu_has_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
}

void row_scores(const float* xp, const float* rp, int64_t row, int64_t H, int64_t W, int64_t C, int64_t SN,
                int64_t SC, int64_t SH, int64_t SW, int score_kind, float* __restrict sr) {
  if (cpu_has_avx2()) row_scores_avx2(xp, rp, row, H, W, C, SN, SC, SH, SW, score_kind, sr);
  else row_scores_base(xp, rp, row, H, W, C, SN, SC, SH, SW, score_kind, sr);
}

// flags[i] = s[i] > tau (0/1 bytes) for n scores: vectorised on AVX2 (the baseline build compares one at a time).
__attribute__((always_inline)) inline void flags_above_body(const float* __restrict s, float tau,
                                                            uint8_t* __restrict flags, int64_t n) {
  for (int64_t i = 0; i < n; ++i) flags[i] = s[i] > tau ? 1 : 0;
}

void flags_above_base(const float* s, float tau, uint8_t* flags, int64_t n) { flags_above_body(s, tau, flags, n); }

__attribute__((target("avx2"))) void flags_above_avx2(const float* s, float tau, uint8_t* flags, int64_t n) {
  flags_above_body(s, tau, flags, n);
}

void flags_above(const float* s, float tau, uint8_t* flags, int64_t n) {
  if (cpu_has_avx2()) flags_above_avx2(s, tau, flags, n);
  else flags_above_base(s, tau, flags, n);
}

// Send pixel q of image row `row` at column xi: d = x - ref into the delta's row, ref += d.
inline void send_pixel(const float* xp, float* rp, float* op, uint8_t* om, int64_t row, int64_t xi, int64_t H,
                       int64_t W, int64_t C, int64_t SN, int64_t SC, int64_t SH, int64_t SW, float* d) {
  const float* xrow = xp + (row / H) * SN + (row % H) * SH;
  const int64_t q = row * W + xi;
  float* rr = rp + q * C;
  for (int64_t j = 0; j < C; ++j) d[j] = xrow[j * SC + xi * SW] - rr[j];
  send_row(d, op + q * C, rr, C);
  om[q] = 1;
}

}  // namespace

// Input layer: d = x - ref per pixel (x: float32 (N, C, H, W), any strides; ref: channels_last
// float32); where score(d) > tau: send d and ref += d. Returns the sent delta as act_update does.
// With `buffer`, the delta is written into the buffer's last output when nothing else holds it (output_delta).
std::vector<torch::Tensor> sparsify(torch::Tensor x, torch::Tensor ref, double tau, int64_t score,
                                    OutputBuffer* buffer) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4, "x must be a float32 (N, C, H, W) tensor");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), total = n * h * w;
  float* rp = rows_ptr(ref, total, c, "ref");
  auto out = output_delta(n, c, h, w, buffer ? &buffer->kept : nullptr);
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const float* xp = x.data_ptr<float>();
  float* op = out[0].data_ptr<float>();
  uint8_t* om = mask_out(out[2]);
  const float ftau = tau;
  at::parallel_for(0, n * h, 4, [&](int64_t b, int64_t end) {  // image rows: no division per pixel
    std::vector<float> srow(w), d(c);
    for (int64_t row = b; row < end; ++row) {
      row_scores(xp, rp, row, h, w, c, sn, sc, sh, sw, static_cast<int>(score), srow.data());
      for (int64_t xi = 0; xi < w; ++xi)
        if (srow[xi] > ftau) send_pixel(xp, rp, op, om, row, xi, h, w, c, sn, sc, sh, sw, d.data());
    }
  });
  return {compact(om, total), out[0], out[1], out[2]};
}

namespace {

// Per image, (the sum of its h rows' counts) / (h * w): (N,) float32 (changed_fraction, sparsify_blobs' held part).
torch::Tensor image_fractions(const std::vector<int64_t>& per_row, int64_t n, int64_t h, int64_t w) {
  auto out = torch::zeros({n}, torch::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t row = 0; row < n * h; ++row) op[row / h] += static_cast<float>(per_row[row]);
  for (int64_t i = 0; i < n; ++i) op[i] /= static_cast<float>(h * w);
  return out;
}

}  // namespace

// Per image of x (float32 (N, C, H, W), any strides), the fraction of its pixels whose score of x - ref (ref:
// channels_last float32 rows) passes tau: the input layer's change on a keyframe, in sparsify's score pass.
torch::Tensor changed_fraction(torch::Tensor x, torch::Tensor ref, double tau, int64_t score) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4, "x must be a float32 (N, C, H, W) tensor");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), total = n * h * w;
  const float* rp = rows_ptr(ref, total, c, "ref");
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const float* xp = x.data_ptr<float>();
  const float ftau = tau;
  std::vector<int64_t> per_row(n * h);
  at::parallel_for(0, n * h, 4, [&](int64_t b, int64_t end) {
    std::vector<float> srow(w);
    for (int64_t row = b; row < end; ++row) {
      row_scores(xp, rp, row, h, w, c, sn, sc, sh, sw, static_cast<int>(score), srow.data());
      int64_t k = 0;
      for (int64_t xi = 0; xi < w; ++xi) k += srow[xi] > ftau;
      per_row[row] = k;
    }
  });
  return image_fractions(per_row, n, h, w);
}

namespace {

// One pass of a separable k x k square filter over (N, H, W) 0/1 bytes, along rows (horizontal) or columns:
// out = AND (erode) or OR (dilate) over the window's in-image pixels (max pooling with -inf padding).
// Shift by shift over whole rows, so that the byte loops vectorise.
void square_pass(const uint8_t* in, uint8_t* out, int64_t n, int64_t h, int64_t w, int64_t k, bool horizontal,
                 bool erode) {
  const int64_t r = k / 2;
  at::parallel_for(0, n * h, 64, [&](int64_t b, int64_t end) {
    const int64_t W = w, H = h, R = r;
    const bool AND = erode, HOR = horizontal;
    for (int64_t row = b; row < end; ++row) {
      uint8_t* __restrict o = out + row * W;
      if (HOR) {
        const uint8_t* __restrict s = in + row * W;
        std::memcpy(o, s, W);
        for (int64_t t = 1; t <= R; ++t) {  // neighbours at -t and +t, where they are inside the row
          if (AND) {
            for (int64_t x = t; x < W; ++x) o[x] &= s[x - t];
            for (int64_t x = 0; x + t < W; ++x) o[x] &= s[x + t];
          } else {
            for (int64_t x = t; x < W; ++x) o[x] |= s[x - t];
            for (int64_t x = 0; x + t < W; ++x) o[x] |= s[x + t];
          }
        }
      } else {
        const int64_t y = row % H, base = row - y;
        std::memcpy(o, in + row * W, W);
        for (int64_t t = std::max<int64_t>(0, y - R); t <= std::min(H - 1, y + R); ++t) {
          if (t == y) continue;
          const uint8_t* __restrict s = in + (base + t) * W;
          if (AND) {
            for (int64_t x = 0; x < W; ++x) o[x] &= s[x];
          } else {
            for (int64_t x = 0; x < W; ++x) o[x] |= s[x];
          }
        }
      }
    }
  });
}

}  // namespace

// The input layer with the small-blob gate (deltacnn.gating, min_blob k): the pixels whose score passes
// tau, opened by a k x k square (erosion then dilation, only in-image pixels counted), are sent as
// sparsify sends them; the rest keep their change in x - ref. In the images where `flush` ((N,) bool,
// optional: a refresh "flush" of the held-back change) is set, every pixel that passes tau is sent.
// Returns sparsify's delta and, per image, the fraction of its pixels that passed tau but were held
// back (N,) float32.
std::vector<torch::Tensor> sparsify_blobs(torch::Tensor x, torch::Tensor ref, double tau, int64_t score, int64_t k,
                                          c10::optional<torch::Tensor> flush, OutputBuffer* buffer) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4, "x must be a float32 (N, C, H, W) tensor");
  TORCH_CHECK(k >= 1 && k % 2 == 1, "the blob window must be odd, got ", k);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), total = n * h * w;
  const uint8_t* fl = flush.has_value() ? mask_ptr(*flush, n, "flush") : nullptr;
  float* rp = rows_ptr(ref, total, c, "ref");
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const float* xp = x.data_ptr<float>();
  const float ftau = tau;
  std::vector<uint8_t> strong(total), tmp(total), kept(total);
  at::parallel_for(0, n * h, 4, [&](int64_t b, int64_t end) {
    std::vector<float> srow(w);
    for (int64_t row = b; row < end; ++row) {
      row_scores(xp, rp, row, h, w, c, sn, sc, sh, sw, static_cast<int>(score), srow.data());
      flags_above(srow.data(), ftau, strong.data() + row * w, w);
    }
  });
  square_pass(strong.data(), tmp.data(), n, h, w, k, true, true);
  square_pass(tmp.data(), kept.data(), n, h, w, k, false, true);   // eroded
  square_pass(kept.data(), tmp.data(), n, h, w, k, true, false);
  square_pass(tmp.data(), kept.data(), n, h, w, k, false, false);  // opened
  for (int64_t i = 0; fl != nullptr && i < n; ++i)
    if (fl[i]) std::memcpy(kept.data() + i * h * w, strong.data() + i * h * w, h * w);  // flushed: all of it
  auto out = output_delta(n, c, h, w, buffer ? &buffer->kept : nullptr);
  float* op = out[0].data_ptr<float>();
  uint8_t* om = mask_out(out[2]);
  std::vector<int64_t> held_rows(n * h);
  at::parallel_for(0, n * h, 4, [&](int64_t b, int64_t end) {
    std::vector<float> d(c);
    for (int64_t row = b; row < end; ++row) {
      const uint8_t* kr = kept.data() + row * w;
      const uint8_t* sr = strong.data() + row * w;
      int64_t held = 0, xi = 0;
      for (; xi + 8 <= w; xi += 8) {  // 8 pixels at a time: most of a row is neither kept nor strong (0/1 bytes)
        uint64_t kw, sw8;
        std::memcpy(&kw, kr + xi, 8);
        std::memcpy(&sw8, sr + xi, 8);
        // the 0/1 bytes of strong-and-not-kept summed by one multiply (a popcount is a libgcc call in this build)
        held += static_cast<int64_t>((((sw8 & ~kw) & 0x0101010101010101ull) * 0x0101010101010101ull) >> 56);
        if (!kw) continue;
        for (int64_t j = xi; j < xi + 8; ++j)
          if (kr[j]) send_pixel(xp, rp, op, om, row, j, h, w, c, sn, sc, sh, sw, d.data());
      }
      for (; xi < w; ++xi) {
        held += sr[xi] & !kr[xi];
        if (kr[xi]) send_pixel(xp, rp, op, om, row, xi, h, w, c, sn, sc, sh, sw, d.data());
      }
      held_rows[row] = held;
    }
  });
  return {compact(om, total), out[0], out[1], out[2], image_fractions(held_rows, n, h, w)};
}

namespace {

// min, max and whether a NaN is among per floats at p (frame_range); inlined into one wrapper per ISA.
__attribute__((always_inline)) inline void range_body(const float* p, int64_t per, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
  for (int64_t j = 0; j < per; ++j) {
    const float v = p[j];
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    bad |= v != v;
  }
  *lo = bad ? NAN : mn;
  *hi = bad ? NAN : mx;
}

void range_base(const float* p, int64_t per, float* lo, float* hi) { range_body(p, per, lo, hi); }

__attribute__((target("avx2"))) void range_avx2(const float* p, int64_t per, float* lo, float* hi) {
  range_body(p, per, lo, hi);
}

}  // namespace

// Per image of a float32 batch whose images are contiguous blocks (NCHW or channels_last), the least
// and largest value, NaN where the image holds a NaN (infinities are kept): (lo, hi), each (N,) float32.
std::vector<torch::Tensor> frame_range(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() >= 1 &&
                  (x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))),
              "x must be a contiguous (or channels_last) float32 batch");
  const int64_t n = x.size(0), per = n ? x.numel() / n : 0;
  auto lo = torch::empty({n}, torch::kFloat), hi = torch::empty({n}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  float* lp = lo.data_ptr<float>();
  float* hp = hi.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (cpu_has_avx2()) range_avx2(xp + i * per, per, lp + i, hp + i);
    else range_base(xp + i * per, per, lp + i, hp + i);
  }
  return {lo, hi};
}

// Max pooling: acc += d at the updated input pixels d_idx, then at candidate outputs cand_idx
// o = max over the in-image taps of acc - E, emitted where score(o) > tau (as act_update).
std::vector<torch::Tensor> maxpool_update(torch::Tensor d_rows, torch::Tensor d_idx, torch::Tensor cand_idx,
                                          torch::Tensor acc, torch::Tensor emitted, std::vector<int64_t> geo,
                                          double tau, int64_t score) {
  const Geometry g = geometry(geo);
  const int64_t c = acc.size(1), in_total = g.n * g.h * g.w;
  TORCH_CHECK(d_idx.scalar_type() == torch::kLong && d_idx.is_contiguous() && cand_idx.scalar_type() == torch::kLong &&
                  cand_idx.is_contiguous(), "indices must be contiguous int64");
  TORCH_CHECK(emitted.dim() == 4 && emitted.size(2) == g.ho && emitted.size(3) == g.wo, "emitted must be (N, C, Ho, Wo)");
  auto out = new_delta(g.n, c, g.ho, g.wo);
  const float* dp = rows_ptr(d_rows, in_total, c, "d_rows");
  float* ap = rows_ptr(acc, in_total, c, "acc");
  float* ep = rows_ptr(emitted, g.n * g.ho * g.wo, c, "emitted");
  const int64_t* di = d_idx.data_ptr<int64_t>();
  at::parallel_for(0, d_idx.numel(), 256, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p) {
      float* ar = ap + di[p] * c;
      const float* dr = dp + di[p] * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) ar[j] += dr[j];
    }
  });
  const int64_t p_count = cand_idx.numel();
  const int64_t* ci = cand_idx.data_ptr<int64_t>();
  float* op = out[0].data_ptr<float>();
  uint8_t* om = mask_out(out[2]);
  std::vector<uint8_t> keep(p_count);
  const float ftau = tau;
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    std::vector<float> o(c);
    for (int64_t p = b; p < end; ++p) {
      const int64_t q = ci[p];
      const int64_t n = q / (g.ho * g.wo), rem = q % (g.ho * g.wo);
      const int64_t oy = rem / g.wo, ox = rem % g.wo;
      std::fill(o.begin(), o.end(), -INFINITY);
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.pt + ky * g.dh;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
          if (ix < 0 || ix >= g.w) continue;
          const float* ar = ap + ((n * g.h + iy) * g.w + ix) * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) o[j] = std::max(o[j], ar[j]);
        }
      }
      const float* er = ep + q * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) o[j] -= er[j];
      const float s = score == 0 ? row_score<0>(o.data(), c) : row_score<1>(o.data(), c);
      keep[p] = s > ftau;
      if (keep[p]) {
        send_row(o.data(), op + q * c, ep + q * c, c);
        om[q] = 1;
      }
    }
  });
  return {compact(keep.data(), p_count, ci), out[0], out[1], out[2]};
}

// ---- stages for activations computed by ATen (SiLU, sigmoid, ...) and for stream merges ----------

namespace {

// Rows of change values for pixels idx[p]: one row per candidate (P, C), or, with by_pixel, a full
// map's rows indexed by the pixel itself (a dense conv's output).
inline const float* change_row(const float* y, const int64_t* idx, int64_t p, int64_t c, bool by_pixel) {
  return y + (by_pixel ? idx[p] : p) * c;
}

}  // namespace

// First half of a nonlinear update whose f is an ATen op: A += y (+ residual rows where res_mask)
// at pixels idx; returns the new A rows (P, C), for the caller to apply f in place (as the
// reference backend does on the same (P, C) matrix, so the result is bit-identical) and pass to
// emit_rows. y: (P, C) rows, or with by_pixel a channels_last map / ext indexed by pixel.
torch::Tensor accumulate_rows(torch::Tensor y, torch::Tensor idx, c10::optional<torch::Tensor> residual,
                              c10::optional<torch::Tensor> res_mask, torch::Tensor acc, bool by_pixel) {
  TORCH_CHECK(acc.dim() == 4, "acc must be (N, C, H, W)");
  const int64_t c = acc.size(1), total = acc.size(0) * acc.size(2) * acc.size(3), p_count = idx.numel();
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  TORCH_CHECK(residual.has_value() == res_mask.has_value(), "residual and res_mask come together");
  const float* yp = rows_ptr(y, by_pixel ? total : p_count, c, "y");
  const float* rp = residual ? rows_ptr(*residual, total, c, "residual") : nullptr;
  const uint8_t* rm = res_mask ? mask_ptr(*res_mask, total, "res_mask") : nullptr;
  float* ap = rows_ptr(acc, total, c, "acc");
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto out = torch::empty({p_count, c}, torch::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p) {
      const int64_t r = ip[p];
      const float* yr = change_row(yp, ip, p, c, by_pixel);
      float* ar = ap + r * c;
      float* o = op + p * c;
      if (rp && rm[r]) {
        const float* rr = rp + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) o[j] = ar[j] = ar[j] + (yr[j] + rr[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) o[j] = ar[j] = ar[j] + yr[j];
      }
    }
  });
  return out;
}

// Second half: o = f(A) rows (P, C) at pixels idx (overwritten with f(A) - E); emit where
// score(o) > tau, E += o there. Returns the emitted delta as act_update does.
std::vector<torch::Tensor> emit_rows(torch::Tensor f_rows, torch::Tensor idx, torch::Tensor emitted, double tau,
                                     int64_t score) {
  TORCH_CHECK(emitted.dim() == 4, "emitted must be (N, C, H, W)");
  const int64_t n = emitted.size(0), c = emitted.size(1), h = emitted.size(2), w = emitted.size(3);
  const int64_t p_count = idx.numel(), total = n * h * w;
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  float* fp = rows_ptr(f_rows, p_count, c, "f_rows");
  float* ep = rows_ptr(emitted, total, c, "emitted");
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto out = new_delta(n, c, h, w);
  float* op = out[0].data_ptr<float>();
  uint8_t* om = mask_out(out[2]);
  std::vector<uint8_t> keep(p_count);
  const float ftau = tau;
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p) {
      const int64_t r = ip[p];
      float* o = fp + p * c;
      const float* er = ep + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) o[j] -= er[j];
      keep[p] = (score == 0 ? row_score<0>(o, c) : row_score<1>(o, c)) > ftau;
      if (keep[p]) {
        send_row(o, op + r * c, ep + r * c, c);
        om[r] = 1;
      }
    }
  });
  return {compact(keep.data(), p_count, ip), out[0], out[1], out[2]};
}

namespace {

// om |= every mask of msk, `total` bytes each.
void or_masks(const std::vector<const uint8_t*>& msk, uint8_t* __restrict om, int64_t total) {
  for (const uint8_t* mi : msk)
    for (int64_t q = 0; q < total; ++q) om[q] |= mi[q];
}

}  // namespace

// The union of (N, 1, H, W) bool masks of one shape and its set pixels, ascending: [idx, mask] (a cat that its
// 1x1 conv reads in place: the cat's mask without its rows).
std::vector<torch::Tensor> union_masks(std::vector<torch::Tensor> masks) {
  TORCH_CHECK(!masks.empty() && masks[0].dim() == 4 && masks[0].size(1) == 1, "masks must be (N, 1, H, W)");
  const auto& m0 = masks[0];
  const int64_t total = m0.size(0) * m0.size(2) * m0.size(3);
  std::vector<const uint8_t*> msk;
  for (const auto& m : masks) {
    TORCH_CHECK(m.sizes() == m0.sizes(), "masks must have one shape");
    msk.push_back(mask_ptr(m, total, "mask"));
  }
  auto mask = torch::zeros(m0.sizes(), torch::kBool);
  uint8_t* om = mask_out(mask);
  or_masks(msk, om, total);
  return {compact(om, total), mask};
}

// Merge of streams of equal (N, H, W) at the union of their masks: `add` sums them (every one
// has C channels), otherwise their channels are concatenated; a stream without an update at a
// pixel contributes zeros. rows[i]: float32 rows (see rows_ptr). Returns a delta as act_update.
std::vector<torch::Tensor> merge_streams(std::vector<torch::Tensor> rows, std::vector<torch::Tensor> masks,
                                         bool add) {
  TORCH_CHECK(!rows.empty() && rows.size() == masks.size(), "merge_streams needs one mask per stream");
  const auto& m0 = masks[0];
  TORCH_CHECK(m0.dim() == 4, "masks must be (N, 1, H, W)");
  const int64_t n = m0.size(0), h = m0.size(2), w = m0.size(3), total = n * h * w;
  const size_t k = rows.size();
  std::vector<const float*> src(k);
  std::vector<const uint8_t*> msk(k);
  std::vector<int64_t> ch(k), off(k);
  int64_t c_out = 0;
  for (size_t i = 0; i < k; ++i) {
    ch[i] = rows[i].size(1);
    src[i] = rows_ptr(rows[i], total, ch[i], "stream rows");
    msk[i] = mask_ptr(masks[i], total, "stream mask");
    off[i] = add ? 0 : c_out;
    c_out = add ? ch[0] : c_out + ch[i];
    TORCH_CHECK(!add || ch[i] == ch[0], "added streams need equal channel counts");
  }
  auto out = new_delta(n, c_out, h, w);
  uint8_t* om = mask_out(out[2]);
  or_masks(msk, om, total);
  auto idx = compact(om, total);
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out[0].data_ptr<float>();
  at::parallel_for(0, idx.numel(), 64, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p) {
      const int64_t r = ip[p];
      float* o = op + r * c_out;
      if (add) {
        std::memset(o, 0, sizeof(float) * c_out);
        for (size_t i = 0; i < k; ++i) {
          if (!msk[i][r]) continue;
          const float* s = src[i] + r * c_out;
#pragma omp simd
          for (int64_t j = 0; j < c_out; ++j) o[j] += s[j];
        }
      } else {
        for (size_t i = 0; i < k; ++i) {
          if (msk[i][r]) std::memcpy(o + off[i], src[i] + r * ch[i], sizeof(float) * ch[i]);
          else std::memset(o + off[i], 0, sizeof(float) * ch[i]);
        }
      }
    }
  });
  return {idx, out[0], out[1], out[2]};
}

// Channels [start, stop) of a delta's rows at its updated pixels idx (the others stay undefined).
// Returns [ext, values] of the new (N, stop - start, H, W) delta (its mask is the input's).
std::vector<torch::Tensor> slice_rows(torch::Tensor src_rows, torch::Tensor idx, int64_t n, int64_t h, int64_t w,
                                      int64_t c, int64_t start, int64_t stop) {
  TORCH_CHECK(0 <= start && start < stop && stop <= c, "bad channel range");
  const float* sp = rows_ptr(src_rows, n * h * w, c, "src_rows");
  const int64_t co = stop - start;
  auto out = new_delta(n, co, h, w);
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out[0].data_ptr<float>();
  at::parallel_for(0, idx.numel(), 256, [&](int64_t b, int64_t end) {
    for (int64_t p = b; p < end; ++p)
      std::memcpy(op + ip[p] * co, sp + ip[p] * c + start, sizeof(float) * co);
  });
  return {out[0], out[1]};
}

// Nearest upsampling of a delta by integer factors (sy, sx): output pixel (n, y, x) is input pixel
// (n, y / sy, x / sx), so the updated output pixels are the sy x sx blocks of the updated input pixels
// idx (in_mask's, ascending), whose rows are copied. Returns [indices, ext, values, mask] as act_update.
std::vector<torch::Tensor> upsample_nearest(torch::Tensor src_rows, torch::Tensor in_mask, torch::Tensor idx,
                                            int64_t sy, int64_t sx) {
  TORCH_CHECK(sy >= 1 && sx >= 1, "upsampling factors must be >= 1");
  TORCH_CHECK(in_mask.dim() == 4 && in_mask.size(1) == 1, "in_mask must be (N, 1, H, W)");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  const int64_t n = in_mask.size(0), h = in_mask.size(2), w = in_mask.size(3), c = src_rows.size(1);
  mask_ptr(in_mask, n * h * w, "in_mask");
  const float* sp = rows_ptr(src_rows, n * h * w, c, "src_rows");
  const int64_t ho = h * sy, wo = w * sx, p_count = idx.numel();
  auto out = new_delta(n, c, ho, wo);
  uint8_t* om = mask_out(out[2]);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < p_count; ++p) {
    const int64_t q = ip[p];
    TORCH_CHECK(q >= 0 && q < n * h * w, "idx holds a pixel outside the input");
    const int64_t b = q / (h * w), rem = q % (h * w), y = rem / w, x = rem % w;
    for (int64_t dy = 0; dy < sy; ++dy) std::memset(om + (b * ho + y * sy + dy) * wo + x * sx, 1, sx);
  }
  auto oidx = compact(om, n * ho * wo);
  const int64_t* oi = oidx.data_ptr<int64_t>();
  float* op = out[0].data_ptr<float>();
  at::parallel_for(0, oidx.numel(), 256, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t r = oi[k], b = r / (ho * wo), rem = r % (ho * wo);
      const int64_t src = (b * h + (rem / wo) / sy) * w + (rem % wo) / sx;
      std::memcpy(op + r * c, sp + src * c, sizeof(float) * c);
    }
  });
  return {oidx, out[0], out[1], out[2]};
}

// ---- implicit GEMM of a gathered conv (AVX2 + FMA; the caller falls back to gather + matmul) ------

namespace {

constexpr int GEMM_MR = 6;   // output pixels per micro-kernel
constexpr int GEMM_NR = 16;  // output channels per weight panel (two 8-float vectors)

// gemm_panel for a panel of at most 8 live output channels (the last panel of Cout 24, 40, ...): one
// vector per pixel instead of two, half the multiply-adds of a zero-padded 16-channel panel.
__attribute__((target("avx2,fma"))) void gemm_panel8(const float* const* src, const uint8_t* any, int64_t taps,
                                                     int64_t cin, const float* __restrict panel, float* out,
                                                     int64_t rows, int64_t ldo, int64_t ncols) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t t = 0; t < taps; ++t) {
    if (!any[t]) continue;
    const float* const* s = src + t * GEMM_MR;
    const float *a0 = s[0], *a1 = s[1], *a2 = s[2], *a3 = s[3], *a4 = s[4], *a5 = s[5];
    const float* b = panel + t * cin * GEMM_NR;
    for (int64_t k = 0; k < cin; ++k, b += GEMM_NR) {
      const __m256 b0 = _mm256_loadu_ps(b);
      c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k), b0, c0);
      c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a1 + k), b0, c1);
      c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a2 + k), b0, c2);
      c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a3 + k), b0, c3);
      c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a4 + k), b0, c4);
      c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a5 + k), b0, c5);
    }
  }
  alignas(32) float tile[GEMM_MR][8];
  _mm256_store_ps(tile[0], c0); _mm256_store_ps(tile[1], c1); _mm256_store_ps(tile[2], c2);
  _mm256_store_ps(tile[3], c3); _mm256_store_ps(tile[4], c4); _mm256_store_ps(tile[5], c5);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * ldo, tile[r], sizeof(float) * ncols);
}

// One block of up to 6 output pixels times one 16-channel weight panel: acc = sum over taps t and
// input channels k of src[t][r][k] * panel[t * cin + k][:]. Taps whose 6 sources are all the zero
// row (no update in the window, or outside the image) are skipped: they add nothing.
__attribute__((target("avx2,fma"))) void gemm_panel(const float* const* src, const uint8_t* any, int64_t taps,
                                                    int64_t cin, const float* __restrict panel, float* out,
                                                    int64_t rows, int64_t ldo, int64_t ncols) {
  if (ncols <= 8) {
    gemm_panel8(src, any, taps, cin, panel, out, rows, ldo, ncols);
    return;
  }
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t t = 0; t < taps; ++t) {
    if (!any[t]) continue;
    const float* const* s = src + t * GEMM_MR;
    const float *a0 = s[0], *a1 = s[1], *a2 = s[2], *a3 = s[3], *a4 = s[4], *a5 = s[5];
    const float* b = panel + t * cin * GEMM_NR;
    for (int64_t k = 0; k < cin; ++k, b += GEMM_NR) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      __m256 a = _mm256_broadcast_ss(a0 + k);
      c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
      a = _mm256_broadcast_ss(a1 + k);
      c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
      a = _mm256_broadcast_ss(a2 + k);
      c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
      a = _mm256_broadcast_ss(a3 + k);
      c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
      a = _mm256_broadcast_ss(a4 + k);
      c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
      a = _mm256_broadcast_ss(a5 + k);
      c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
  }
  alignas(32) float tile[GEMM_MR][GEMM_NR];
  _mm256_store_ps(tile[0], c00); _mm256_store_ps(tile[0] + 8, c01);
  _mm256_store_ps(tile[1], c10); _mm256_store_ps(tile[1] + 8, c11);
  _mm256_store_ps(tile[2], c20); _mm256_store_ps(tile[2] + 8, c21);
  _mm256_store_ps(tile[3], c30); _mm256_store_ps(tile[3] + 8, c31);
  _mm256_store_ps(tile[4], c40); _mm256_store_ps(tile[4] + 8, c41);
  _mm256_store_ps(tile[5], c50); _mm256_store_ps(tile[5] + 8, c51);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * ldo, tile[r], sizeof(float) * ncols);
}

// The AVX-512 micro-kernel: GEMM_MR pixels times NZ adjacent 16-channel panels of the same packed layout
// (panel z of the group at panel + z * pstride), 6 * NZ zmm accumulators (NZ <= 4: 24 of the 32 zmm); stores straight into out
// (masked past ncols). Zen 5 and recent Intel cores run two 512-bit FMAs a cycle: twice gemm_panel's MACs
// per FMA at the same instruction count.
template <int NZ>
__attribute__((target("avx512f"))) void gemm_block512(const float* const* src, const uint8_t* any, int64_t taps,
                                                      int64_t cin, const float* __restrict panel, int64_t pstride,
                                                      float* out, int64_t rows, int64_t ldo, int64_t ncols) {
  __m512 c[GEMM_MR][NZ];
#pragma GCC unroll 8
  for (int r = 0; r < GEMM_MR; ++r)
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) c[r][z] = _mm512_setzero_ps();
  for (int64_t t = 0; t < taps; ++t) {
    if (!any[t]) continue;
    const float* const* s = src + t * GEMM_MR;
    const float* a[GEMM_MR];
#pragma GCC unroll 8
    for (int r = 0; r < GEMM_MR; ++r) a[r] = s[r];
    const float* b = panel + t * cin * GEMM_NR;
    for (int64_t k = 0; k < cin; ++k, b += GEMM_NR) {
      __m512 bv[NZ];
#pragma GCC unroll 4
      for (int z = 0; z < NZ; ++z) bv[z] = _mm512_loadu_ps(b + z * pstride);
#pragma GCC unroll 8
      for (int r = 0; r < GEMM_MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r][k]);
#pragma GCC unroll 4
        for (int z = 0; z < NZ; ++z) c[r][z] = _mm512_fmadd_ps(av, bv[z], c[r][z]);
      }
    }
  }
  const int64_t full = ncols / GEMM_NR, rem = ncols % GEMM_NR;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
#pragma GCC unroll 8
  for (int r = 0; r < GEMM_MR; ++r) {
    if (r >= rows) break;
    float* o = out + r * ldo;
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      if (z < full) _mm512_storeu_ps(o + z * GEMM_NR, c[r][z]);
      else if (z == full && rem) _mm512_mask_storeu_ps(o + z * GEMM_NR, tail, c[r][z]);
    }
  }
}

// ---- which vector ISA the micro-kernels run: AVX2 + FMA, or AVX-512F where the CPU has it ----------

enum Isa : int { ISA_AVX2 = 0, ISA_AVX512 = 1 };

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

// The ISA in use: the CPU's best, or AVX2 where DELTACNN_CPU_ISA=avx2 (read once, at the first kernel call);
// set_cpu_isa switches it between calls (the tests run both paths on an AVX-512 machine).
std::atomic<int>& isa_slot() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("DELTACNN_CPU_ISA");
    return env && std::strcmp(env, "avx2") == 0 ? ISA_AVX2 : (cpu_has_avx512() ? ISA_AVX512 : ISA_AVX2);
  }()};
  return isa;
}

inline bool use_avx512() { return isa_slot().load(std::memory_order_relaxed) == ISA_AVX512; }

// y (rows x cout, row stride cout) = one block of GEMM_MR pixels' operand rows (src, any: see gemm_panel)
// times every panel of the packed weights wp, on the ISA in use.
void gemm_panels(const float* const* src, const uint8_t* any, int64_t taps, int64_t cin, const float* wp,
                 int64_t cout, float* y, int64_t rows) {
  const int64_t panels = (cout + GEMM_NR - 1) / GEMM_NR, ps = taps * cin * GEMM_NR;
  if (!use_avx512()) {
    for (int64_t j = 0; j < panels; ++j)
      gemm_panel(src, any, taps, cin, wp + j * ps, y + j * GEMM_NR, rows, cout, std::min<int64_t>(GEMM_NR, cout - j * GEMM_NR));
    return;
  }
  // 6 x 64 (24 zmm accumulators) first: 1.8x gemm_panel over YOLOv8n's keyframe convs, against 1.66x for
  // 6 x 32 and 1.65x for 12 x 32 (benchmarks/gemm_microbench.cpp, 1 thread); then 6 x 32 and 6 x 16
  int64_t j = 0;
  for (; j + 4 <= panels; j += 4)
    gemm_block512<4>(src, any, taps, cin, wp + j * ps, ps, y + j * GEMM_NR, rows, cout,
                     std::min<int64_t>(4 * GEMM_NR, cout - j * GEMM_NR));
  for (; j + 2 <= panels; j += 2)
    gemm_block512<2>(src, any, taps, cin, wp + j * ps, ps, y + j * GEMM_NR, rows, cout,
                     std::min<int64_t>(2 * GEMM_NR, cout - j * GEMM_NR));
  if (j < panels)
    gemm_block512<1>(src, any, taps, cin, wp + j * ps, ps, y + j * GEMM_NR, rows, cout, cout - j * GEMM_NR);
}

}  // namespace

// Whether depthwise_rows runs the update of codes 0-3 fused into its channel loop (depthwise_update_body) or as
// depthwise_row then update_row (the A/B and the tests switch it with set_dw_fused_update; on by default).
std::atomic<bool>& dw_fused_update_slot() {
  static std::atomic<bool> on{true};
  return on;
}
inline bool dw_fused_update_on() { return dw_fused_update_slot().load(std::memory_order_relaxed); }

// Whether this CPU runs conv_rows (AVX2 and FMA).
bool has_conv_rows() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// The vector ISA the micro-kernels run: "avx512" or "avx2".
std::string cpu_isa() { return use_avx512() ? "avx512" : "avx2"; }

// Switch the micro-kernels to "avx2", "avx512" (this CPU must have AVX-512F) or "auto" (the CPU's best);
// returns the previous one. Not while kernels run: the tests and benchmarks call it between calls.
std::string set_cpu_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512" || name == "auto", "unknown ISA '", name, "' (avx2, avx512, auto)");
  TORCH_CHECK(name != "avx512" || cpu_has_avx512(), "this CPU has no AVX-512F");
  const std::string old = cpu_isa();
  isa_slot().store(name == "avx2" || !cpu_has_avx512() ? ISA_AVX2 : ISA_AVX512);
  return old;
}

// The GEMM operand rows of one block of GEMM_MR output pixels (ip[0..rows), the rest padding), read in
// place: src[t * GEMM_MR + r] is the input row tap t of pixel r reads, or the zero row where that input
// pixel is outside the image or not updated (mask m); any[t]: some pixel of the block has tap t live, so
// the GEMM skips the taps without a live source. Shared by conv_rows and conv_act_rows.
static inline void gather_block_taps(const Geometry& g, const int64_t* ip, int64_t rows, const float* x,
                                     const uint8_t* m, int64_t cin, const float* zero, const float** src,
                                     uint8_t* any) {
  // the geometry in locals: the byte stores into `any` may alias anything, and the fields were loaded again
  // after each (a third of a narrow conv's time, 3x3 16->16, went to this loop)
  const int64_t KH = g.kh, KW = g.kw, SH = g.sh, SW = g.sw, DH = g.dh, DW = g.dw, PT = g.pt, PL = g.pl;
  const int64_t H = g.h, W = g.w, WO = g.wo, HOWO = g.ho * g.wo;
  const int64_t taps = KH * KW;
  const bool pointwise = taps == 1 && SH == 1 && SW == 1 && PT == 0 && PL == 0 && H == g.ho && W == WO;
  std::fill(any, any + taps, 0);
  for (int64_t r = 0; r < GEMM_MR; ++r) {
    if (r >= rows) {
      for (int64_t t = 0; t < taps; ++t) src[t * GEMM_MR + r] = zero;
      continue;
    }
    const int64_t q = ip[r];
    if (pointwise) {  // output pixel q reads input pixel q
      const bool live = m[q];
      src[r] = live ? x + q * cin : zero;
      any[0] |= live;
      continue;
    }
    const int64_t n = g.n == 1 ? 0 : q / HOWO, rem = q - n * HOWO;
    const int64_t oy = static_cast<int64_t>(static_cast<uint32_t>(rem) / static_cast<uint32_t>(WO));
    const int64_t ox = rem - oy * WO;
    const int64_t iy0 = oy * SH - PT, ix0 = ox * SW - PL;
    const int64_t base = (n * H + iy0) * W + ix0;
    if (iy0 >= 0 && iy0 + (KH - 1) * DH < H && ix0 >= 0 && ix0 + (KW - 1) * DW < W) {  // no tap outside
      for (int64_t ky = 0, t = 0; ky < KH; ++ky)
        for (int64_t kx = 0; kx < KW; ++kx, ++t) {
          const int64_t s = base + ky * DH * W + kx * DW;
          const bool live = m[s];
          src[t * GEMM_MR + r] = live ? x + s * cin : zero;
          any[t] |= live;
        }
      continue;
    }
    for (int64_t ky = 0, t = 0; ky < KH; ++ky) {
      const int64_t iy = iy0 + ky * DH;
      const bool vy = iy >= 0 && iy < H;
      for (int64_t kx = 0; kx < KW; ++kx, ++t) {
        const int64_t ix = ix0 + kx * DW;
        const int64_t s = base + ky * DH * W + kx * DW;
        const bool live = vy && ix >= 0 && ix < W && m[s];
        src[t * GEMM_MR + r] = live ? x + s * cin : zero;
        any[t] |= live;
      }
    }
  }
}

// A gathered (groups 1) conv at output pixels idx, without materialising the tap matrix:
// y[p] = sum over taps of the input rows each tap reads (zero where the pixel is outside the image or
// not updated) times the weights. ext: the input delta's float32 rows (see rows_ptr); packed: the
// (taps * Cin, Cout) GEMM matrix in panels of 16 output channels, (ceil(Cout / 16), taps * Cin, 16)
// with zero padding (cpu_fused.packed_weights). Returns (P, Cout) float32.
// With `scatter`, row p goes to row idx[p] of a new delta's ext instead (see new_delta: the plain conv's
// output delta, mask set at idx) and the result is that delta's [idx, ext, values, mask].
// With `scatter` and a residual (channels_last (N, Cout, Ho, Wo) or ext rows, with its (N, 1, Ho, Wo) mask), the
// delta's row is y + the residual's row where res_mask is set (the linear bottleneck of a MobileNetV2 block:
// conv, then the skip stream added, no activation), y elsewhere: the reference's y + masked rows in one pass.
std::vector<torch::Tensor> conv_rows_any(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                         torch::Tensor packed, int64_t cout, std::vector<int64_t> geo, bool scatter,
                                         c10::optional<torch::Tensor> residual = c10::nullopt,
                                         c10::optional<torch::Tensor> res_mask = c10::nullopt,
                                         torch::Tensor* kept_ext = nullptr) {
  TORCH_CHECK(has_conv_rows(), "conv_rows needs AVX2 and FMA");
  const Geometry g = geometry(geo);
  const uint8_t* m = mask_ptr(in_mask, g.n * g.h * g.w, "in_mask");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  const int64_t cin = ext.size(1), taps = g.kh * g.kw, p_count = idx.numel();
  const int64_t panels = (cout + GEMM_NR - 1) / GEMM_NR;
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == panels && packed.size(1) == taps * cin && packed.size(2) == GEMM_NR,
              "packed must be a contiguous (", panels, ", ", taps * cin, ", 16) float32 tensor");
  const float* x = rows_ptr(ext, g.n * g.h * g.w, cin, "ext");
  const float* wp = packed.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  TORCH_CHECK(residual.has_value() == res_mask.has_value(), "residual and res_mask come together");
  TORCH_CHECK(scatter || !residual, "a residual is added into the output delta (scatter)");
  const int64_t out_total = g.n * g.ho * g.wo;
  const float* rp = residual ? rows_ptr(*residual, out_total, cout, "residual") : nullptr;
  const uint8_t* rm = res_mask ? mask_ptr(*res_mask, out_total, "res_mask") : nullptr;
  std::vector<torch::Tensor> delta;
  torch::Tensor out;
  if (scatter) {
    delta = output_delta(g.n, cout, g.ho, g.wo, kept_ext);
    uint8_t* om = mask_out(delta[2]);
    for (int64_t p = 0; p < p_count; ++p) {
      TORCH_CHECK(ip[p] >= 0 && ip[p] < g.n * g.ho * g.wo, "idx holds a pixel outside the output");
      om[ip[p]] = 1;
    }
  } else {
    out = torch::empty({p_count, cout}, torch::kFloat);
  }
  float* op = scatter ? delta[0].data_ptr<float>() : out.data_ptr<float>();
  const std::vector<float> zero(cin, 0.f);
  const int64_t blocks = (p_count + GEMM_MR - 1) / GEMM_MR;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    std::vector<const float*> src(taps * GEMM_MR);
    std::vector<uint8_t> any(taps);
    std::vector<float> y(scatter ? GEMM_MR * cout : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * GEMM_MR, rows = std::min<int64_t>(GEMM_MR, p_count - p0);
      gather_block_taps(g, ip + p0, rows, x, m, cin, zero.data(), src.data(), any.data());
      float* yb = scatter ? y.data() : op + p0 * cout;
      gemm_panels(src.data(), any.data(), taps, cin, wp, cout, yb, rows);
      for (int64_t r = 0; scatter && r < rows; ++r) {
        const int64_t q = ip[p0 + r];
        float* dst = op + q * cout;
        const float* yr = yb + r * cout;
        if (rp && rm[q]) {
          const float* rr = rp + q * cout;
#pragma omp simd
          for (int64_t j = 0; j < cout; ++j) dst[j] = yr[j] + rr[j];
        } else {
          std::memcpy(dst, yr, sizeof(float) * cout);
        }
      }
    }
  });
  if (scatter) return {idx, delta[0], delta[1], delta[2]};
  return {out};
}

torch::Tensor conv_rows(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx, torch::Tensor packed,
                        int64_t cout, std::vector<int64_t> geo) {
  return conv_rows_any(ext, in_mask, idx, packed, cout, geo, false)[0];
}

// A plain (groups 1, no activation) conv's output delta: conv_rows at idx, written straight into the
// rows of a new delta (no (P, Cout) matrix scattered afterwards). Returns [idx, ext, values, mask].
std::vector<torch::Tensor> conv_rows_delta(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                           torch::Tensor packed, int64_t cout, std::vector<int64_t> geo) {
  return conv_rows_any(ext, in_mask, idx, packed, cout, geo, true);
}

// ---- the same implicit GEMM with the nonlinear update in its epilogue ---------------------------

namespace {

// exp(x) for 8 floats (Cephes' expf polynomial on x - n ln2, times 2^n; within ~2 ulp of expf),
// inputs clamped to [-87.3, 88.7] so that 2^n stays a normal float.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// exp8's polynomial on 16 lanes (the same operations in the same order: the same results lane for lane).
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// o = f(a) (- e with MINUS) over c channels, f SiLU (CODE 4) or sigmoid (5), 16 lanes at a time and the
// last c % 16 channels masked: smooth_minus and activate_row on AVX-512.
template <int CODE, bool MINUS>
__attribute__((target("avx512f"))) void smooth_row512(const float* a, const float* e, float* o, int64_t c) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = c - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (c - j)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + j);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    __m512 f = _mm512_div_ps(CODE == 4 ? x : one, den);
    if (MINUS) f = _mm512_sub_ps(f, _mm512_maskz_loadu_ps(m, e + j));
    _mm512_mask_storeu_ps(o + j, m, f);
  }
}

// o = f(a) - e over c channels for the ATen-style activations: 4 SiLU a / (1 + exp(-a)), 5 sigmoid.
template <int CODE>
__attribute__((target("avx2,fma"))) void smooth_minus(const float* a, const float* e, float* o, int64_t c) {
  if (use_avx512()) return smooth_row512<CODE, true>(a, e, o, c);
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 x = _mm256_loadu_ps(a + j);
    const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
    const __m256 f = _mm256_div_ps(CODE == 4 ? x : one, den);
    _mm256_storeu_ps(o + j, _mm256_sub_ps(f, _mm256_loadu_ps(e + j)));
  }
  for (; j < c; ++j) {
    const float f = (CODE == 4 ? a[j] : 1.f) / (1.f + std::exp(-a[j]));
    o[j] = f - e[j];
  }
}

// The nonlinear update of one candidate pixel r with change row yr (see act_pixel): returns whether
// it was emitted.
// (Compiled for AVX2: the file's baseline is SSE2, and this epilogue, 3-4 passes over a row's Cout channels, costs
// as much as the GEMM for convs of few input channels, e.g. CenterFace's 16 -> 96 expansion at 288 x 384.)
template <int CODE, int SCORE>
__attribute__((target("avx2,fma"))) bool update_row(const ActArgs& k, int64_t r, const float* yr, float* o) {
  const int64_t c = k.c;
  float* ar = k.acc + r * c;
  const float* er = k.emitted + r * c;
  if (k.res && k.res_mask[r]) {
    const float* rr = k.res + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) ar[j] = ar[j] + (yr[j] + rr[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) ar[j] += yr[j];
  }
  if (CODE >= 4) {
    smooth_minus<CODE>(ar, er, o, c);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) o[j] = activate<CODE>(ar[j], k.lo, k.hi, k.slope) - er[j];
  }
  const bool keep = row_score<SCORE>(o, c) > k.tau;
  if (keep) {
    send_row(o, k.out + r * c, k.emitted + r * c, c);
    k.out_mask[r] = 1;
  }
  return keep;
}

template <int CODE>
bool update_row_score(const ActArgs& k, int64_t score, int64_t r, const float* yr, float* o) {
  return score == 0 ? update_row<CODE, 0>(k, r, yr, o) : update_row<CODE, 1>(k, r, yr, o);
}

bool update_row_any(const ActArgs& k, int64_t code, int64_t score, int64_t r, const float* yr, float* o) {
  switch (code) {
    case 1: return update_row_score<1>(k, score, r, yr, o);
    case 2: return update_row_score<2>(k, score, r, yr, o);
    case 3: return update_row_score<3>(k, score, r, yr, o);
    case 4: return update_row_score<4>(k, score, r, yr, o);
    case 5: return update_row_score<5>(k, score, r, yr, o);
    default: return update_row_score<0>(k, score, r, yr, o);
  }
}

// update_row for the `rows` candidate pixels ip[0..rows) of one GEMM block (change rows y, row stride c) with
// f SiLU or sigmoid, on AVX-512: A += y (+ residual) for every pixel, f over the block's rows * c values of A in
// one exp16 loop (the exp chains of 6 pixels overlap; one call a pixel leaves each chain's latency exposed),
// then o = f(A) - E, truncation and emit per pixel. The same results as update_row on AVX-512. t: rows * c floats.
template <int CODE, int SCORE>
__attribute__((target("avx512f"))) void update_block512(const ActArgs& k, const int64_t* ip, int64_t rows,
                                                        const float* y, float* t, uint8_t* keep) {
  const int64_t c = k.c;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = ip[r];
    float* ar = k.acc + q * c;
    const float* yr = y + r * c;
    const float* rr = k.res && k.res_mask[q] ? k.res + q * c : nullptr;
    float* tr = t + r * c;
    for (int64_t j = 0; j < c; j += 16) {
      const __mmask16 m = c - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (c - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, yr + j);
      if (rr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rr + j));
      v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, ar + j), v);
      _mm512_mask_storeu_ps(ar + j, m, v);
      _mm512_mask_storeu_ps(tr + j, m, v);
    }
  }
  smooth_row512<CODE, false>(t, nullptr, t, rows * c);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = ip[r];
    float* o = t + r * c;
    const float* er = k.emitted + q * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) o[j] -= er[j];
    keep[r] = row_score<SCORE>(o, c) > k.tau;
    if (keep[r]) {
      send_row(o, k.out + q * c, k.emitted + q * c, c);
      k.out_mask[q] = 1;
    }
  }
}

// Ask for the state rows (A, E and the residual's) that the update of candidates ip[0..rows) will read, into L2:
// a delta frame's candidates are scattered over maps of several MB, and without it ~80% of the SiLU epilogue's time
// was the first loads of the A and E rows (perf, YOLOv8n). Issued one GEMM block ahead (conv_act_rows_into), so
// that the block's GEMM hides the latency.
// (An asm statement: GCC 12 dropped _mm_prefetch here, inlined into conv_act_rows_into's lambda.)
inline void prefetch_l2(const char* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

inline void prefetch_state_rows(const ActArgs& k, const int64_t* ip, int64_t rows) {
  const int64_t bytes = k.c * static_cast<int64_t>(sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = ip[r];
    const char* a = reinterpret_cast<const char*>(k.acc + q * k.c);
    const char* e = reinterpret_cast<const char*>(k.emitted + q * k.c);
    const char* rr = k.res && k.res_mask[q] ? reinterpret_cast<const char*>(k.res + q * k.c) : nullptr;
    for (int64_t off = 0; off < bytes; off += 64) {
      prefetch_l2(a + off);
      prefetch_l2(e + off);
      if (rr) prefetch_l2(rr + off);
    }
  }
}

// The nonlinear update of one GEMM block's candidates (see update_row): a block at a time for SiLU and sigmoid
// on AVX-512 (update_block512), else pixel by pixel. t: scratch of GEMM_MR * k.c floats.
void update_block(const ActArgs& k, int64_t code, int64_t score, const int64_t* ip, int64_t rows, const float* y,
                  float* t, uint8_t* keep) {
  if (code >= 4 && use_avx512()) {
    if (code == 4) score == 0 ? update_block512<4, 0>(k, ip, rows, y, t, keep) : update_block512<4, 1>(k, ip, rows, y, t, keep);
    else score == 0 ? update_block512<5, 0>(k, ip, rows, y, t, keep) : update_block512<5, 1>(k, ip, rows, y, t, keep);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) keep[r] = update_row_any(k, code, score, ip[r], y + r * k.c, t);
}

}  // namespace

// conv_rows at candidate pixels idx, then, in the same pass over each block of 6 pixels, the
// nonlinear update as act_update does it (A += y (+ residual), o = f(A) - E, truncation, emit,
// E += o), with activation codes 0-3 as act_update's plus 4 SiLU and 5 sigmoid (vectorised exp:
// within a few ulp of ATen's, not bit-identical). Returns the emitted delta as act_update does.
namespace {

// conv_act_rows_into's body for any gather of the GEMM operand rows: gather(ip, rows, zero, src, any) fills one
// block's `taps` x GEMM_MR source rows of `cin` floats each (see gather_block_taps); packed holds taps * cin rows.
template <class Gather>
std::vector<torch::Tensor> conv_act_rows_gathered(const Gather& gather, int64_t taps, int64_t cin, torch::Tensor idx,
                                                  torch::Tensor packed, const Geometry& g,
                                                  c10::optional<torch::Tensor> residual,
                                                  c10::optional<torch::Tensor> res_mask, torch::Tensor acc,
                                                  torch::Tensor emitted, int64_t code, double lo, double hi,
                                                  double slope, double tau, int64_t score, torch::Tensor* kept_ext) {
  TORCH_CHECK(has_conv_rows(), "conv_act_rows needs AVX2 and FMA");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  TORCH_CHECK(code >= 0 && code <= 5, "unknown activation code ", code);
  TORCH_CHECK(residual.has_value() == res_mask.has_value(), "residual and res_mask come together");
  TORCH_CHECK(emitted.dim() == 4 && emitted.size(0) == g.n && emitted.size(2) == g.ho && emitted.size(3) == g.wo,
              "emitted must be (N, Cout, Ho, Wo)");
  const int64_t p_count = idx.numel(), cout = emitted.size(1);
  const int64_t total = g.n * g.ho * g.wo, panels = (cout + GEMM_NR - 1) / GEMM_NR;
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == panels && packed.size(1) == taps * cin && packed.size(2) == GEMM_NR,
              "packed must be a contiguous (", panels, ", ", taps * cin, ", 16) float32 tensor");
  const float* wp = packed.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto out = output_delta(g.n, cout, g.ho, g.wo, kept_ext);
  std::vector<uint8_t> keep(p_count);
  const ActArgs k{nullptr, ip, residual ? rows_ptr(*residual, total, cout, "residual") : nullptr,
                  res_mask ? mask_ptr(*res_mask, total, "res_mask") : nullptr, rows_ptr(acc, total, cout, "acc"),
                  rows_ptr(emitted, total, cout, "emitted"), out[0].data_ptr<float>(), mask_out(out[2]), keep.data(),
                  cout, static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(slope),
                  static_cast<float>(tau), false};
  const std::vector<float> zero(cin, 0.f);
  const int64_t blocks = (p_count + GEMM_MR - 1) / GEMM_MR;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    std::vector<const float*> src(taps * GEMM_MR);
    std::vector<uint8_t> any(taps);
    std::vector<float> y(GEMM_MR * cout), o(GEMM_MR * cout);
    if (b0 < b1) prefetch_state_rows(k, ip + b0 * GEMM_MR, std::min<int64_t>(GEMM_MR, p_count - b0 * GEMM_MR));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * GEMM_MR, rows = std::min<int64_t>(GEMM_MR, p_count - p0);
      if (blk + 1 < b1)  // the next block's state rows, while this block's GEMM runs
        prefetch_state_rows(k, ip + p0 + GEMM_MR, std::min<int64_t>(GEMM_MR, p_count - p0 - GEMM_MR));
      gather(ip + p0, rows, zero.data(), src.data(), any.data());
      gemm_panels(src.data(), any.data(), taps, cin, wp, cout, y.data(), rows);
      update_block(k, code, score, ip + p0, rows, y.data(), o.data(), keep.data() + p0);
    }
  });
  return {compact(keep.data(), p_count, ip), out[0], out[1], out[2]};
}

// The operand rows of a 1x1 conv (stride 1, no padding) whose input is a channel cat read in place: its parts'
// rows, each split into taps of `width` channels (the parts' widths' common divisor), in channel order, so the
// packed weights of the conv over the cat are those taps' rows as they are. Tap t reads base[t] + q * stride[t]
// at pixel q where its part's mask is set, else the zero row: the cat's rows, without writing them.
struct CatTaps {
  std::vector<const float*> base;
  std::vector<int64_t> stride;
  std::vector<const uint8_t*> mask;
  int64_t width = 0;

  void operator()(const int64_t* ip, int64_t rows, const float* zero, const float** src, uint8_t* any) const {
    const int64_t taps = static_cast<int64_t>(base.size());
    for (int64_t t = 0; t < taps; ++t) {
      const float* b = base[t];
      const uint8_t* m = mask[t];
      const int64_t s = stride[t];
      uint8_t live_any = 0;
      for (int64_t r = 0; r < GEMM_MR; ++r) {
        const bool live = r < rows && m[ip[r]];
        src[t * GEMM_MR + r] = live ? b + ip[r] * s : zero;
        live_any |= live;
      }
      any[t] = live_any;
    }
  }
};

// CatTaps of parts `rows` (float32 rows of each part's channels, see rows_ptr) with masks `masks`, `total` pixels.
CatTaps cat_taps(const std::vector<torch::Tensor>& rows, const std::vector<torch::Tensor>& masks, int64_t total) {
  TORCH_CHECK(!rows.empty() && rows.size() == masks.size(), "a cat read in place needs one mask per part");
  int64_t width = 0;
  for (const auto& r : rows) width = std::gcd(width, r.size(1));
  CatTaps t;
  t.width = width;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t c = rows[i].size(1);
    const float* base = rows_ptr(rows[i], total, c, "part rows");
    const uint8_t* m = mask_ptr(masks[i], total, "part mask");
    for (int64_t off = 0; off < c; off += width) {
      t.base.push_back(base + off);
      t.stride.push_back(c);
      t.mask.push_back(m);
    }
  }
  return t;
}

// The taps of a dense frame's channel cat read in place by a 1x1 conv (conv_dense's `parts`): each part split into
// taps of `width` channels (the parts' widths' common divisor), in channel order, every pixel live. A part is any
// float32 (N, Ci, H, W) map whose pixels' channels are contiguous (channels_last, or a channel view of such a map:
// C2f's halves), read at base + n * sn + y * sy + x * sx.
struct DenseCatTaps {
  std::vector<const float*> base;
  std::vector<int64_t> sn, sy, sx;
  int64_t width = 0;
};

DenseCatTaps dense_cat_taps(const std::vector<torch::Tensor>& parts) {
  DenseCatTaps t;
  for (const auto& q : parts) t.width = std::gcd(t.width, q.size(1));
  for (const auto& q : parts) {
    TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 4 && q.stride(1) == 1,
                "each part of a cat read in place must be a float32 (N, C, H, W) map with contiguous channels");
    const float* base = q.data_ptr<float>();
    for (int64_t off = 0; off < q.size(1); off += t.width) {
      t.base.push_back(base + off);
      t.sn.push_back(q.stride(0));
      t.sy.push_back(q.stride(2));
      t.sx.push_back(q.stride(3));
    }
  }
  return t;
}

}  // namespace

std::vector<torch::Tensor> conv_act_rows_into(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                         torch::Tensor packed, std::vector<int64_t> geo,
                                         c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> res_mask,
                                         torch::Tensor acc, torch::Tensor emitted, int64_t code, double lo, double hi,
                                         double slope, double tau, int64_t score,
                                              torch::Tensor* kept_ext) {
  const Geometry g = geometry(geo);
  const uint8_t* m = mask_ptr(in_mask, g.n * g.h * g.w, "in_mask");
  const int64_t cin = ext.size(1);
  const float* x = rows_ptr(ext, g.n * g.h * g.w, cin, "ext");
  auto gather = [&](const int64_t* ip, int64_t rows, const float* zero, const float** src, uint8_t* any) {
    gather_block_taps(g, ip, rows, x, m, cin, zero, src, any);
  };
  return conv_act_rows_gathered(gather, g.kh * g.kw, cin, idx, packed, g, residual, res_mask, acc, emitted, code, lo,
                                hi, slope, tau, score, kept_ext);
}

std::vector<torch::Tensor> conv_act_rows(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                         torch::Tensor packed, std::vector<int64_t> geo,
                                         c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> res_mask,
                                         torch::Tensor acc, torch::Tensor emitted, int64_t code, double lo, double hi,
                                         double slope, double tau, int64_t score) {
  return conv_act_rows_into(ext, in_mask, idx, packed, geo, residual, res_mask, acc, emitted, code, lo, hi, slope,
                            tau, score, nullptr);
}

// ---- depthwise convs (groups == channels), optionally with the nonlinear update -----------------

namespace {

// GCC vector types: the depthwise bodies are written once over V and inlined into one wrapper per ISA, whose
// target decides the instructions (16 lanes: one zmm; 8: one ymm). The U types read and write unaligned channel rows.
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4), may_alias));

template <class V> struct VecOf;
template <> struct VecOf<vf16> { using U = vf16u; static constexpr int64_t lanes = 16; };
template <> struct VecOf<vf8> { using U = vf8u; static constexpr int64_t lanes = 8; };

template <class V> __attribute__((always_inline)) inline V vld(const float* p) {
  return *reinterpret_cast<const typename VecOf<V>::U*>(p);
}
template <class V> __attribute__((always_inline)) inline void vst(float* p, V v) {
  *reinterpret_cast<typename VecOf<V>::U*>(p) = v;
}

// activate<CODE> on a vector (codes 0-3; the same comparisons, so the same results lane for lane).
template <int CODE, class V> __attribute__((always_inline)) inline V vactivate(V a, float lo, float hi, float slope) {
  const V z = {};
  if (CODE == 1) return a > z ? a : z;
  if (CODE == 2) {
    const V l = z + lo, h = z + hi;
    return a < l ? l : (a > h ? h : a);
  }
  if (CODE == 3) return a > z ? a : a * slope;
  return a;
}

constexpr int64_t DW_MAX_TAPS = 49;  // depthwise_rows' windows: up to 7 x 7 (cpu_fused.DW_MAX_TAPS)

// The live taps of output pixel q (in the image, input pixel updated): their source rows in x and weight rows in
// w (taps, C), into src and wr (DW_MAX_TAPS each); returns their count.
__attribute__((always_inline)) inline int64_t depthwise_taps(const Geometry& g, const uint8_t* m, const float* x,
                                                             const float* w, int64_t c, int64_t q, const float** src,
                                                             const float** wr) {
  int64_t nt = 0;
  const int64_t n = q / (g.ho * g.wo), rem = q % (g.ho * g.wo);
  const int64_t oy = rem / g.wo, ox = rem % g.wo;
  for (int64_t ky = 0, t = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.pt + ky * g.dh;
    if (iy < 0 || iy >= g.h) {
      t += g.kw;
      continue;
    }
    for (int64_t kx = 0; kx < g.kw; ++kx, ++t) {
      const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
      const int64_t s = (n * g.h + iy) * g.w + ix;
      if (ix < 0 || ix >= g.w || !m[s]) continue;
      src[nt] = x + s * c;
      wr[nt++] = w + t * c;
    }
  }
  return nt;
}

// y = sum over the live taps of x[src] * w[t] (per channel) for output pixel q: the live taps found once, then
// each vector of channels summed over them in a register (two vectors at a time: two independent FMA chains).
// Inlined into one wrapper per ISA below.
template <class V>
__attribute__((always_inline)) inline void depthwise_row_body(const Geometry& g, const uint8_t* m, const float* x,
                                                              const float* w, int64_t c, int64_t q, float* y) {
  constexpr int64_t L = VecOf<V>::lanes;
  const float* src[DW_MAX_TAPS];
  const float* wr[DW_MAX_TAPS];
  const int64_t nt = depthwise_taps(g, m, x, w, c, q, src, wr);
  int64_t j = 0;
  for (; j + 2 * L <= c; j += 2 * L) {
    V a0 = {}, a1 = {};
    for (int64_t t = 0; t < nt; ++t) {
      a0 += vld<V>(src[t] + j) * vld<V>(wr[t] + j);
      a1 += vld<V>(src[t] + j + L) * vld<V>(wr[t] + j + L);
    }
    vst<V>(y + j, a0);
    vst<V>(y + j + L, a1);
  }
  for (; j + L <= c; j += L) {
    V a = {};
    for (int64_t t = 0; t < nt; ++t) a += vld<V>(src[t] + j) * vld<V>(wr[t] + j);
    vst<V>(y + j, a);
  }
  for (; j < c; ++j) {
    float a = 0.f;
    for (int64_t t = 0; t < nt; ++t) a = std::fma(src[t][j], wr[t][j], a);
    y[j] = a;
  }
}

__attribute__((target("avx2,fma"))) void depthwise_row_avx2(const Geometry& g, const uint8_t* m, const float* x,
                                                            const float* w, int64_t c, int64_t q, float* y) {
  depthwise_row_body<vf8>(g, m, x, w, c, q, y);
}

__attribute__((target("avx512f"))) void depthwise_row_avx512(const Geometry& g, const uint8_t* m, const float* x,
                                                             const float* w, int64_t c, int64_t q, float* y) {
  depthwise_row_body<vf16>(g, m, x, w, c, q, y);
}

void depthwise_row(const Geometry& g, const uint8_t* m, const float* x, const float* w, int64_t c, int64_t q,
                   float* y) {
  if (use_avx512()) depthwise_row_avx512(g, m, x, w, c, q, y);
  else depthwise_row_avx2(g, m, x, w, c, q, y);
}

// The depthwise conv of output pixel q with the nonlinear update of update_row<CODE, SCORE> (codes 0-3) on each
// vector of channels as it is summed (no y row written and read back): A += y (+ the residual row where res_mask),
// o = f(A) - E into o, the score over the row; emitted (out = o, E += o) when it passes tau. The same A, o and E
// as depthwise_row then update_row, element for element (the L2 score's sum in another order; leaky_relu's
// a * slope - E contracted into an FMA in one of the two: 1 ulp).
template <class V, int CODE, int SCORE>
__attribute__((always_inline)) inline bool depthwise_update_body(const ActArgs& k, const Geometry& g,
                                                                 const uint8_t* m, const float* x, const float* w,
                                                                 int64_t q, float* o) {
  constexpr int64_t L = VecOf<V>::lanes;
  const int64_t c = k.c;
  const float* src[DW_MAX_TAPS];
  const float* wr[DW_MAX_TAPS];
  const int64_t nt = depthwise_taps(g, m, x, w, c, q, src, wr);
  float* ar = k.acc + q * c;
  const float* er = k.emitted + q * c;
  const float* rr = k.res && k.res_mask[q] ? k.res + q * c : nullptr;
  const V z = {};
  V sv = z;
  int64_t j = 0;
  for (; j + L <= c; j += L) {
    V y = z;
    for (int64_t t = 0; t < nt; ++t) y += vld<V>(src[t] + j) * vld<V>(wr[t] + j);
    V a = vld<V>(ar + j);
    a = rr ? a + (y + vld<V>(rr + j)) : a + y;
    vst<V>(ar + j, a);
    const V ov = vactivate<CODE>(a, k.lo, k.hi, k.slope) - vld<V>(er + j);
    vst<V>(o + j, ov);
    if (SCORE == 0) {
      const V ab = ov < z ? -ov : ov;
      sv = ab > sv ? ab : sv;
    } else {
      sv += ov * ov;
    }
  }
  float s = 0.f;
  for (int64_t i = 0; i < L; ++i) s = SCORE == 0 ? std::max(s, sv[i]) : s + sv[i];
  for (; j < c; ++j) {
    float y = 0.f;
    for (int64_t t = 0; t < nt; ++t) y = std::fma(src[t][j], wr[t][j], y);
    ar[j] = rr ? ar[j] + (y + rr[j]) : ar[j] + y;
    o[j] = activate<CODE>(ar[j], k.lo, k.hi, k.slope) - er[j];
    s = SCORE == 0 ? std::max(s, std::fabs(o[j])) : s + o[j] * o[j];
  }
  if (SCORE == 1) s = std::sqrt(s);
  if (!(s > k.tau)) return false;
  float* out = k.out + q * c;
  float* e = k.emitted + q * c;
  for (j = 0; j + L <= c; j += L) {
    const V ov = vld<V>(o + j);
    vst<V>(out + j, ov);
    vst<V>(e + j, vld<V>(e + j) + ov);
  }
  for (; j < c; ++j) {
    out[j] = o[j];
    e[j] += o[j];
  }
  k.out_mask[q] = 1;
  return true;
}

template <int CODE, int SCORE>
__attribute__((target("avx512f"))) void depthwise_update_range512(const ActArgs& k, const Geometry& g,
                                                                  const uint8_t* m, const float* x, const float* w,
                                                                  int64_t b, int64_t end, float* o) {
  for (int64_t p = b; p < end; ++p) k.keep[p] = depthwise_update_body<vf16, CODE, SCORE>(k, g, m, x, w, k.idx[p], o);
}

template <int CODE, int SCORE>
__attribute__((target("avx2,fma"))) void depthwise_update_range256(const ActArgs& k, const Geometry& g,
                                                                   const uint8_t* m, const float* x, const float* w,
                                                                   int64_t b, int64_t end, float* o) {
  for (int64_t p = b; p < end; ++p) k.keep[p] = depthwise_update_body<vf8, CODE, SCORE>(k, g, m, x, w, k.idx[p], o);
}

template <int CODE, int SCORE>
void depthwise_update_range_isa(const ActArgs& k, const Geometry& g, const uint8_t* m, const float* x, const float* w,
                                int64_t b, int64_t end, float* o) {
  if (use_avx512()) depthwise_update_range512<CODE, SCORE>(k, g, m, x, w, b, end, o);
  else depthwise_update_range256<CODE, SCORE>(k, g, m, x, w, b, end, o);
}

template <int CODE>
void depthwise_update_range(const ActArgs& k, int64_t score, const Geometry& g, const uint8_t* m, const float* x,
                            const float* w, int64_t b, int64_t end, float* o) {
  if (score == 0) depthwise_update_range_isa<CODE, 0>(k, g, m, x, w, b, end, o);
  else depthwise_update_range_isa<CODE, 1>(k, g, m, x, w, b, end, o);
}

}  // namespace

// A depthwise conv (one filter per channel) at output pixels idx, reading the taps in place (zero
// where outside the image or not updated); weights (taps, C). Without acc: returns the (P, C) rows.
// With acc/emitted: runs the nonlinear update of conv_act_rows on each row and returns the emitted
// delta [indices, ext, values, mask].
std::vector<torch::Tensor> depthwise_rows_into(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                          torch::Tensor weights, std::vector<int64_t> geo,
                                          c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> res_mask,
                                          c10::optional<torch::Tensor> acc, c10::optional<torch::Tensor> emitted,
                                          int64_t code, double lo, double hi, double slope, double tau, int64_t score,
                                               torch::Tensor* kept_ext) {
  TORCH_CHECK(has_conv_rows(), "depthwise_rows needs AVX2 and FMA");
  const Geometry g = geometry(geo);
  const uint8_t* m = mask_ptr(in_mask, g.n * g.h * g.w, "in_mask");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  TORCH_CHECK(code >= 0 && code <= 5, "unknown activation code ", code);
  TORCH_CHECK(acc.has_value() == emitted.has_value(), "acc and emitted come together");
  TORCH_CHECK(residual.has_value() == res_mask.has_value(), "residual and res_mask come together");
  const int64_t c = ext.size(1), taps = g.kh * g.kw, p_count = idx.numel(), total = g.n * g.ho * g.wo;
  TORCH_CHECK(taps <= DW_MAX_TAPS, "depthwise_rows takes windows of at most ", DW_MAX_TAPS, " taps");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat && weights.is_contiguous() && weights.dim() == 2 &&
                  weights.size(0) == taps && weights.size(1) == c, "weights must be a contiguous (", taps, ", ", c,
              ") float32 tensor");
  const float* x = rows_ptr(ext, g.n * g.h * g.w, c, "ext");
  const float* w = weights.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  if (!acc) {
    TORCH_CHECK(!residual, "a residual needs the update (acc, emitted)");
    auto y = torch::empty({p_count, c}, torch::kFloat);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
      for (int64_t p = b; p < end; ++p) depthwise_row(g, m, x, w, c, ip[p], yp + p * c);
    });
    return {y};
  }
  TORCH_CHECK(emitted->dim() == 4 && emitted->size(1) == c && emitted->size(2) == g.ho && emitted->size(3) == g.wo,
              "emitted must be (N, C, Ho, Wo)");
  auto out = output_delta(g.n, c, g.ho, g.wo, kept_ext);
  std::vector<uint8_t> keep(p_count);
  const ActArgs k{nullptr, ip, residual ? rows_ptr(*residual, total, c, "residual") : nullptr,
                  res_mask ? mask_ptr(*res_mask, total, "res_mask") : nullptr, rows_ptr(*acc, total, c, "acc"),
                  rows_ptr(*emitted, total, c, "emitted"), out[0].data_ptr<float>(), mask_out(out[2]), keep.data(),
                  c, static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(slope),
                  static_cast<float>(tau), false};
  at::parallel_for(0, p_count, 64, [&](int64_t b, int64_t end) {
    std::vector<float> y(c), o(c);
    if (code <= 3 && dw_fused_update_on()) {  // the update on each vector of channels as it is summed
      switch (code) {
        case 1: depthwise_update_range<1>(k, score, g, m, x, w, b, end, o.data()); break;
        case 2: depthwise_update_range<2>(k, score, g, m, x, w, b, end, o.data()); break;
        case 3: depthwise_update_range<3>(k, score, g, m, x, w, b, end, o.data()); break;
        default: depthwise_update_range<0>(k, score, g, m, x, w, b, end, o.data()); break;
      }
      return;
    }
    for (int64_t p = b; p < end; ++p) {
      depthwise_row(g, m, x, w, c, ip[p], y.data());
      keep[p] = update_row_any(k, code, score, ip[p], y.data(), o.data());
    }
  });
  return {compact(keep.data(), p_count, ip), out[0], out[1], out[2]};
}

std::vector<torch::Tensor> depthwise_rows(torch::Tensor ext, torch::Tensor in_mask, torch::Tensor idx,
                                          torch::Tensor weights, std::vector<int64_t> geo,
                                          c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> res_mask,
                                          c10::optional<torch::Tensor> acc, c10::optional<torch::Tensor> emitted,
                                          int64_t code, double lo, double hi, double slope, double tau, int64_t score) {
  return depthwise_rows_into(ext, in_mask, idx, weights, geo, residual, res_mask, acc, emitted, code, lo, hi, slope,
                             tau, score, nullptr);
}

// ---- dense convs of keyframes and dense frames, with the epilogue and the state writes -----------

namespace {

// conv_dense's epilogue (bias, residual, f, the state writes) runs over chunks of about this many outputs (<= 16 KB)
constexpr int64_t EPILOGUE_FLOATS = 4096;

// f(v) over c channels into f (codes as conv_act_rows: 0 identity, 1 relu, 2 hardtanh, 3 leaky, 4 SiLU,
// 5 sigmoid; SiLU and sigmoid by exp8, within a few ulp of ATen's).
__attribute__((target("avx2,fma"))) void activate_row(int64_t code, const float* v, float* f, int64_t c, float lo,
                                                      float hi, float slope) {
  if (code >= 4 && use_avx512()) return code == 4 ? smooth_row512<4, false>(v, nullptr, f, c)
                                                  : smooth_row512<5, false>(v, nullptr, f, c);
  int64_t j = 0;
  if (code >= 4) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (; j + 8 <= c; j += 8) {
      const __m256 x = _mm256_loadu_ps(v + j);
      const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
      _mm256_storeu_ps(f + j, _mm256_div_ps(code == 4 ? x : one, den));
    }
    for (; j < c; ++j) f[j] = (code == 4 ? v[j] : 1.f) / (1.f + std::exp(-v[j]));
    return;
  }
  switch (code) {
    case 1: for (; j < c; ++j) f[j] = activate<1>(v[j], lo, hi, slope); break;
    case 2: for (; j < c; ++j) f[j] = activate<2>(v[j], lo, hi, slope); break;
    case 3: for (; j < c; ++j) f[j] = activate<3>(v[j], lo, hi, slope); break;
    default: for (; j < c; ++j) f[j] = v[j]; break;
  }
}

// conv_dense's epilogue on AVX-512 over one block of `rows` consecutive output pixels, whose rows are
// contiguous: v = y + bias (+ residual) into v, then out = f(v) over the block's rows * cout values at once
// (one exp16 loop a block instead of one activate_row call a pixel; the sums in activate_row's order).
__attribute__((target("avx512f"))) void dense_epilogue512(const float* y, const float* bias, const float* res,
                                                          float* v, float* out, int64_t rows, int64_t cout,
                                                          int64_t code, float lo, float hi, float slope) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * cout;
    const float* rr = res ? res + r * cout : nullptr;
    float* vr = v + r * cout;
    for (int64_t c = 0; c < cout; c += 16) {
      const __mmask16 m = cout - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (cout - c)) - 1);
      __m512 a = _mm512_maskz_loadu_ps(m, yr + c);
      if (bias) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, bias + c));
      if (rr) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, rr + c));
      _mm512_mask_storeu_ps(vr + c, m, a);
    }
  }
  const int64_t n = rows * cout;
  switch (code) {
    case 1: for (int64_t j = 0; j < n; ++j) out[j] = activate<1>(v[j], lo, hi, slope); break;
    case 2: for (int64_t j = 0; j < n; ++j) out[j] = activate<2>(v[j], lo, hi, slope); break;
    case 3: for (int64_t j = 0; j < n; ++j) out[j] = activate<3>(v[j], lo, hi, slope); break;
    case 4: smooth_row512<4, false>(v, nullptr, out, n); break;
    case 5: smooth_row512<5, false>(v, nullptr, out, n); break;
    default: if (out != v) std::memcpy(out, v, sizeof(float) * n); break;
  }
}

}  // namespace

// A dense conv (groups 1) over every output pixel, for keyframes and dense frames, in one pass:
//   v = conv(x) + bias (+ residual), out = f(v); with acc (a keyframe) also A = v, and with emitted
//   E = out (or pass E itself as out: the keyframe's output is E).
// x: float32 (N, Cin, H, W) whose channels are contiguous (channels_last, or a channel slice of it);
// packed: as conv_rows; bias (Cout,) or None; residual, out, acc, emitted: channels_last float32 of the
// output's shape (out, acc and emitted overwritten). code: the activation as conv_act_rows (0 and no
// state for a plain conv).
// The GEMM's operand rows are read in place. When x's pixels are contiguous rows and the window has no
// column dilation, a window row's kw taps are one run of kw * Cin values: the micro-kernel then loops
// over kh runs instead of kh * kw taps (the RGB stem: 3 runs of 9 values instead of 9 taps of 3);
// pixels whose window crosses the left or right border get their runs copied with zeros.
// `parts`: the input is the channel cat of these (N, Ci, H, W) float32 maps, read in place (a 1x1 conv, stride 1, no
// padding: see DenseCatTaps; a keyframe's cat whose one reader is this conv is then never written); x is not read.
void conv_dense(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, std::vector<int64_t> geo,
                c10::optional<torch::Tensor> residual, torch::Tensor out, c10::optional<torch::Tensor> acc,
                c10::optional<torch::Tensor> emitted, int64_t code, double lo, double hi, double slope,
                std::vector<torch::Tensor> parts) {
  TORCH_CHECK(has_conv_rows(), "conv_dense needs AVX2 and FMA");
  const Geometry g = geometry(geo);
  const int64_t taps = g.kh * g.kw, cout = out.size(1), total = g.n * g.ho * g.wo;
  DenseCatTaps cat;
  int64_t cin = 0;
  if (parts.empty()) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4 && x.size(0) == g.n && x.size(2) == g.h &&
                    x.size(3) == g.w && x.stride(1) == 1,
                "x must be a float32 (N, Cin, H, W) tensor of the geometry's input size with contiguous channels");
    cin = x.size(1);
  } else {
    TORCH_CHECK(taps == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && g.ho == g.h && g.wo == g.w,
                "a cat's parts are read in place by a 1x1 conv with stride 1 and no padding only");
    for (const auto& q : parts) {
      TORCH_CHECK(q.dim() == 4 && q.size(0) == g.n && q.size(2) == g.h && q.size(3) == g.w,
                  "each part must be an (N, Ci, H, W) map of the geometry's input size");
      cin += q.size(1);
    }
    cat = dense_cat_taps(parts);
  }
  TORCH_CHECK(code >= 0 && code <= 5, "unknown activation code ", code);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == g.n && out.size(2) == g.ho && out.size(3) == g.wo,
              "out must be (N, Cout, Ho, Wo)");
  const int64_t panels = (cout + GEMM_NR - 1) / GEMM_NR;
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == panels && packed.size(1) == taps * cin && packed.size(2) == GEMM_NR,
              "packed must be a contiguous (", panels, ", ", taps * cin, ", 16) float32 tensor");
  const float* bp = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == cout,
                "bias must be a contiguous float32 (", cout, ",) tensor");
    bp = bias->data_ptr<float>();
  }
  float* op = rows_ptr(out, total, cout, "out");
  const float* rp = residual ? rows_ptr(*residual, total, cout, "residual") : nullptr;
  float* ap = acc ? rows_ptr(*acc, total, cout, "acc") : nullptr;
  float* ep = emitted ? rows_ptr(*emitted, total, cout, "emitted") : nullptr;
  const bool from_parts = !parts.empty();
  const float* xp = from_parts ? nullptr : x.data_ptr<float>();
  const int64_t sn = from_parts ? 0 : x.stride(0), sy = from_parts ? 0 : x.stride(2), sx = from_parts ? 0 : x.stride(3);
  // runs: a window row is kw consecutive pixels' channels, contiguous in memory
  const bool runs = !from_parts && g.kw > 1 && g.dw == 1 && sx == cin;
  // the micro-kernel's taps and depth (parts: the cat's taps of its parts' common width)
  const int64_t vt = from_parts ? static_cast<int64_t>(cat.base.size()) : runs ? g.kh : taps;
  const int64_t vk = from_parts ? cat.width : runs ? g.kw * cin : cin;
  const float* wp = packed.data_ptr<float>();
  const float flo = lo, fhi = hi, fslope = slope;
  // The GEMM runs a block of GEMM_MR pixels at a time, the epilogue once per chunk of up to `cb` consecutive blocks of
  // an output row (about EPILOGUE_FLOATS outputs): SiLU's exp chains over one block's 6 rows leave most of their
  // latency exposed (YOLOv8n's stem, benchmarks/cpu_dense_epilogue.py: SiLU +0.60 ns an output a block at a time,
  // +0.18 a chunk at a time; the chunk's A write in one burst costs part of it back, +0.05 -> +0.16 ns).
  const int64_t row_blocks = (g.wo + GEMM_MR - 1) / GEMM_MR;
  const int64_t cb = std::max<int64_t>(1, std::min<int64_t>(row_blocks, EPILOGUE_FLOATS / (GEMM_MR * cout)));
  const int64_t row_chunks = (row_blocks + cb - 1) / cb, chunks = g.n * g.ho * row_chunks;
  at::parallel_for(0, chunks, std::max<int64_t>(1, 4 / cb), [&](int64_t c0, int64_t c1) {
    const std::vector<float> zero(vk, 0.f);
    std::vector<float> edge(runs ? GEMM_MR * vt * vk : 0);  // border pixels' runs, zero-filled outside
    std::vector<const float*> src(vt * GEMM_MR);
    std::vector<uint8_t> any(vt);
    std::vector<float> y(cb * GEMM_MR * cout), v(cb * GEMM_MR * cout);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t row = chunk / row_chunks, px0 = (chunk % row_chunks) * cb * GEMM_MR;
      const int64_t n = row / g.ho, oy = row % g.ho;
      const int64_t px1 = std::min<int64_t>(g.wo, px0 + cb * GEMM_MR);  // the chunk's pixels [px0, px1) of the row
      for (int64_t ox0 = px0; ox0 < px1; ox0 += GEMM_MR) {
        const int64_t rows = std::min<int64_t>(GEMM_MR, g.wo - ox0);
        const float* xn = xp + n * sn;
        std::fill(any.begin(), any.end(), 0);
        for (int64_t r = 0; r < GEMM_MR; ++r) {
          const int64_t ox = ox0 + std::min<int64_t>(r, rows - 1);  // rows past the end repeat the last
          if (from_parts) {  // the pixel in every part (1x1, stride 1, no padding: output pixel = input pixel)
            for (int64_t t = 0; t < vt; ++t) {
              src[t * GEMM_MR + r] = cat.base[t] + n * cat.sn[t] + oy * cat.sy[t] + ox * cat.sx[t];
              any[t] = 1;
            }
            continue;
          }
          if (runs) {
            const int64_t ix0 = ox * g.sw - g.pl;
            const bool inside = ix0 >= 0 && ix0 + g.kw <= g.w;
            for (int64_t ky = 0; ky < g.kh; ++ky) {
              const int64_t iy = oy * g.sh - g.pt + ky * g.dh;
              if (iy < 0 || iy >= g.h) {
                src[ky * GEMM_MR + r] = zero.data();
                continue;
              }
              any[ky] = 1;
              const float* s = xn + iy * sy + ix0 * sx;
              if (inside) {
                src[ky * GEMM_MR + r] = s;
                continue;
              }
              float* d = edge.data() + (r * vt + ky) * vk;
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t ix = ix0 + kx;
                if (ix >= 0 && ix < g.w) std::memcpy(d + kx * cin, s + kx * sx, sizeof(float) * cin);
                else std::memset(d + kx * cin, 0, sizeof(float) * cin);
              }
              src[ky * GEMM_MR + r] = d;
            }
            continue;
          }
          for (int64_t ky = 0, t = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.sh - g.pt + ky * g.dh;
            const bool vy = iy >= 0 && iy < g.h;
            for (int64_t kx = 0; kx < g.kw; ++kx, ++t) {
              const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
              const bool live = vy && ix >= 0 && ix < g.w;
              src[t * GEMM_MR + r] = live ? xn + iy * sy + ix * sx : zero.data();
              any[t] |= live;
            }
          }
        }
        gemm_panels(src.data(), any.data(), vt, vk, wp, cout, y.data() + (ox0 - px0) * cout, rows);
      }
      const int64_t rows = px1 - px0;
      if (use_avx512()) {
        const int64_t q0 = (row * g.wo + px0) * cout;
        float* ob = op + q0;  // a plain conv (no A) writes v straight into out
        dense_epilogue512(y.data(), bp, rp ? rp + q0 : nullptr, ap ? ap + q0 : (code ? v.data() : ob), ob, rows,
                          cout, code, flo, fhi, fslope);
        if (ep) std::memcpy(ep + q0, ob, sizeof(float) * rows * cout);
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t q = row * g.wo + px0 + r;
        const float* yr = y.data() + r * cout;
        const float* rr = rp ? rp + q * cout : nullptr;
        float* vr = ap ? ap + q * cout : v.data();  // A is v itself on keyframes
        if (bp && rr) {
#pragma omp simd
          for (int64_t c = 0; c < cout; ++c) vr[c] = (yr[c] + bp[c]) + rr[c];
        } else if (bp) {
#pragma omp simd
          for (int64_t c = 0; c < cout; ++c) vr[c] = yr[c] + bp[c];
        } else if (rr) {
#pragma omp simd
          for (int64_t c = 0; c < cout; ++c) vr[c] = yr[c] + rr[c];
        } else {
          std::memcpy(vr, yr, sizeof(float) * cout);
        }
        float* orow = op + q * cout;
        activate_row(code, vr, orow, cout, flo, fhi, fslope);
        if (ep) std::memcpy(ep + q * cout, orow, sizeof(float) * cout);
      }
    }
  });
}

// ---- dense depthwise convs of keyframes and dense frames (groups == channels) ----------------------

namespace {

// The arguments of one dense depthwise conv (see depthwise_dense).
struct DwDense {
  Geometry g;
  const float* x;
  int64_t sn, sy, sx, c;
  const float* w;     // (taps, C)
  const float* bias;  // (C,) or null
  const float* res;   // output-shaped rows or null
  float* out;
  float* acc;      // A (keyframes) or null
  float* emitted;  // E or null
  int64_t code;    // 4 and 5 (SiLU, sigmoid): v stored here, f applied by a pass over the row afterwards
  float lo, hi, slope;
};

// v = the conv's value (+ residual) at output pixel q, channels [c0, c0 + lanes): A = v, out = f(v), E = out.
template <class V, int CODE>
__attribute__((always_inline)) inline void dw_finish(const DwDense& k, int64_t q, int64_t c0, V v) {
  const int64_t o = q * k.c + c0;
  if (k.res) v += vld<V>(k.res + o);
  if (k.acc) vst<V>(k.acc + o, v);
  v = vactivate<CODE>(v, k.lo, k.hi, k.slope);
  vst<V>(k.out + o, v);
  if (k.emitted && k.code < 4) vst<V>(k.emitted + o, v);
}

// One output row (n * Ho + oy) of a dense depthwise conv. KH, KW > 0: the window's size at compile time (its
// weights then stay in registers for a whole row of one channel block); 0: the geometry's. Each channel block
// of `lanes` channels runs the row's interior pixels PX at a time (no bounds checks: every tap column is in
// the image), then the border pixels one at a time; the last c % lanes channels run scalar.
template <class V, int KH, int KW, int PX, int CODE>
__attribute__((always_inline)) inline void dw_dense_row(const DwDense& k, int64_t row) {
  constexpr int64_t L = VecOf<V>::lanes;
  const Geometry& g = k.g;
  const int64_t kh = KH ? KH : g.kh, kw = KW ? KW : g.kw, taps = kh * kw;
  const int64_t n = row / g.ho, oy = row % g.ho;
  const float* xn = k.x + n * k.sn;
  int64_t ky0 = 0, ky1 = kh;  // the window rows inside the image
  while (ky0 < kh && oy * g.sh - g.pt + ky0 * g.dh < 0) ++ky0;
  while (ky1 > ky0 && oy * g.sh - g.pt + (ky1 - 1) * g.dh >= g.h) --ky1;
  // interior columns: ox * sw - pl >= 0 and ox * sw - pl + (kw - 1) * dw <= W - 1
  int64_t oxa = (g.pl + g.sw - 1) / g.sw, oxb = 0;
  const int64_t last = g.w - 1 - (kw - 1) * g.dw + g.pl;
  if (last >= 0) oxb = std::min<int64_t>(g.wo, last / g.sw + 1);
  oxa = std::min<int64_t>(oxa, g.wo);
  if (oxb < oxa) oxb = oxa;
  const int64_t q0 = row * g.wo;
  const int64_t cv = k.c - k.c % L;
  constexpr int NT = KH && KW ? KH * KW : 1;
  for (int64_t c0 = 0; c0 < cv; c0 += L) {
    V wv[NT];
    if (KH && KW)
      for (int t = 0; t < NT; ++t) wv[t] = vld<V>(k.w + t * k.c + c0);
    auto wt = [&](int64_t t) -> V { return KH && KW ? wv[t] : vld<V>(k.w + t * k.c + c0); };
    const V bv = k.bias ? vld<V>(k.bias + c0) : V{};
    auto pixel = [&](int64_t ox) {  // any column: taps outside the image skipped
      V a = bv;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const float* xr = xn + (oy * g.sh - g.pt + ky * g.dh) * k.sy + c0;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
          if (ix < 0 || ix >= g.w) continue;
          a += vld<V>(xr + ix * k.sx) * wt(ky * kw + kx);
        }
      }
      dw_finish<V, CODE>(k, q0 + ox, c0, a);
    };
    for (int64_t ox = 0; ox < oxa; ++ox) pixel(ox);
    int64_t ox = oxa;
    for (; ox + PX <= oxb; ox += PX) {
      V a[PX];
      for (int p = 0; p < PX; ++p) a[p] = bv;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const float* xr = xn + (oy * g.sh - g.pt + ky * g.dh) * k.sy + (ox * g.sw - g.pl) * k.sx + c0;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const V wk = wt(ky * kw + kx);
          const float* xk = xr + kx * g.dw * k.sx;
          for (int p = 0; p < PX; ++p) a[p] += vld<V>(xk + p * g.sw * k.sx) * wk;
        }
      }
      for (int p = 0; p < PX; ++p) dw_finish<V, CODE>(k, q0 + ox + p, c0, a[p]);
    }
    for (; ox < g.wo; ++ox) pixel(ox);
  }
  for (int64_t j = cv; j < k.c; ++j) {  // the last channels, one at a time
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      float a = k.bias ? k.bias[j] : 0.f;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const float* xr = xn + (oy * g.sh - g.pt + ky * g.dh) * k.sy + j;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pl + kx * g.dw;
          if (ix >= 0 && ix < g.w) a = std::fma(xr[ix * k.sx], k.w[(ky * kw + kx) * k.c + j], a);
        }
      }
      const int64_t o = (q0 + ox) * k.c + j;
      if (k.res) a += k.res[o];
      if (k.acc) k.acc[o] = a;
      a = activate<CODE>(a, k.lo, k.hi, k.slope);
      k.out[o] = a;
      if (k.emitted && k.code < 4) k.emitted[o] = a;
    }
  }
  (void)taps;
}

template <class V, int PX, int CODE>
__attribute__((always_inline)) inline void dw_dense_rows(const DwDense& k, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (k.g.kh == 3 && k.g.kw == 3) dw_dense_row<V, 3, 3, PX, CODE>(k, r);
    else dw_dense_row<V, 0, 0, PX, CODE>(k, r);
  }
}

template <int CODE>
__attribute__((target("avx512f"))) void dw_dense_rows512(const DwDense& k, int64_t r0, int64_t r1) {
  dw_dense_rows<vf16, 8, CODE>(k, r0, r1);
}

template <int CODE>
__attribute__((target("avx2,fma"))) void dw_dense_rows256(const DwDense& k, int64_t r0, int64_t r1) {
  dw_dense_rows<vf8, 4, CODE>(k, r0, r1);
}

template <int CODE>
void dw_dense_rows_isa(const DwDense& k, int64_t r0, int64_t r1) {
  if (use_avx512()) dw_dense_rows512<CODE>(k, r0, r1);
  else dw_dense_rows256<CODE>(k, r0, r1);
}

}  // namespace

// A dense depthwise conv (one filter per channel) over every output pixel, for keyframes and dense frames, in
// one pass with its epilogue, as conv_dense does for groups 1: v = conv(x) + bias (+ residual), out = f(v);
// with acc (a keyframe) also A = v, and with emitted E = out (or pass E itself as out).
// x: float32 (N, C, H, W) with contiguous channels (any pixel strides); weights: (taps, C) as depthwise_rows';
// bias (C,) or None; residual, out, acc, emitted: channels_last float32 of the output's shape. code: as
// conv_dense's (4 SiLU and 5 sigmoid by a pass over each output row after its conv).
void depthwise_dense(torch::Tensor x, torch::Tensor weights, c10::optional<torch::Tensor> bias,
                     std::vector<int64_t> geo, c10::optional<torch::Tensor> residual, torch::Tensor out,
                     c10::optional<torch::Tensor> acc, c10::optional<torch::Tensor> emitted, int64_t code, double lo,
                     double hi, double slope) {
  TORCH_CHECK(has_conv_rows(), "depthwise_dense needs AVX2 and FMA");
  const Geometry g = geometry(geo);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4 && x.size(0) == g.n && x.size(2) == g.h &&
                  x.size(3) == g.w && (x.stride(1) == 1 || x.size(1) == 1),
              "x must be a float32 (N, C, H, W) tensor of the geometry's input size with contiguous channels");
  TORCH_CHECK(code >= 0 && code <= 5, "unknown activation code ", code);
  const int64_t c = x.size(1), taps = g.kh * g.kw, total = g.n * g.ho * g.wo;
  TORCH_CHECK(weights.scalar_type() == torch::kFloat && weights.is_contiguous() && weights.dim() == 2 &&
                  weights.size(0) == taps && weights.size(1) == c, "weights must be a contiguous (", taps, ", ", c,
              ") float32 tensor");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == g.n && out.size(1) == c && out.size(2) == g.ho && out.size(3) == g.wo,
              "out must be (N, C, Ho, Wo)");
  const float* bp = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == c,
                "bias must be a contiguous float32 (", c, ",) tensor");
    bp = bias->data_ptr<float>();
  }
  const DwDense k{g, x.data_ptr<float>(), x.stride(0), x.stride(2), x.stride(3), c, weights.data_ptr<float>(), bp,
                  residual ? rows_ptr(*residual, total, c, "residual") : nullptr, rows_ptr(out, total, c, "out"),
                  acc ? rows_ptr(*acc, total, c, "acc") : nullptr,
                  emitted ? rows_ptr(*emitted, total, c, "emitted") : nullptr, code, static_cast<float>(lo),
                  static_cast<float>(hi), static_cast<float>(slope)};
  const float flo = lo, fhi = hi, fslope = slope;
  at::parallel_for(0, g.n * g.ho, 1, [&](int64_t r0, int64_t r1) {
    switch (code) {
      case 1: dw_dense_rows_isa<1>(k, r0, r1); break;
      case 2: dw_dense_rows_isa<2>(k, r0, r1); break;
      case 3: dw_dense_rows_isa<3>(k, r0, r1); break;
      default: dw_dense_rows_isa<0>(k, r0, r1); break;
    }
    if (code >= 4) {  // f over the rows' v (in out), in place; then E
      const int64_t span = (r1 - r0) * g.wo * c;
      float* o = k.out + r0 * g.wo * c;
      activate_row(code, o, o, span, flo, fhi, fslope);
      if (k.emitted) std::memcpy(k.emitted + r0 * g.wo * c, o, sizeof(float) * span);
    }
  });
}

// Whether t is a buffer nothing but its one Python object holds: no other tensor (a view) shares its storage and no
// other C++ handle keeps it (the argument itself is one). The caller checks the Python references to that object.
// cpu_fused reuses a dense frame's conv output buffer then: CenterFace's 42 MB maps are fresh pages on every
// allocation (above glibc's mmap threshold), one page fault per 4 KB (~2 us each here).
bool sole_owner(torch::Tensor t) { return t.use_count() == 2 && t.storage().use_count() == 1; }

// ---- YOLOv8's box decode (deltacnn.models.yolov8.decode_boxes) on channels_last head maps ------------

namespace {

// The expectation of the bins' values w under the softmax of logits lg (reg of them; e: scratch):
// sum_j e_j w_j / sum_j e_j with e_j = exp(lg_j - max).
__attribute__((target("avx2,fma"))) float bin_expectation(const float* lg, const float* w, int64_t reg, float* e) {
  float m = lg[0];
  for (int64_t j = 1; j < reg; ++j) m = std::max(m, lg[j]);
  int64_t j = 0;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps(), dv = sv;
  for (; j + 8 <= reg; j += 8) {
    const __m256 ev = exp8(_mm256_sub_ps(_mm256_loadu_ps(lg + j), mv));
    sv = _mm256_add_ps(sv, ev);
    dv = _mm256_fmadd_ps(ev, _mm256_loadu_ps(w + j), dv);
  }
  alignas(32) float sl[8], dl[8];
  _mm256_store_ps(sl, sv);
  _mm256_store_ps(dl, dv);
  float sum = 0.f, dot = 0.f;
  for (int k = 0; k < 8; ++k) {
    sum += sl[k];
    dot += dl[k];
  }
  for (; j < reg; ++j) {
    const float ej = std::exp(lg[j] - m);
    sum += ej;
    dot += ej * w[j];
  }
  return dot / sum;
}

constexpr int64_t DECODE_BLOCK = 8;  // anchors decoded together, so that each output row is written 8 at a time

// One anchor: each side's distance is the expectation of the softmax over its reg bins (box: 4 * reg logits),
// the box (cx, cy, w, h) in input pixels from the cell centre (ax, ay) and the level's stride st, and the nc
// class probabilities (sigmoid of cls). Writes the 4 + nc outputs to dst[c * stride]. e: reg floats of
// scratch, probs: nc. The one definition of the decode's arithmetic (yolo_decode and yolo_decode_at).
__attribute__((target("avx2,fma"))) inline void decode_anchor(const float* box, const float* cls, float ax, float ay,
                                                              float st, const float* wp, int64_t reg, int64_t nc,
                                                              float* e, float* probs, float* dst, int64_t stride) {
  float dist[4];
  for (int64_t side = 0; side < 4; ++side) dist[side] = bin_expectation(box + side * reg, wp, reg, e);
  const float x1 = ax - dist[0], y1 = ay - dist[1], x2 = ax + dist[2], y2 = ay + dist[3];
  dst[0] = (x1 + x2) / 2 * st;
  dst[stride] = (y1 + y2) / 2 * st;
  dst[2 * stride] = (x2 - x1) * st;
  dst[3 * stride] = (y2 - y1) * st;
  activate_row(5, cls, probs, nc, 0.f, 0.f, 0.f);  // sigmoid
  for (int64_t j = 0; j < nc; ++j) dst[(4 + j) * stride] = probs[j];
}

void check_decode_inputs(const torch::Tensor& anchors, const torch::Tensor& strides, const torch::Tensor& dfl,
                         int64_t a_count) {
  TORCH_CHECK(has_conv_rows(), "the YOLOv8 decode needs AVX2 and FMA");
  TORCH_CHECK(dfl.scalar_type() == torch::kFloat && dfl.is_contiguous() && dfl.dim() == 1, "dfl must be (reg,) float32");
  TORCH_CHECK(anchors.scalar_type() == torch::kFloat && anchors.is_contiguous() && anchors.numel() == 2 * a_count &&
                  strides.scalar_type() == torch::kFloat && strides.is_contiguous() && strides.numel() == a_count,
              "anchors must be (2, A) and strides (A,) contiguous float32");
}

}  // namespace

// feats[l]: (B, 4 * reg + nc, H_l, W_l) channels_last float32 head maps; anchors (2, A) cell centres in grid
// units, strides (A,), dfl (reg,) the bins' values; A = sum of H_l * W_l. Per anchor: each side's distance
// is the expectation of the softmax over its reg bins, the box (cx, cy, w, h) in input pixels, and the
// nc class probabilities (sigmoid; exp by exp8, a few ulp from ATen's). Returns (B, 4 + nc, A) float32.
torch::Tensor yolo_decode(std::vector<torch::Tensor> feats, torch::Tensor anchors, torch::Tensor strides,
                          torch::Tensor dfl, int64_t nc) {
  TORCH_CHECK(!feats.empty(), "yolo_decode needs head maps");
  const int64_t reg = dfl.size(0), no = 4 * reg + nc, b = feats[0].size(0), co = 4 + nc;
  std::vector<const float*> fp;
  std::vector<int64_t> first{0};
  for (const auto& f : feats) {
    TORCH_CHECK(f.dim() == 4 && f.size(0) == b && f.size(1) == no, "head maps must be (B, 4 * reg + nc, H, W)");
    fp.push_back(rows_ptr(f, b * f.size(2) * f.size(3), no, "head map"));
    first.push_back(first.back() + f.size(2) * f.size(3));
  }
  const int64_t a_count = first.back();
  check_decode_inputs(anchors, strides, dfl, a_count);
  const float* ap = anchors.data_ptr<float>();
  const float* sp = strides.data_ptr<float>();
  const float* wp = dfl.data_ptr<float>();
  auto out = torch::empty({b, co, a_count}, torch::kFloat);
  float* op = out.data_ptr<float>();
  // work items: blocks of up to 8 consecutive anchors of one level of one image
  std::vector<int64_t> item_b, item_a, item_l;
  for (int64_t bi = 0; bi < b; ++bi)
    for (size_t l = 0; l + 1 < first.size(); ++l)
      for (int64_t a = first[l]; a < first[l + 1]; a += DECODE_BLOCK) {
        item_b.push_back(bi);
        item_a.push_back(a);
        item_l.push_back(static_cast<int64_t>(l));
      }
  at::parallel_for(0, static_cast<int64_t>(item_a.size()), 32, [&](int64_t i0, int64_t i1) {
    std::vector<float> e(reg), tile(co * DECODE_BLOCK), cls(nc);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = item_b[i], a0 = item_a[i], l = item_l[i];
      const int64_t hw = first[l + 1] - first[l], count = std::min(DECODE_BLOCK, first[l + 1] - a0);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t a = a0 + r;
        const float* row = fp[l] + (bi * hw + (a - first[l])) * no;
        decode_anchor(row, row + 4 * reg, ap[a], ap[a_count + a], sp[a], wp, reg, nc, e.data(), cls.data(),
                      tile.data() + r, DECODE_BLOCK);
      }
      float* o = op + bi * co * a_count + a0;
      for (int64_t c = 0; c < co; ++c) std::memcpy(o + c * a_count, tile.data() + c * DECODE_BLOCK, sizeof(float) * count);
    }
  });
  return out;
}

// The decode of the anchors whose head maps changed, written into `out` (B, 4 + nc, A) float32 contiguous,
// a previous decode of the same maps elsewhere: afterwards out equals yolo_decode of the maps (the same
// per-anchor arithmetic, decode_anchor). Per level l: boxes[l] holds the box bins at channels [0, 4 * reg),
// classes[l] the class logits at [cls_offset, cls_offset + nc) (one map holding both: pass it twice with
// cls_offset 4 * reg), both (B, C, H_l, W_l) channels_last float32; masks[l] the (B, 1, H_l, W_l) bool masks
// whose union is the level's changed anchors. anchors, strides, dfl as yolo_decode. Returns the number of
// anchors decoded (over the batch).
int64_t yolo_decode_at(std::vector<torch::Tensor> boxes, std::vector<torch::Tensor> classes, int64_t cls_offset,
                       std::vector<std::vector<torch::Tensor>> masks, torch::Tensor anchors, torch::Tensor strides,
                       torch::Tensor dfl, int64_t nc, torch::Tensor out) {
  const size_t levels = boxes.size();
  TORCH_CHECK(levels > 0 && classes.size() == levels && masks.size() == levels, "one box map, class map and mask "
              "list per level");
  const int64_t reg = dfl.size(0), co = 4 + nc, b = boxes[0].size(0);
  TORCH_CHECK(cls_offset >= 0, "cls_offset must be >= 0");
  std::vector<const float*> bp(levels), cp(levels);
  std::vector<int64_t> bc(levels), cc(levels), first{0};
  std::vector<uint8_t> changed;  // per (image, anchor of the level) in level order: the union of the masks
  for (size_t l = 0; l < levels; ++l) {
    const auto& bx = boxes[l];
    const auto& cl = classes[l];
    TORCH_CHECK(bx.dim() == 4 && cl.dim() == 4 && bx.size(0) == b && cl.size(0) == b && cl.size(2) == bx.size(2) &&
                    cl.size(3) == bx.size(3) && bx.size(1) >= 4 * reg && cl.size(1) >= cls_offset + nc,
                "level ", l, ": box and class maps must be (B, C, H, W) of one size holding the bins and logits");
    const int64_t hw = bx.size(2) * bx.size(3);
    bc[l] = bx.size(1);
    cc[l] = cl.size(1);
    bp[l] = rows_ptr(bx, b * hw, bc[l], "box map");
    cp[l] = rows_ptr(cl, b * hw, cc[l], "class map");
    first.push_back(first.back() + hw);
  }
  const int64_t a_count = first.back();
  check_decode_inputs(anchors, strides, dfl, a_count);
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.dim() == 3 && out.size(0) == b &&
                  out.size(1) == co && out.size(2) == a_count, "out must be a contiguous (B, 4 + nc, A) float32 tensor");
  // the changed anchors, as (image * A + anchor) items
  std::vector<int64_t> items;
  for (size_t l = 0; l < levels; ++l) {
    const int64_t hw = first[l + 1] - first[l];
    changed.assign(b * hw, 0);
    for (const auto& m : masks[l]) {
      const uint8_t* mp = mask_ptr(m, b * hw, "mask");
      for (int64_t q = 0; q < b * hw; ++q) changed[q] |= mp[q];
    }
    for (int64_t q = 0; q < b * hw; ++q)
      if (changed[q]) items.push_back((q / hw) * a_count + first[l] + q % hw);
  }
  const float* ap = anchors.data_ptr<float>();
  const float* sp = strides.data_ptr<float>();
  const float* wp = dfl.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t count = static_cast<int64_t>(items.size());
  at::parallel_for(0, count, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> e(reg), cls(nc);
    size_t l = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = items[i] / a_count, a = items[i] % a_count;
      while (a >= first[l + 1]) ++l;  // items ascend within an image
      while (a < first[l]) --l;       // (the next image starts over at level 0)
      const int64_t q = bi * (first[l + 1] - first[l]) + (a - first[l]);
      decode_anchor(bp[l] + q * bc[l], cp[l] + q * cc[l] + cls_offset, ap[a], ap[a_count + a], sp[a], wp, reg, nc,
                    e.data(), cls.data(), op + bi * co * a_count + a, a_count);
    }
  });
  return count;
}

// state += rows at the pixels idx (both (N, C, H, W) float32 rows, see rows_ptr; idx flat pixel indices):
// a densified output's O += d, as the reference backend's index_add (one add per element: the same values).
void accumulate_at(torch::Tensor state, torch::Tensor src, torch::Tensor idx) {
  TORCH_CHECK(state.dim() == 4, "state must be (N, C, H, W)");
  const int64_t c = state.size(1), total = state.size(0) * state.size(2) * state.size(3);
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx must be contiguous int64");
  float* dp = rows_ptr(state, total, c, "state");
  const float* sp = rows_ptr(src, total, c, "src");
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), 256, [&](int64_t b0, int64_t b1) {
    for (int64_t p = b0; p < b1; ++p) {
      const int64_t r = ip[p];  // (a delta's own active pixels: in the map)
      float* d = dp + r * c;
      const float* s = sp + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) d[j] += s[j];
    }
  });
}

// ---- one delta conv in one call ----------------------------------------------------------------

// A delta conv's static arguments (its weights, geometry for one input size, activation), kept per layer by
// cpu_fused.FusedCpuBackend.conv_block, so that a delta frame's conv is one call from Python: candidates,
// the conv (implicit GEMM, groups 1; or depthwise) and its epilogue (the nonlinear update with truncation, or
// for a linear conv the residual add), into the output delta. Each Python -> C++ crossing costs ~5-10 us of
// pybind and Python a conv (argument conversion, a list of results, the Python around it), paid once here.
struct DeltaConvPlan {
  torch::Tensor weights;  // conv_rows' panels, or depthwise_rows' (taps, C)
  std::vector<int64_t> geo;
  int64_t cout, code;
  bool depthwise;
  double lo, hi, slope;
  bool reuse;  // keep the last output ext and write the next output into it when no one else holds it
  torch::Tensor kept;

  DeltaConvPlan(torch::Tensor weights_, std::vector<int64_t> geo_, int64_t cout_, bool depthwise_, int64_t code_,
                double lo_, double hi_, double slope_, bool reuse_)
      : weights(std::move(weights_)), geo(std::move(geo_)), cout(cout_), code(code_), depthwise(depthwise_),
        lo(lo_), hi(hi_), slope(slope_), reuse(reuse_) {
    geometry(geo);  // checks its size
    TORCH_CHECK(code >= 0 && code <= 5, "unknown activation code ", code);
  }

  // The conv of delta (ext, in_mask) at its candidates: `cand_idx` where the caller knows them (a 1x1 conv's
  // input pixels), else the window's dilation of in_mask OR res_mask. With acc/emitted the nonlinear update
  // (conv_act_rows / depthwise_rows), without it a linear conv (conv_rows_delta, plus the residual rows).
  // Returns ([idx, ext, values, mask] of the output delta, the candidate count); above `dense_above`
  // candidates (-1: never) the list is empty and nothing was computed (the caller runs the dense conv).
  std::tuple<std::vector<torch::Tensor>, int64_t> run(torch::Tensor ext, torch::Tensor in_mask,
                                                      c10::optional<torch::Tensor> cand_idx,
                                                      c10::optional<torch::Tensor> residual,
                                                      c10::optional<torch::Tensor> res_mask,
                                                      c10::optional<torch::Tensor> acc,
                                                      c10::optional<torch::Tensor> emitted, double tau, int64_t score,
                                                      int64_t dense_above) {
    torch::Tensor* kept_ext = reuse ? &kept : nullptr;
    TORCH_CHECK(acc.has_value() == emitted.has_value(), "acc and emitted come together");
    TORCH_CHECK(!depthwise || acc, "a depthwise conv here needs the update (acc, emitted)");
    torch::Tensor idx = cand_idx ? *cand_idx : candidates(in_mask, res_mask, geo)[0];
    const int64_t count = idx.numel();
    if (dense_above >= 0 && count > dense_above) return {std::vector<torch::Tensor>{}, count};
    if (count == 0) {
      const Geometry g = geometry(geo);
      auto d = output_delta(g.n, cout, g.ho, g.wo, kept_ext);
      return {std::vector<torch::Tensor>{idx, d[0], d[1], d[2]}, 0};
    }
    if (!acc) return {conv_rows_any(ext, in_mask, idx, weights, cout, geo, true, residual, res_mask, kept_ext), count};
    if (depthwise)
      return {depthwise_rows_into(ext, in_mask, idx, weights, geo, residual, res_mask, acc, emitted, code, lo, hi,
                                  slope, tau, score, kept_ext),
              count};
    return {conv_act_rows_into(ext, in_mask, idx, weights, geo, residual, res_mask, *acc, *emitted, code, lo, hi,
                               slope, tau, score, kept_ext),
            count};
  }

  // run for a 1x1 conv (stride 1, no padding, groups 1) with the update, whose input is a channel cat read in
  // place: `rows` and `masks` its parts' (in channel order), `in_mask` their union (the cat's mask, from which the
  // candidates come unless `cand_idx` gives them). The same sums in the same order as run on the cat's rows (a
  // part without an update at a pixel reads the zero row, as the cat's zeros there), without the cat's copies.
  std::tuple<std::vector<torch::Tensor>, int64_t> run_cat(std::vector<torch::Tensor> rows,
                                                          std::vector<torch::Tensor> masks, torch::Tensor in_mask,
                                                          c10::optional<torch::Tensor> cand_idx,
                                                          c10::optional<torch::Tensor> residual,
                                                          c10::optional<torch::Tensor> res_mask, torch::Tensor acc,
                                                          torch::Tensor emitted, double tau, int64_t score,
                                                          int64_t dense_above) {
    const Geometry g = geometry(geo);
    TORCH_CHECK(!depthwise && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 &&
                    g.h == g.ho && g.w == g.wo,
                "a cat read in place feeds a 1x1 conv of stride 1 without padding");
    const int64_t total = g.n * g.h * g.w;
    mask_ptr(in_mask, total, "in_mask");
    const CatTaps taps = cat_taps(rows, masks, total);
    TORCH_CHECK(static_cast<int64_t>(taps.base.size()) * taps.width == weights.size(1),
                "the parts' channels must add up to the conv's input channels");
    torch::Tensor* kept_ext = reuse ? &kept : nullptr;
    torch::Tensor idx = cand_idx ? *cand_idx : candidates(in_mask, res_mask, geo)[0];
    const int64_t count = idx.numel();
    if (dense_above >= 0 && count > dense_above) return {std::vector<torch::Tensor>{}, count};
    if (count == 0) {
      auto d = output_delta(g.n, cout, g.ho, g.wo, kept_ext);
      return {std::vector<torch::Tensor>{idx, d[0], d[1], d[2]}, 0};
    }
    return {conv_act_rows_gathered(taps, static_cast<int64_t>(taps.base.size()), taps.width, idx, weights, g,
                                   residual, res_mask, acc, emitted, code, lo, hi, slope, tau, score, kept_ext),
            count};
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("candidates", &candidates, "candidate output pixels of a sliding window");
  m.def("gather_taps", &gather_taps, "implicit-GEMM rows of the active taps");
  m.def("act_update", &act_update, "fused nonlinear update with truncation and scatter");
  m.def("sparsify", &sparsify, "input layer: send the pixels whose change passes the threshold", pybind11::arg("x"),
        pybind11::arg("ref"), pybind11::arg("tau"), pybind11::arg("score"), pybind11::arg("buffer") = nullptr);
  m.def("changed_fraction", &changed_fraction, "per image, the fraction of pixels whose change passes tau",
        pybind11::arg("x"), pybind11::arg("ref"), pybind11::arg("tau"), pybind11::arg("score"));
  m.def("sparsify_blobs", &sparsify_blobs, "input layer with the small-blob gate (min_blob)", pybind11::arg("x"),
        pybind11::arg("ref"), pybind11::arg("tau"), pybind11::arg("score"), pybind11::arg("k"), pybind11::arg("flush"),
        pybind11::arg("buffer") = nullptr);
  m.def("frame_range", &frame_range, "per-image min and max, NaN where an image holds NaN");
  m.def("maxpool_update", &maxpool_update, "max pooling on deltas with truncation");
  m.def("accumulate_rows", &accumulate_rows, "A += y at candidate pixels, returning the new A rows");
  m.def("emit_rows", &emit_rows, "o = f(A) - E with truncation and emit");
  m.def("union_masks", &union_masks, "the union of bool masks and its set pixels");
  m.def("merge_streams", &merge_streams, "add or concatenate streams at the union of their masks");
  m.def("has_conv_rows", &has_conv_rows, "whether this CPU runs conv_rows (AVX2 + FMA)");
  m.def("cpu_isa", &cpu_isa, "the vector ISA the micro-kernels run (avx512 or avx2)");
  m.def("set_cpu_isa", &set_cpu_isa, "switch the micro-kernels' ISA (avx2, avx512, auto); returns the previous");
  m.def("conv_rows", &conv_rows, "implicit-GEMM conv at output pixels, zero taps skipped");
  m.def("conv_rows_delta", &conv_rows_delta, "conv_rows written into a new delta's rows (plain convs)");
  m.def("conv_act_rows", &conv_act_rows, "implicit-GEMM conv with the nonlinear update in its epilogue");
  m.def("depthwise_rows", &depthwise_rows, "depthwise conv at output pixels, optionally with the update");
  m.def("conv_dense", &conv_dense, "dense conv with bias, residual, activation and the keyframe state writes",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("geo"),
        pybind11::arg("residual"), pybind11::arg("out"), pybind11::arg("acc"), pybind11::arg("emitted"),
        pybind11::arg("code"), pybind11::arg("lo"), pybind11::arg("hi"), pybind11::arg("slope"),
        pybind11::arg("parts") = std::vector<torch::Tensor>{});
  m.def("set_dw_fused_update", [](bool on) { return dw_fused_update_slot().exchange(on); },
        "depthwise_rows' update fused into its channel loop (true) or after it; returns the previous setting");
  m.def("sole_owner", &sole_owner, "whether nothing but its Python object holds a tensor's storage");
  m.def("depthwise_dense", &depthwise_dense, "dense depthwise conv with bias, residual, activation and the state writes");
  m.def("yolo_decode", &yolo_decode, "YOLOv8 box decode of channels_last head maps");
  m.def("yolo_decode_at", &yolo_decode_at, "YOLOv8 box decode of the anchors whose head maps changed, in place");
  m.def("accumulate_at", &accumulate_at, "state += rows at the given pixels (a densified output's O += d)");
  m.def("slice_rows", &slice_rows, "channel range of a delta at its updated pixels");
  m.def("upsample_nearest", &upsample_nearest, "nearest upsampling of a delta by integer factors");
  // module_local: another build of this file loaded beside it (benchmarks/cpu_profile.py --base-kernels) must not
  // make this module's import fail with "type DeltaConvPlan is already registered"
  pybind11::class_<OutputBuffer>(m, "OutputBuffer", pybind11::module_local(),
                                 "a layer's last output kept between frames (sparsify, sparsify_blobs)")
      .def(pybind11::init<>());
  pybind11::class_<DeltaConvPlan>(m, "DeltaConvPlan", pybind11::module_local(),
                                  "a delta conv's static arguments; run: the conv in one call")
      .def(pybind11::init<torch::Tensor, std::vector<int64_t>, int64_t, bool, int64_t, double, double, double, bool>())
      .def("run", &DeltaConvPlan::run, "candidates, conv and epilogue into the output delta")
      .def("run_cat", &DeltaConvPlan::run_cat, "run for a 1x1 conv whose input is a channel cat read in place");
}
