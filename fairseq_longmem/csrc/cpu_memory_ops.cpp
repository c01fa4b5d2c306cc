// CPU kernels of the memory layer's read (fairseq_longmem.modules.cpu_kernels builds
// this file with torch.utils.cpp_extension on first use; every function has a
// PyTorch twin that the tests compare it with).
//
//  topk_rows          exact top-k of each row of a score matrix, in two cheap passes
//                     instead of a partial sort of the whole row
//  search_topk        exact top-k chunks per query (GEMM blocks + topk_row); on
//                     CPUs with AVX-512 BF16, screened in bf16 and re-scored in
//                     fp32 where the screen's error bound cannot decide
//  memory_attention_forward / _backward
//                     attention of each query over the tokens of its retrieved
//                     chunks, read straight from the memory's ring buffers: no
//                     gathered (queries x k x head_dim) copy of keys or values
//
// fp32 tensors only (the Python side falls back to PyTorch for anything else).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using Cand = std::pair<float, int64_t>;

// (value desc, index asc); NaN above everything, as torch.topk orders it
inline bool cand_before(const Cand& a, const Cand& b) {
  const bool an = std::isnan(a.first), bn = std::isnan(b.first);
  if (an != bn) return an;
  if (!an && a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

// Insert (x, i) into the sorted (by cand_before) buffer bv/bi of c <= k entries,
// keeping at most k. Returns the new count.
inline int64_t buffer_insert(float x, int64_t i, float* bv, int64_t* bi, int64_t c, int64_t k) {
  const Cand me(x, i);
  if (c == k && !cand_before(me, Cand(bv[k - 1], bi[k - 1]))) return c;
  int64_t p = c < k ? c : k - 1;  // slot freed at the end
  while (p > 0 && cand_before(me, Cand(bv[p - 1], bi[p - 1]))) {
    bv[p] = bv[p - 1];
    bi[p] = bi[p - 1];
    --p;
  }
  bv[p] = x;
  bi[p] = i;
  return c < k ? c + 1 : c;
}

// Exact top-k (k <= n) of x[0..n), sorted by cand_before, into v[0..k), ix[0..k).
//
// Pass 1: the maxima of G strided groups (group j: the x[p] with p mod G == j);
// the k-th largest of them, L, is a lower bound of the row's k-th largest value
// (k distinct elements are >= L), so every element of the top-k is >= L.
// Pass 2 reads the row again and keeps the elements >= the threshold (NaN
// too: torch.topk ranks NaN first). With AVX2 and k <= 64: G is the smallest
// multiple of 8 >= k, pass 1 is eight independent vector maxima (no
// dependency chain), and pass 2 compares 8 elements at a time against a
// threshold that starts at L and rises to the k-th best kept so far, inserting
// the few that pass into a sorted buffer of k. Elsewhere G = k and the
// elements >= L are partially sorted.
void topk_row(const float* x, int64_t n, int64_t k, float* v, int64_t* ix,
              std::vector<float>& gmax, std::vector<Cand>& cand) {
  cand.clear();
  if (k <= 0) return;
  const float ninf = -std::numeric_limits<float>::infinity();
#if defined(__AVX2__)
  if (k <= 64 && n >= 64) {
    const int64_t G = ((k + 7) / 8) * 8;
    __m256 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_set1_ps(ninf);
    const int64_t full = (n / 64) * 64;
    for (int64_t p = 0; p < full; p += 64)
      for (int t = 0; t < 8; ++t)  // max(x, acc): a NaN in x leaves acc as it was
        acc[t] = _mm256_max_ps(_mm256_loadu_ps(x + p + 8 * t), acc[t]);
    const int V = static_cast<int>(G / 8);
    for (int t = V; t < 8; ++t) acc[t % V] = _mm256_max_ps(acc[t], acc[t % V]);
    float gm[64];
    for (int t = 0; t < V; ++t) _mm256_storeu_ps(gm + 8 * t, acc[t]);
    for (int64_t p = full; p < n; ++p)
      if (x[p] > gm[p % G]) gm[p % G] = x[p];
    float lo;
    if (G == k) {
      lo = gm[0];
      for (int64_t j = 1; j < G; ++j) lo = gm[j] < lo ? gm[j] : lo;
    } else {
      std::nth_element(gm, gm + (k - 1), gm + G, std::greater<float>());
      lo = gm[k - 1];
    }
    // Until the buffer holds k, keep every x >= lo. Once it is full, the scan
    // being in increasing index, an x equal to the k-th best would lose the tie:
    // only x > thr (or NaN) can enter, and thr is the k-th best.
    int64_t c = 0;
    int64_t i = 0;
    {
      const __m256 lov = _mm256_set1_ps(lo);
      for (; c < k && i + 8 <= n; i += 8) {
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), lov, _CMP_NLT_UQ));
        while (m) {
          const int b = __builtin_ctz(m);
          c = buffer_insert(x[i + b], i + b, v, ix, c, k);
          m &= m - 1;
        }
      }
    }
    if (c == k) {
      float thr = v[k - 1];
      __m256 thv = _mm256_set1_ps(thr);
      for (; i + 8 <= n; i += 8) {
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), thv, _CMP_NLE_UQ));
        if (!m) continue;
        while (m) {
          const int b = __builtin_ctz(m);
          buffer_insert(x[i + b], i + b, v, ix, k, k);
          m &= m - 1;
        }
        thr = v[k - 1];
        thv = _mm256_set1_ps(thr);
      }
    }
    for (; i < n; ++i)
      if (c < k ? !(x[i] < lo) : !(x[i] <= v[k - 1])) c = buffer_insert(x[i], i, v, ix, c, k);
    if (c == k) return;
    // fewer than k kept: impossible by the bound (k elements are >= L); kept as a guard
  }
#endif
  float lo;
  {
    const int64_t full = (n / k) * k;
    gmax.assign(x, x + k);
    float* gm = gmax.data();
    for (int64_t s = k; s < full; s += k) {
      const float* xs = x + s;
      for (int64_t j = 0; j < k; ++j) gm[j] = gm[j] < xs[j] ? xs[j] : gm[j];
    }
    lo = gm[0];
    for (int64_t j = 1; j < k; ++j) lo = gm[j] < lo ? gm[j] : lo;
    if (std::isnan(lo)) lo = ninf;
  }
  for (int64_t i = 0; i < n; ++i)
    if (!(x[i] < lo)) cand.emplace_back(x[i], i);
  if (static_cast<int64_t>(cand.size()) < k) {  // cannot happen; kept as a guard
    cand.clear();
    for (int64_t j = 0; j < n; ++j) cand.emplace_back(x[j], j);
  }
  if (static_cast<int64_t>(cand.size()) > k)
    std::nth_element(cand.begin(), cand.begin() + k, cand.end(), cand_before);
  std::sort(cand.begin(), cand.begin() + k, cand_before);
  for (int64_t j = 0; j < k; ++j) {
    v[j] = cand[j].first;
    ix[j] = cand[j].second;
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// Ask for every line of the kc chunks of one query (chunk_size * d floats each)
// before reading them: the chunks lie anywhere in the ring, so each read would
// otherwise wait for its own cache miss.
inline void prefetch_chunks(const float* base, const int64_t* ci, int64_t kc, int64_t chunk_size,
                            int64_t d, int64_t nch) {
  const int64_t bytes = chunk_size * d * static_cast<int64_t>(sizeof(float));
  for (int64_t c = 0; c < kc; ++c) {
    const int64_t slot = ci[c];
    if (slot < 0 || slot >= nch) continue;  // reported where it is read
    const char* p = reinterpret_cast<const char*>(base + slot * chunk_size * d);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
  }
}

inline void axpy(float alpha, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += alpha * x[i];
}


#if defined(__AVX2__)
// ---- AVX2 paths of the memory attention, head_dim D in {16, 32, 64, 128} ----

// exp of 8 floats (Cephes' expf: range reduction by ln 2 and a degree-5
// polynomial; relative error about 1e-7). Inputs below -87 give 0.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx),
                                                       _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

// a . b[0..4) (D floats each), four independent chains reduced together
template <int D>
inline void dot4(const float* a, const float* b0, const float* b1, const float* b2,
                 const float* b3, float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int i = 0; i < D; i += 8) {
    const __m256 av = _mm256_loadu_ps(a + i);
    s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + i), s0);
    s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + i), s1);
    s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + i), s2);
    s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + i), s3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// s[j] = a . rows[j] for j < K (K padded to a multiple of 4 by the caller)
template <int D>
inline void dots(const float* a, const float* const* rows, int64_t K, float* s) {
  for (int64_t j = 0; j < K; j += 4) dot4<D>(a, rows[j], rows[j + 1], rows[j + 2], rows[j + 3], s + j);
}

// out = sum_j w[j] rows[j] (w[j] == 0 skipped), out overwritten
template <int D>
inline void weighted_sum(const float* w, const float* const* rows, int64_t K, float* out) {
  __m256 acc[D / 8];
  for (int i = 0; i < D / 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < K; ++j) {
    if (w[j] == 0.f) continue;
    const __m256 wj = _mm256_set1_ps(w[j]);
    for (int i = 0; i < D / 8; ++i)
      acc[i] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(rows[j] + 8 * i), acc[i]);
  }
  for (int i = 0; i < D / 8; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

// softmax over s[0..K) where mask, written to p (0 where masked); false if none
inline bool masked_softmax(const float* s, const bool* mask, int64_t K, float* p) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  bool any = false;
  for (int64_t j = 0; j < K; ++j)
    if (mask[j]) {
      any = true;
      mx = s[j] > mx ? s[j] : mx;
    }
  if (!any) {
    for (int64_t j = 0; j < K; ++j) p[j] = 0.f;
    return false;
  }
  const __m256 mxv = _mm256_set1_ps(mx);
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) {
    const __m256 ev = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mxv));
    _mm256_storeu_ps(p + j, ev);
  }
  float sum = 0.f;
  for (; j < K; ++j) p[j] = std::exp(s[j] - mx);
  for (int64_t t = 0; t < K; ++t) {
    if (!mask[t]) p[t] = 0.f;
    sum += p[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < K; ++t) p[t] *= inv;
  return true;
}
#endif

void check_read_args(const at::Tensor& q, const at::Tensor& sk, const at::Tensor& sv,
                     const at::Tensor& cidx, int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 3 && sk.dim() == 3 && sv.dim() == 3 && cidx.dim() == 3,
              "memory kernels: q (R, T, d), stores (R, S, d), chunk_index (R, T, kc)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && sk.scalar_type() == at::kFloat &&
                  sv.scalar_type() == at::kFloat,
              "memory kernels: fp32 tensors only");
  TORCH_CHECK(cidx.scalar_type() == at::kLong, "memory kernels: int64 chunk_index");
  TORCH_CHECK(q.is_contiguous() && sk.is_contiguous() && sv.is_contiguous() &&
                  cidx.is_contiguous(),
              "memory kernels: contiguous tensors only");
  TORCH_CHECK(sk.sizes() == sv.sizes() && sk.size(0) == q.size(0) && sk.size(2) == q.size(2) &&
                  cidx.size(0) == q.size(0) && cidx.size(1) == q.size(1),
              "memory kernels: mismatched shapes");
  TORCH_CHECK(chunk_size > 0, "memory kernels: chunk_size must be positive");
}

}  // namespace

// scores (m, n) fp32 contiguous -> (values (m, k) fp32, index (m, k) int64), each
// row sorted by decreasing value (ties: lower index first). Exact.
std::vector<at::Tensor> topk_rows(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "topk_rows: a contiguous fp32 (rows, n) matrix");
  const int64_t m = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= n, "topk_rows: need 0 <= k <= n, got k=", k, ", n=", n);
  auto values = at::empty({m, k}, scores.options());
  auto index = at::empty({m, k}, scores.options().dtype(at::kLong));
  const float* x = scores.data_ptr<float>();
  float* v = values.data_ptr<float>();
  int64_t* ix = index.data_ptr<int64_t>();
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    std::vector<float> gmax;
    std::vector<Cand> cand;
    cand.reserve(static_cast<size_t>(std::min<int64_t>(n, 8 * k + 64)));
    for (int64_t r = b; r < e; ++r) topk_row(x + r * n, n, k, v + r * k, ix + r * k, gmax, cand);
  });
  return {values, index};
}

// ---- bf16-screened exact search (AVX-512 BF16; chosen at run time) ----------
//
// The scores of a row are first computed from bf16 copies of the queries and
// chunk keys (vdpbf16ps: twice the fp32 FMA rate), with a bound E_q on their
// error; only chunks whose screened score is within 2 E_q of the screened k-th
// best can be in the exact top-k, and those few (about 2 k) are scored again in
// fp32. So the result is the fp32 search's: screened s~ and fp32 s differ by at
// most E = eps |q| max_j |k_j| (bf16 rounding of both factors, 2^-8 each, plus
// the fp32 sums), the k-th best fp32 score is >= the k-th best screened score
// t~ minus E, and a chunk of the exact top-k has s~ >= s - E >= t~ - 2E.
// Queries the screen cannot vouch for (a non-finite screened score, fewer
// than k valid chunks, too many candidates) are scored whole in fp32.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                             (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define LONGMEM_SCREEN 1
#define SCREEN_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")))
#include <cpuid.h>
#else
#define LONGMEM_SCREEN 0
#endif

// AVX-512 F/DQ/BW/VL and BF16 in the CPU (cpuid) and their registers enabled by
// the OS (xgetbv: SSE, AVX, opmask and both halves of the zmm state)
static bool detect_screen_support() {
#if LONGMEM_SCREEN
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xE6u) != 0xE6u) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // F, DQ, BW, VL
  if ((b & need) != need) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a & (1u << 5)) != 0;  // AVX512_BF16
#else
  return false;
#endif
}

// asked once: under a hypervisor every cpuid is a VM exit, and search_topk asks per call
bool screen_supported() {
  static const bool supported = detect_screen_support();
  return supported;
}

#if LONGMEM_SCREEN
namespace {

constexpr int kLanes = 16;  // queries per tile: one fp32 zmm

// candidates kept per query before it falls back to the fp32 path: the G = 2k
// group bound leaves about 2k above it, plus the error band
inline int64_t max_candidates(int64_t k) { return std::max<int64_t>(256, 8 * k); }

struct ScreenScratch {
  std::vector<uint16_t> kb;   // (n, d) bf16 keys of the row
  std::vector<float> sc;      // (n, 16) screened scores, key-major
  std::vector<uint32_t> qp;   // (d/2, 16) bf16 pairs of the tile's queries
  std::vector<int32_t> cidx;  // (16, max_candidates(k))
  std::vector<float> tmp;     // n: a query's fp32 scores (the fallback)
  std::vector<float> gmax;
  std::vector<Cand> cand;
};

// fp32 (count) -> bf16, round to nearest even; returns max over keys of |k|^2
// when d % 16 == 0 (keys of d floats), and whether all were finite.
SCREEN_TARGET
bool convert_keys(const float* k, int64_t n, int64_t d, uint16_t* out, float* kmax2) {
  __mmask16 bad = 0;
  __m512 best = _mm512_setzero_ps();
  const int64_t per = d / 16;
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * d;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t t = 0; t < per; t += 2) {
      const __m512 a = _mm512_loadu_ps(kj + 16 * t);
      bad |= _mm512_fpclass_ps_mask(a, 0x99);  // NaN, +-inf
      ss = _mm512_fmadd_ps(a, a, ss);
      if (t + 1 < per) {
        const __m512 b = _mm512_loadu_ps(kj + 16 * t + 16);
        bad |= _mm512_fpclass_ps_mask(b, 0x99);
        ss = _mm512_fmadd_ps(b, b, ss);
        _mm512_storeu_si512(out + j * d + 16 * t, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * d + 16 * t),
                            (__m256i)_mm512_cvtneps_pbh(a));
      }
    }
    best = _mm512_max_ps(best, _mm512_set1_ps(_mm512_reduce_add_ps(ss)));
  }
  *kmax2 = _mm512_reduce_max_ps(best);
  return bad == 0;
}

// screened scores of the tile's 16 queries (packed in qp) against keys
// [j0, j0 + JB): sc[j * 16 + lane]. With gm (no invalid chunk), pass 1 is done
// here too: gm[(j mod G) * 16 + lane] = max(.., score), the caller keeping
// j0 mod G + JB <= G.
template <int JB>
SCREEN_TARGET inline void screen_block(const uint32_t* qp, const uint32_t* kb32, int64_t half,
                                       int64_t j0, float* sc, float* gm) {
  __m512 acc[JB];
  for (int u = 0; u < JB; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t p = 0; p < half; ++p) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + p * kLanes);
    for (int u = 0; u < JB; ++u)
      acc[u] = _mm512_dpbf16_ps(acc[u], qv,
                                (__m512bh)_mm512_set1_epi32(static_cast<int>(kb32[(j0 + u) * half + p])));
  }
  for (int u = 0; u < JB; ++u) _mm512_storeu_ps(sc + (j0 + u) * kLanes, acc[u]);
  if (gm)
    for (int u = 0; u < JB; ++u)
      _mm512_store_ps(gm + u * kLanes, _mm512_max_ps(_mm512_load_ps(gm + u * kLanes), acc[u]));
}

SCREEN_TARGET inline float dot16(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t o = 16; o < d; o += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + o), _mm512_loadu_ps(b + o), acc);
  return _mm512_reduce_add_ps(acc);
}

// exact fp32 top-k of one query over the whole row (the screen's fallback)
SCREEN_TARGET
void exact_query(const float* q, const float* K, const bool* inv, int64_t n, int64_t d,
                 int64_t k, float* v, int64_t* ix, ScreenScratch& s) {
  const float ninf = -std::numeric_limits<float>::infinity();
  s.tmp.resize(n);
  for (int64_t j = 0; j < n; ++j) s.tmp[j] = (inv && inv[j]) ? ninf : dot16(q, K + j * d, d);
  topk_row(s.tmp.data(), n, k, v, ix, s.gmax, s.cand);
}

// Groups of pass 1: G group maxima per query, the k-th largest of them a lower
// bound of the k-th best screened score. G = 2k (rounded up to 8) bounds it
// tighter than G = k (about 2k chunks above it instead of k ln k) for the
// price of a small max/min network per tile.
inline int64_t screen_groups(int64_t k) { return ((2 * k + 7) / 8) * 8; }

// one row: queries Q (T, d), keys K (n, d); d % 16 == 0, 16 <= d <= 512, 1 <= k <= min(n, 64)
SCREEN_TARGET
void screened_row(const float* Q, const float* K, const bool* inv, int64_t T, int64_t n,
                  int64_t d, int64_t k, float* vout, int64_t* iout, ScreenScratch& s) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t half = d / 2;
  s.kb.resize(n * d);
  s.sc.resize(n * kLanes);
  s.qp.resize(half * kLanes);
  const int64_t cap = max_candidates(k);
  s.cidx.resize(kLanes * cap);
  s.tmp.resize(std::max<int64_t>(n, cap));
  float kmax2 = 0.f;
  // a non-finite key, or keys so small that their norm underflows (the bound
  // below would vanish): the whole row in fp32
  if (!convert_keys(K, n, d, s.kb.data(), &kmax2) || !(kmax2 >= 0x1p-100f)) {
    for (int64_t t = 0; t < T; ++t) exact_query(Q + t * d, K, inv, n, d, k, vout + t * k, iout + t * k, s);
    return;
  }
  // |s~ - s| <= eps |q| |k|: bf16 rounding of each factor (2^-8, relative),
  // their product, fp32 sums of d terms (screened and exact), with margin; plus
  // denormals that vdpbf16ps flushes (2^-126 per term, absolute)
  const float eps = 0x1p-7f + 0x1p-15f + static_cast<float>(d) * 0x1p-22f;
  const float kmax = std::sqrt(kmax2) * 1.0001f;
  const float tiny = static_cast<float>(d) * 0x1p-120f;
  const uint32_t* kb32 = reinterpret_cast<const uint32_t*>(s.kb.data());
  const int64_t G = screen_groups(k);
  alignas(64) float gm[128 * kLanes];
  alignas(64) float err[kLanes];
  alignas(64) uint32_t qb[256];  // a query's bf16 pairs
  const __m512 ninfv = _mm512_set1_ps(ninf);
  for (int64_t t0 = 0; t0 < T; t0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, T - t0));
    __mmask16 fallback = 0;
    // pack the tile's queries: qp[p * 16 + lane] = bf16 pair (2p, 2p + 1)
    for (int l = 0; l < kLanes; ++l) {
      if (l >= lanes) {
        for (int64_t p = 0; p < half; ++p) s.qp[p * kLanes + l] = 0;
        err[l] = 0.f;
        continue;
      }
      const float* q = Q + (t0 + l) * d;
      __m512 ss = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int64_t o = 0; o < d; o += 16) {
        const __m512 a = _mm512_loadu_ps(q + o);
        bad |= _mm512_fpclass_ps_mask(a, 0x99);
        ss = _mm512_fmadd_ps(a, a, ss);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + o / 2), (__m256i)_mm512_cvtneps_pbh(a));
      }
      for (int64_t p = 0; p < half; ++p) s.qp[p * kLanes + l] = qb[p];
      const float q2 = _mm512_reduce_add_ps(ss);
      const float qk = std::sqrt(q2) * kmax;
      err[l] = eps * qk + tiny;
      // |q| max|k| < 1e38: no screened or exact score (nor partial sum) can
      // overflow; |q|^2 >= 2^-100: the norm did not underflow, and the inputs
      // bf16 flushes to zero are far inside the relative bound
      if (bad || !(qk < 1e38f) || !(q2 >= 0x1p-100f)) fallback |= static_cast<__mmask16>(1u << l);
    }
    // screened scores, key-major, and pass 1: per lane the maxima of G groups
    for (int64_t g = 0; g < G; ++g) _mm512_store_ps(gm + g * kLanes, ninfv);
    const bool fused = inv == nullptr;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      screen_block<8>(s.qp.data(), kb32, half, j, s.sc.data(), fused ? gm + (j % G) * kLanes : nullptr);
    for (; j < n; ++j)
      screen_block<1>(s.qp.data(), kb32, half, j, s.sc.data(), fused ? gm + (j % G) * kLanes : nullptr);
    if (inv) {  // groups over the valid chunks only (group g: every G-th valid chunk)
      for (int64_t c = 0, g = 0; c < n; ++c) {
        float* row = s.sc.data() + c * kLanes;
        if (inv[c]) {
          _mm512_storeu_ps(row, ninfv);
          continue;
        }
        const __m512 x = _mm512_loadu_ps(row);
        _mm512_store_ps(gm + g * kLanes, _mm512_max_ps(_mm512_load_ps(gm + g * kLanes), x));
        g = g + 1 == G ? 0 : g + 1;
      }
    }
    // lo: per lane the k-th largest of the G maxima (an insertion network into
    // a descending top[0..k): k max/min pairs per group maximum, once per tile)
    __m512 lov;
    {
      __m512 top[64];
      for (int64_t i = 0; i < k; ++i) top[i] = ninfv;
      for (int64_t g = 0; g < G; ++g) {
        __m512 x = _mm512_load_ps(gm + g * kLanes);
        for (int64_t i = 0; i < k; ++i) {
          const __m512 hi = _mm512_max_ps(top[i], x);
          x = _mm512_min_ps(top[i], x);
          top[i] = hi;
        }
      }
      lov = top[k - 1];
    }
    fallback |= _mm512_fpclass_ps_mask(lov, 0x99);  // fewer than k valid chunks
    const __m512 errv = _mm512_load_ps(err);
    const __m512 thr = _mm512_sub_ps(lov, _mm512_add_ps(errv, errv));
    // pass 2: every chunk whose screened score is >= lo - 2E
    int32_t cnt[kLanes] = {0};
    const __mmask16 live = static_cast<__mmask16>(((1u << lanes) - 1) & ~fallback);
    const float* sc = s.sc.data();
    auto collect = [&](int64_t c, __mmask16 m) {
      while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        const int32_t at = cnt[l]++;
        if (at < cap) s.cidx[l * cap + at] = static_cast<int32_t>(c);
      }
    };
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {  // most rows have no lane above: test four at once
      const __mmask16 m0 = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + c * kLanes), thr, _CMP_GE_OQ);
      const __mmask16 m1 = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + (c + 1) * kLanes), thr, _CMP_GE_OQ);
      const __mmask16 m2 = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + (c + 2) * kLanes), thr, _CMP_GE_OQ);
      const __mmask16 m3 = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + (c + 3) * kLanes), thr, _CMP_GE_OQ);
      if (!(m0 | m1 | m2 | m3)) continue;
      collect(c, m0);
      collect(c + 1, m1);
      collect(c + 2, m2);
      collect(c + 3, m3);
    }
    for (; c < n; ++c)
      collect(c, _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + c * kLanes), thr, _CMP_GE_OQ));
    // the candidates' exact scores, the k best of them
    for (int l = 0; l < lanes; ++l) {
      const int64_t t = t0 + l;
      const float* q = Q + t * d;
      float* v = vout + t * k;
      int64_t* ix = iout + t * k;
      if (((fallback >> l) & 1) || cnt[l] > cap || cnt[l] < k) {
        exact_query(q, K, inv, n, d, k, v, ix, s);
        continue;
      }
      // exact scores first (independent dot products), then the k best by
      // insertion: candidates come by increasing chunk and every score is
      // finite, so "before" is simply "greater" (an equal score has the
      // higher chunk, and goes after)
      const int32_t* ci = s.cidx.data() + l * cap;
      const int32_t m = cnt[l];
      float* ex = s.tmp.data();
      for (int32_t a = 0; a < m; ++a) ex[a] = dot16(q, K + static_cast<int64_t>(ci[a]) * d, d);
      int64_t have = 0;
      for (int32_t a = 0; a < m; ++a) {
        const float x = ex[a];
        if (have == k && !(x > v[k - 1])) continue;
        int64_t p = have < k ? have++ : k - 1;
        while (p > 0 && x > v[p - 1]) {
          v[p] = v[p - 1];
          ix[p] = ix[p - 1];
          --p;
        }
        v[p] = x;
        ix[p] = ci[a];
      }
    }
  }
}

}  // namespace
#endif

// Exact top-k chunks per query: queries (R, T, d), chunk_keys (R, n, d) fp32
// contiguous; invalid: (R, n) bool (True: the chunk may not be chosen) or an
// empty tensor. Returns (values (R, T, k), index (R, T, k)), each query's chunks
// by decreasing score (ties: lower index first), -inf where invalid. With
// screen and a CPU with AVX-512 BF16 (screen_supported), one task per row:
// screened_row. Otherwise one task per (row, block of q_block queries): a GEMM
// into a buffer that stays in cache, then topk_row over it. Either way the
// (R, T, n) score matrix never exists.
std::vector<at::Tensor> search_topk(const at::Tensor& queries, const at::Tensor& chunk_keys,
                                    const at::Tensor& invalid, int64_t k, int64_t q_block,
                                    bool screen) {
  TORCH_CHECK(queries.dim() == 3 && chunk_keys.dim() == 3 &&
                  queries.scalar_type() == at::kFloat && chunk_keys.scalar_type() == at::kFloat &&
                  queries.is_contiguous() && chunk_keys.is_contiguous(),
              "search_topk: contiguous fp32 queries (R, T, d) and chunk_keys (R, n, d)");
  const int64_t R = queries.size(0), T = queries.size(1), d = queries.size(2);
  const int64_t n = chunk_keys.size(1);
  TORCH_CHECK(chunk_keys.size(0) == R && chunk_keys.size(2) == d,
              "search_topk: queries and chunk_keys disagree on rows or head_dim");
  TORCH_CHECK(k >= 0 && k <= n, "search_topk: need 0 <= k <= n, got k=", k, ", n=", n);
  const bool masked = invalid.numel() > 0;
  if (masked)
    TORCH_CHECK(invalid.scalar_type() == at::kBool && invalid.is_contiguous() &&
                    invalid.dim() == 2 && invalid.size(0) == R && invalid.size(1) == n,
                "search_topk: invalid must be contiguous bool (R, n)");
  auto values = at::empty({R, T, k}, queries.options());
  auto index = at::empty({R, T, k}, queries.options().dtype(at::kLong));
  if (R == 0 || T == 0 || k == 0) return {values, index};
  const int64_t bq = std::max<int64_t>(1, std::min<int64_t>(q_block, T));
  const int64_t blocks = (T + bq - 1) / bq;
  float* vp = values.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  const bool* inv = masked ? invalid.data_ptr<bool>() : nullptr;
  const float ninf = -std::numeric_limits<float>::infinity();
#if LONGMEM_SCREEN
  if (screen && d >= 16 && d % 16 == 0 && d <= 512 && k <= 64 && screen_supported()) {
    const float* qp = queries.data_ptr<float>();
    const float* kp = chunk_keys.data_ptr<float>();
    // one task per row, or per part of a row when rows are fewer than twice
    // the threads (each part converts the row's keys again: parts of at
    // least 4 tiles)
    const int64_t tiles = (T + kLanes - 1) / kLanes;
    const int64_t want = (2 * static_cast<int64_t>(at::get_num_threads()) + R - 1) / R;
    const int64_t parts = std::max<int64_t>(1, std::min(want, tiles / 4));
    const int64_t per = ((tiles + parts - 1) / parts) * kLanes;  // queries per part
    at::parallel_for(0, R * parts, 1, [&](int64_t b, int64_t e) {
      ScreenScratch s;
      for (int64_t task = b; task < e; ++task) {
        const int64_t r = task / parts, t0 = (task % parts) * per;
        const int64_t m = std::min(per, T - t0);
        if (m <= 0) continue;
        const int64_t o = r * T + t0;
        screened_row(qp + o * d, kp + r * n * d, inv ? inv + r * n : nullptr, m, n, d, k,
                     vp + o * k, ip + o * k, s);
      }
    });
    return {values, index};
  }
#endif
  at::parallel_for(0, R * blocks, 1, [&](int64_t b, int64_t e) {
    auto buf = at::empty({bq, n}, queries.options());
    std::vector<float> gmax;
    std::vector<Cand> cand;
    std::vector<int64_t> bad;
    int64_t bad_row = -1;
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / blocks, t0 = (task % blocks) * bq;
      const int64_t m = std::min(bq, T - t0);
      auto out = buf.narrow(0, 0, m);
      at::mm_out(out, queries[r].narrow(0, t0, m), chunk_keys[r].t());
      float* sc = out.data_ptr<float>();
      if (masked) {
        if (bad_row != r) {
          bad.clear();
          for (int64_t c = 0; c < n; ++c)
            if (inv[r * n + c]) bad.push_back(c);
          bad_row = r;
        }
        for (int64_t t = 0; t < m; ++t)
          for (int64_t c : bad) sc[t * n + c] = ninf;
      }
      for (int64_t t = 0; t < m; ++t) {
        const int64_t o = (r * T + t0 + t) * k;
        topk_row(sc + t * n, n, k, vp + o, ip + o, gmax, cand);
      }
    }
  });
  return {values, index};
}

namespace {

// What the memory attention kernels read: pointers into contiguous fp32
// tensors of one call. q / grad_out (R, T, d); stores (R, S, d); chunk index
// (R, T, kc); mask (R, T, K); drop (R, T, K) or null; probs (R, T, K).
struct Read {
  const float* q;
  const float* sk;
  const float* sv;
  const int64_t* ci;
  const bool* mask;
  const float* drop;
  int64_t T, d, S, kc, cs, K, nch;
  float scale;
};

// The first token of every retrieved chunk's rows, checked against the ring.
inline void chunk_rows(const Read& a, int64_t rt, const float* base, const float** rows,
                       const char* who) {
  const int64_t r = rt / a.T;
  const int64_t* ci = a.ci + rt * a.kc;
  for (int64_t c = 0; c < a.kc; ++c) {
    const int64_t slot = ci[c];
    TORCH_CHECK(slot >= 0 && slot < a.nch, who, ": chunk slot ", slot, " outside the memory's ",
                a.nch, " chunks");
    const float* cb = base + (r * a.S + slot * a.cs) * a.d;
    for (int64_t u = 0; u < a.cs; ++u) rows[c * a.cs + u] = cb + u * a.d;
  }
}

#if defined(__AVX2__)
template <int D>
void forward_fast(const Read& a, int64_t b, int64_t e, float* out, float* probs, bool* has) {
  const int64_t K = a.K, K4 = (K + 3) / 4 * 4;
  std::vector<const float*> krow(K4), vrow(K4);
  std::vector<float> sc(K4), w(K);
  for (int64_t rt = b; rt < e; ++rt) {
    const int64_t r = rt / a.T;
    const int64_t* ci = a.ci + rt * a.kc;
    prefetch_chunks(a.sk + r * a.S * D, ci, a.kc, a.cs, D, a.nch);
    chunk_rows(a, rt, a.sk, krow.data(), "memory_attention_forward");
    for (int64_t j = K; j < K4; ++j) krow[j] = krow[0];
    dots<D>(a.q + rt * D, krow.data(), K4, sc.data());
    for (int64_t j = 0; j < K; ++j) sc[j] *= a.scale;
    float* p = probs + rt * K;
    if (!masked_softmax(sc.data(), a.mask + rt * K, K, p)) continue;
    has[rt] = true;
    prefetch_chunks(a.sv + r * a.S * D, ci, a.kc, a.cs, D, a.nch);
    chunk_rows(a, rt, a.sv, vrow.data(), "memory_attention_forward");
    const float* drow = a.drop ? a.drop + rt * K : nullptr;
    for (int64_t j = 0; j < K; ++j) w[j] = drow ? p[j] * drow[j] : p[j];
    weighted_sum<D>(w.data(), vrow.data(), K, out + rt * D);
  }
}

template <int D>
void backward_fast(const Read& a, const float* probs, int64_t b, int64_t e, float* grad_q) {
  const int64_t K = a.K, K4 = (K + 3) / 4 * 4;
  std::vector<const float*> krow(K4), vrow(K4);
  std::vector<float> dp(K4), coef(K);
  for (int64_t rt = b; rt < e; ++rt) {
    const int64_t r = rt / a.T;
    const int64_t* ci = a.ci + rt * a.kc;
    const float* p = probs + rt * K;
    bool any = false;
    for (int64_t j = 0; j < K; ++j) any |= p[j] != 0.f;
    if (!any) continue;
    prefetch_chunks(a.sv + r * a.S * D, ci, a.kc, a.cs, D, a.nch);
    chunk_rows(a, rt, a.sv, vrow.data(), "memory_attention_backward");
    for (int64_t j = K; j < K4; ++j) vrow[j] = vrow[0];
    dots<D>(a.q + rt * D, vrow.data(), K4, dp.data());  // a.q holds grad_out here
    const float* drow = a.drop ? a.drop + rt * K : nullptr;
    float total = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      float g = p[j] != 0.f ? dp[j] : 0.f;
      if (drow) g *= drow[j];
      dp[j] = g;
      total += g * p[j];
    }
    for (int64_t j = 0; j < K; ++j) coef[j] = a.scale * p[j] * (dp[j] - total);
    prefetch_chunks(a.sk + r * a.S * D, ci, a.kc, a.cs, D, a.nch);
    chunk_rows(a, rt, a.sk, krow.data(), "memory_attention_backward");
    weighted_sum<D>(coef.data(), krow.data(), K, grad_q + rt * D);
  }
}
#endif

void forward_generic(const Read& a, int64_t b, int64_t e, float* op, float* pp, bool* hp) {
  const int64_t d = a.d, K = a.K;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<const float*> krow(K), vrow(K);
  for (int64_t rt = b; rt < e; ++rt) {
    const int64_t r = rt / a.T;
    const float* qrow = a.q + rt * d;
    const bool* mrow = a.mask + rt * K;
    float* p = pp + rt * K;
    prefetch_chunks(a.sk + r * a.S * d, a.ci + rt * a.kc, a.kc, a.cs, d, a.nch);
    chunk_rows(a, rt, a.sk, krow.data(), "memory_attention_forward");
    float mx = ninf;
    bool any = false;
    for (int64_t j = 0; j < K; ++j) {
      if (!mrow[j]) {
        p[j] = ninf;
        continue;
      }
      any = true;
      p[j] = dot(qrow, krow[j], d) * a.scale;
      mx = p[j] > mx ? p[j] : mx;
    }
    if (!any) {
      for (int64_t j = 0; j < K; ++j) p[j] = 0.f;
      continue;
    }
    hp[rt] = true;
    float sum = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      p[j] = mrow[j] ? std::exp(p[j] - mx) : 0.f;
      sum += p[j];
    }
    const float inv = 1.f / sum;
    chunk_rows(a, rt, a.sv, vrow.data(), "memory_attention_forward");
    float* orow = op + rt * d;
    const float* drow = a.drop ? a.drop + rt * K : nullptr;
    for (int64_t j = 0; j < K; ++j) {
      p[j] *= inv;
      const float w = drow ? p[j] * drow[j] : p[j];
      if (w != 0.f) axpy(w, vrow[j], orow, d);
    }
  }
}

void backward_generic(const Read& a, const float* pp, int64_t b, int64_t e, float* gq) {
  const int64_t d = a.d, K = a.K;
  std::vector<const float*> krow(K), vrow(K);
  std::vector<float> ds(K);
  for (int64_t rt = b; rt < e; ++rt) {
    const float* g = a.q + rt * d;  // grad_out
    const float* p = pp + rt * K;
    chunk_rows(a, rt, a.sv, vrow.data(), "memory_attention_backward");
    chunk_rows(a, rt, a.sk, krow.data(), "memory_attention_backward");
    float total = 0.f;
    bool any = false;
    for (int64_t j = 0; j < K; ++j) {
      float gpj = 0.f;
      if (p[j] != 0.f) {
        gpj = dot(g, vrow[j], d);
        if (a.drop) gpj *= a.drop[rt * K + j];
        any = true;
      }
      ds[j] = gpj;
      total += gpj * p[j];
    }
    if (!any) continue;
    float* out = gq + rt * d;
    for (int64_t j = 0; j < K; ++j)
      if (p[j] != 0.f) axpy(a.scale * p[j] * (ds[j] - total), krow[j], out, d);
  }
}

Read make_read(const at::Tensor& q, const at::Tensor& sk, const at::Tensor& sv,
               const at::Tensor& cidx, const at::Tensor& drop, int64_t cs, double scale) {
  Read a;
  a.q = q.data_ptr<float>();
  a.sk = sk.data_ptr<float>();
  a.sv = sv.data_ptr<float>();
  a.ci = cidx.data_ptr<int64_t>();
  a.mask = nullptr;
  a.drop = drop.numel() > 0 ? drop.data_ptr<float>() : nullptr;
  a.T = q.size(1);
  a.d = q.size(2);
  a.S = sk.size(1);
  a.kc = cidx.size(2);
  a.cs = cs;
  a.K = a.kc * cs;
  a.nch = a.S / cs;
  a.scale = static_cast<float>(scale);
  return a;
}

}  // namespace

// Attention of each query over the tokens of its chunks.
// q (R, T, d); store_k, store_v (R, S, d) ring buffers (S >= chunks x chunk_size);
// chunk_index (R, T, kc) ring chunk slots; mask (R, T, kc*chunk_size) bool (False:
// no memory there); drop: (R, T, kc*chunk_size) dropout multipliers or an empty
// tensor. Returns out (R, T, d), probs (R, T, kc*chunk_size) (before dropout; 0
// where masked and for queries without memory), has_memory (R, T) bool.
std::vector<at::Tensor> memory_attention_forward(const at::Tensor& q, const at::Tensor& store_k,
                                                 const at::Tensor& store_v,
                                                 const at::Tensor& chunk_index,
                                                 const at::Tensor& mask, const at::Tensor& drop,
                                                 int64_t chunk_size, double scale) {
  check_read_args(q, store_k, store_v, chunk_index, chunk_size);
  const int64_t R = q.size(0), T = q.size(1), d = q.size(2);
  const int64_t K = chunk_index.size(2) * chunk_size;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 3 &&
                  mask.size(0) == R && mask.size(1) == T && mask.size(2) == K,
              "memory_attention_forward: mask must be contiguous bool (R, T, kc*chunk_size)");
  if (drop.numel() > 0)
    TORCH_CHECK(drop.scalar_type() == at::kFloat && drop.is_contiguous() &&
                    drop.sizes() == mask.sizes(),
                "memory_attention_forward: drop must be contiguous fp32 like mask");
  auto out = at::zeros({R, T, d}, q.options());
  auto probs = at::zeros({R, T, K}, q.options());
  auto has = at::zeros({R, T}, q.options().dtype(at::kBool));
  Read a = make_read(q, store_k, store_v, chunk_index, drop, chunk_size, scale);
  a.mask = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  bool* hp = has.data_ptr<bool>();
  at::parallel_for(0, R * T, 32, [&](int64_t b, int64_t e) {
#if defined(__AVX2__)
    switch (d) {
      case 16: return forward_fast<16>(a, b, e, op, pp, hp);
      case 32: return forward_fast<32>(a, b, e, op, pp, hp);
      case 64: return forward_fast<64>(a, b, e, op, pp, hp);
      case 128: return forward_fast<128>(a, b, e, op, pp, hp);
      default: break;
    }
#endif
    forward_generic(a, b, e, op, pp, hp);
  });
  return {out, probs, has};
}

// Gradient of memory_attention_forward's out with respect to q (the memory's keys
// and values take none): dP = grad_out . v (x drop), dS = P (dP - sum(P dP)),
// dq = scale * sum_j dS_j k_j.
at::Tensor memory_attention_backward(const at::Tensor& grad_out, const at::Tensor& probs,
                                     const at::Tensor& drop, const at::Tensor& store_k,
                                     const at::Tensor& store_v, const at::Tensor& chunk_index,
                                     int64_t chunk_size, double scale) {
  check_read_args(grad_out, store_k, store_v, chunk_index, chunk_size);
  const int64_t R = grad_out.size(0), T = grad_out.size(1), d = grad_out.size(2);
  const int64_t K = chunk_index.size(2) * chunk_size;
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() &&
                  probs.size(0) == R && probs.size(1) == T && probs.size(2) == K,
              "memory_attention_backward: probs must be contiguous fp32 (R, T, kc*chunk_size)");
  if (drop.numel() > 0)
    TORCH_CHECK(drop.scalar_type() == at::kFloat && drop.is_contiguous() &&
                    drop.sizes() == probs.sizes(),
                "memory_attention_backward: drop must be contiguous fp32 like probs");
  auto grad_q = at::zeros({R, T, d}, grad_out.options());
  const Read a = make_read(grad_out, store_k, store_v, chunk_index, drop, chunk_size, scale);
  const float* pp = probs.data_ptr<float>();
  float* gq = grad_q.data_ptr<float>();
  at::parallel_for(0, R * T, 32, [&](int64_t b, int64_t e) {
#if defined(__AVX2__)
    switch (d) {
      case 16: return backward_fast<16>(a, pp, b, e, gq);
      case 32: return backward_fast<32>(a, pp, b, e, gq);
      case 64: return backward_fast<64>(a, pp, b, e, gq);
      case 128: return backward_fast<128>(a, pp, b, e, gq);
      default: break;
    }
#endif
    backward_generic(a, pp, b, e, gq);
  });
  return grad_q;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_rows", &topk_rows, "exact top-k of each row (rows, n) fp32");
  m.def("search_topk", &search_topk, "exact top-k chunks per query, scores never stored whole");
  m.def("screen_supported", &screen_supported,
        "whether this CPU runs the bf16-screened search (AVX-512 BF16)");
  m.def("memory_attention_forward", &memory_attention_forward,
        "attention over retrieved chunks read from the ring buffers");
  m.def("memory_attention_backward", &memory_attention_backward,
        "gradient of memory_attention_forward with respect to the queries");
}
