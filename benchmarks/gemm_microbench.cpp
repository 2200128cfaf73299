// Micro-benchmark of GEMM micro-kernel variants for conv_dense (deltacnn/backends/cpu_kernels.cpp), on
// YOLOv8n's keyframe conv shapes at 768x576: 1 thread, process CPU clock, GMAC/s of the GEMM alone
// (operand pointers built per block as conv_dense builds them, the tile copied out; no epilogue).
// The variants are standalone copies (the library keeps only the winner): AVX2 6 x 16 (the shipped
// gemm_panel, one 16-channel panel a call) against AVX-512 MR x (16 * NZ) kernels over NZ adjacent
// panels of the unchanged packed layout (ceil(Cout / 16), taps * Cin, 16). Every variant's output is
// checked against the AVX2 one.
//
//   g++ -O3 -fopenmp -o /tmp/gemm_microbench benchmarks/gemm_microbench.cpp && /tmp/gemm_microbench [reps]
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int NR = 16;

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// the shipped kernel (cpu_kernels.cpp gemm_panel), verbatim but for names
__attribute__((target("avx2,fma"))) void gemm_panel_avx2(const float* const* src, const uint8_t* any, int64_t taps,
                                                         int64_t cin, const float* __restrict panel, float* out,
                                                         int64_t rows, int64_t ldo, int64_t ncols) {
  constexpr int MR = 6;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t t = 0; t < taps; ++t) {
    if (!any[t]) continue;
    const float* const* s = src + t * MR;
    const float *a0 = s[0], *a1 = s[1], *a2 = s[2], *a3 = s[3], *a4 = s[4], *a5 = s[5];
    const float* b = panel + t * cin * NR;
    for (int64_t k = 0; k < cin; ++k, b += NR) {
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
  alignas(32) float tile[MR][NR];
  _mm256_store_ps(tile[0], c00); _mm256_store_ps(tile[0] + 8, c01);
  _mm256_store_ps(tile[1], c10); _mm256_store_ps(tile[1] + 8, c11);
  _mm256_store_ps(tile[2], c20); _mm256_store_ps(tile[2] + 8, c21);
  _mm256_store_ps(tile[3], c30); _mm256_store_ps(tile[3] + 8, c31);
  _mm256_store_ps(tile[4], c40); _mm256_store_ps(tile[4] + 8, c41);
  _mm256_store_ps(tile[5], c50); _mm256_store_ps(tile[5] + 8, c51);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * ldo, tile[r], sizeof(float) * ncols);
}

void all_panels_avx2(const float* const* src, const uint8_t* any, int64_t taps, int64_t cin, const float* wp,
                     int64_t panels, float* y, int64_t rows, int64_t cout) {
  for (int64_t j = 0; j < panels; ++j)
    gemm_panel_avx2(src, any, taps, cin, wp + j * taps * cin * NR, y + j * NR, rows, cout,
                    std::min<int64_t>(NR, cout - j * NR));
}

// AVX-512: MR pixels x NZ adjacent panels (NZ zmm a pixel), MR * NZ accumulators; panel z of the group at
// panel + z * pstride. Stores straight into out (masked past ncols).
template <int MR, int NZ>
__attribute__((target("avx512f"))) void gemm_block512(const float* const* src, const uint8_t* any, int64_t taps,
                                                      int64_t cin, const float* __restrict panel, int64_t pstride,
                                                      float* out, int64_t rows, int64_t ldo, int64_t ncols) {
  __m512 c[MR][NZ];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) c[r][z] = _mm512_setzero_ps();
  for (int64_t t = 0; t < taps; ++t) {
    if (!any[t]) continue;
    const float* const* s = src + t * MR;
    const float* a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = s[r];
    const float* b = panel + t * cin * NR;
    for (int64_t k = 0; k < cin; ++k, b += NR) {
      __m512 bv[NZ];
#pragma GCC unroll 4
      for (int z = 0; z < NZ; ++z) bv[z] = _mm512_loadu_ps(b + z * pstride);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r][k]);
#pragma GCC unroll 4
        for (int z = 0; z < NZ; ++z) c[r][z] = _mm512_fmadd_ps(av, bv[z], c[r][z]);
      }
    }
  }
  const int64_t full = ncols / NR, rem = ncols % NR;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
    float* o = out + r * ldo;
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      if (z < full) _mm512_storeu_ps(o + z * NR, c[r][z]);
      else if (z == full && rem) _mm512_mask_storeu_ps(o + z * NR, tail, c[r][z]);
    }
  }
}

template <int MR, int NZ>
void all_panels512(const float* const* src, const uint8_t* any, int64_t taps, int64_t cin, const float* wp,
                   int64_t panels, float* y, int64_t rows, int64_t cout) {
  const int64_t ps = taps * cin * NR;
  int64_t j = 0;
  for (; j + NZ <= panels; j += NZ)
    gemm_block512<MR, NZ>(src, any, taps, cin, wp + j * ps, ps, y + j * NR, rows, cout,
                          std::min<int64_t>(NZ * NR, cout - j * NR));
  if (NZ >= 4)
    for (; j + 2 <= panels; j += 2)
      gemm_block512<MR, 2>(src, any, taps, cin, wp + j * ps, ps, y + j * NR, rows, cout,
                           std::min<int64_t>(2 * NR, cout - j * NR));
  for (; j < panels; ++j)
    gemm_block512<MR, 1>(src, any, taps, cin, wp + j * ps, ps, y + j * NR, rows, cout,
                         std::min<int64_t>(NR, cout - j * NR));
}

using Kernel = void (*)(const float* const*, const uint8_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                        int64_t);

struct Shape {
  int64_t cin, cout, k, s, h, w;  // input h, w (YOLOv8n at 576 x 768)
};

// The conv over every output pixel as conv_dense runs it (runs of kw * Cin values a window row; the input
// padded so that every window is inside: the border copies are not what is measured), blocks of MR pixels.
void conv(const Shape& sh, const std::vector<float>& xpad, const std::vector<float>& wp, std::vector<float>& out,
          int mr, Kernel kern) {
  const int64_t pad = sh.k / 2, hp = sh.h + 2 * pad, wpd = sh.w + 2 * pad;
  const int64_t ho = (sh.h + 2 * pad - sh.k) / sh.s + 1, wo = (sh.w + 2 * pad - sh.k) / sh.s + 1;
  const int64_t vt = sh.k, vk = sh.k * sh.cin, panels = (sh.cout + NR - 1) / NR;
  (void)hp;
  std::vector<const float*> src(vt * mr);
  std::vector<uint8_t> any(vt, 1);
  std::vector<float> y(mr * sh.cout);
  for (int64_t oy = 0; oy < ho; ++oy)
    for (int64_t ox0 = 0; ox0 < wo; ox0 += mr) {
      const int64_t rows = std::min<int64_t>(mr, wo - ox0);
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t ox = ox0 + std::min<int64_t>(r, rows - 1);
        for (int64_t ky = 0; ky < vt; ++ky)
          src[ky * mr + r] = xpad.data() + ((oy * sh.s + ky) * wpd + ox * sh.s) * sh.cin;
      }
      kern(src.data(), any.data(), vt, vk, wp.data(), panels, y.data(), rows, sh.cout);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(out.data() + (oy * wo + ox0 + r) * sh.cout, y.data() + r * sh.cout, sizeof(float) * sh.cout);
    }
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  const std::vector<Shape> shapes = {
      {3, 16, 3, 2, 576, 768},   {16, 32, 3, 2, 288, 384}, {32, 32, 1, 1, 144, 192}, {16, 16, 3, 1, 144, 192},
      {32, 64, 3, 2, 144, 192},  {64, 64, 1, 1, 72, 96},   {32, 32, 3, 1, 72, 96},   {128, 64, 1, 1, 72, 96},
      {64, 64, 3, 1, 36, 48},    {128, 128, 1, 1, 36, 48}, {128, 128, 3, 1, 18, 24}, {256, 256, 1, 1, 18, 24},
      {64, 80, 3, 1, 72, 96},    {64, 64, 3, 1, 72, 96}};
  struct Variant {
    const char* name;
    int mr;
    Kernel k;
  };
  const std::vector<Variant> variants = {
      {"avx2 6x16", 6, all_panels_avx2},        {"512 6x16", 6, all_panels512<6, 1>},
      {"512 6x32", 6, all_panels512<6, 2>},     {"512 6x64", 6, all_panels512<6, 4>},
      {"512 12x32", 12, all_panels512<12, 2>},  {"512 8x32", 8, all_panels512<8, 2>},
      {"512 12x16", 12, all_panels512<12, 1>},  {"512 4x64", 4, all_panels512<4, 4>}};
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  std::printf("%-26s", "shape (GMAC/s, 1 thread)");
  for (const auto& v : variants) std::printf(" %10s", v.name);
  std::printf("\n");
  std::vector<double> total_s(variants.size(), 0.0);
  double total_mac = 0;
  for (const auto& sh : shapes) {
    const int64_t pad = sh.k / 2;
    std::vector<float> xpad((sh.h + 2 * pad) * (sh.w + 2 * pad) * sh.cin);
    for (auto& v : xpad) v = nd(gen);
    const int64_t panels = (sh.cout + NR - 1) / NR;
    std::vector<float> wp(panels * sh.k * sh.k * sh.cin * NR);
    for (auto& v : wp) v = nd(gen) * 0.1f;
    const int64_t ho = (sh.h + 2 * pad - sh.k) / sh.s + 1, wo = (sh.w + 2 * pad - sh.k) / sh.s + 1;
    const double mac = double(ho) * wo * sh.k * sh.k * sh.cin * sh.cout;
    total_mac += mac;
    std::vector<float> ref(ho * wo * sh.cout), out(ho * wo * sh.cout);
    conv(sh, xpad, wp, ref, 6, all_panels_avx2);
    char label[64];
    std::snprintf(label, sizeof label, "%3ld->%3ld k%ld s%ld %ldx%ld", long(sh.cin), long(sh.cout), long(sh.k),
                  long(sh.s), long(ho), long(wo));
    std::printf("%-26s", label);
    std::vector<std::vector<double>> times(variants.size());
    for (int rep = 0; rep < reps; ++rep)  // variants interleaved, so that load drifts cancel
      for (size_t i = 0; i < variants.size(); ++i) {
        const double t0 = cpu_seconds();
        conv(sh, xpad, wp, out, variants[i].mr, variants[i].k);
        times[i].push_back(cpu_seconds() - t0);
        if (rep == 0) {
          double err = 0, mx = 0;
          for (size_t j = 0; j < out.size(); ++j) {
            err = std::max(err, double(std::fabs(out[j] - ref[j])));
            mx = std::max(mx, double(std::fabs(ref[j])));
          }
          if (err > 1e-4 * mx) std::printf("\n  %s differs: %.2e of %.2e\n", variants[i].name, err, mx);
        }
      }
    for (size_t i = 0; i < variants.size(); ++i) {
      std::sort(times[i].begin(), times[i].end());
      const double t = times[i][times[i].size() / 2];
      total_s[i] += t;
      std::printf(" %10.1f", mac / t / 1e9);
    }
    std::printf("   (%.1f MMAC, avx2 %.2f ms)\n", mac / 1e6, 1e3 * times[0][times[0].size() / 2]);
  }
  std::printf("%-26s", "all shapes (sum of medians)");
  for (size_t i = 0; i < variants.size(); ++i) std::printf(" %10.1f", total_mac / total_s[i] / 1e9);
  std::printf("\n%-26s", "  ms");
  for (size_t i = 0; i < variants.size(); ++i) std::printf(" %10.2f", 1e3 * total_s[i]);
  std::printf("\n");
  return 0;
}
