// Crop-window JPEG decode + resize + flip for the ffcv pipeline, called from numba through ctypes
// (as FFCV calls its own libffcv), one image per call, on FFCV's worker threads.
//
// Why: a RandomResizedCrop keeps 20-100% of the image, yet a whole-image decode pays for every
// pixel. libjpeg-turbo can skip the rows above the window (jpeg_skip_scanlines: entropy decoding
// only, no IDCT, upsampling or colour conversion), decode only the iMCU columns that cover it
// (jpeg_crop_scanline) and stop after its last row (jpeg_abort_decompress), at a reduced DCT scale
// k/8 chosen by the caller. When the JPEG has a restart marker after every MCU row (the
// converter's), the rows above the window are not even entropy-decoded: libjpeg is handed a JPEG
// cut at the window's MCU row (cut_rows). The decoded window is then resized and flipped in one
// pass by our bilinear resize (resize_linear: AVX2, the same bytes as its scalar path), or by
// OpenCV for "area" interpolation (FFCV's own resize) and flipped after.
//
// Pixels: libjpeg's own documentation says a cropped decode equals the full decode except, with
// "fancy" 4:2:0 / 4:2:2 chroma upsampling, in the region's first and last column (treated as the
// image's edge). We ask for one column more on each side than the window needs, so every pixel we
// hand to the resize equals the whole-image decode's (tests/test_ffcv_crop_decode.py checks it
// byte for byte). IDCT: JDCT_IFAST and fancy upsampling, what FFCV's imdecode (TurboJPEG with
// TJFLAG_FASTDCT) uses, so this path and the whole-image path decode the same pixels.
//
// This is a plain C ABI library built as a setuptools extension (setup.py); it is loaded with
// ctypes, never imported as a Python module.

#include <csetjmp>
#include <cstdint>
#include <cstdio>  // jpeglib.h needs FILE and size_t declared first
#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <vector>

#include <jpeglib.h>

// The resize's AVX2 path, chosen at run time (have_avx2), exists on x86 only; elsewhere (aarch64)
// the scalar path runs (the same bytes). -DSUPMAE_X86=0 builds the scalar-only library on x86.
#ifndef SUPMAE_X86
#if defined(__x86_64__) || defined(__i386__)
#define SUPMAE_X86 1
#else
#define SUPMAE_X86 0
#endif
#endif
#if SUPMAE_X86
#include <immintrin.h>
#endif

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

namespace {

// Error codes returned to the caller (negative; 0 is success).
constexpr int kErrJpeg = -1;       // libjpeg reported an error (corrupt or unsupported data)
constexpr int kErrScratch = -2;    // the scratch buffer is too small for the decoded window
constexpr int kErrArgument = -3;   // window or scale out of range
constexpr int kErrSize = -4;       // the JPEG header's size differs from the one the caller passed
constexpr int kErrResize = -5;     // OpenCV refused the resize (e.g. an unknown interpolation)
constexpr int kErrCorrupt = -6;    // libjpeg warned of corrupt data (it would have decoded grey or wrong pixels)

struct ErrorManager {
    jpeg_error_mgr pub;
    jmp_buf jump;
};

// libjpeg's default error_exit calls exit(): jump back to the call instead, which returns an error.
void on_error(j_common_ptr cinfo) {
    ErrorManager* err = reinterpret_cast<ErrorManager*>(cinfo->err);
    longjmp(err->jump, 1);
}

// Warnings are not printed (from every worker thread); libjpeg still counts them in num_warnings
// (its emit_message does), and a decode that met one returns kErrCorrupt: a truncated scan or a
// marker inside the entropy-coded data is a warning to libjpeg, which then fills the rest of the
// image with grey, and those pixels must never reach training as if they were the image.
void on_message(j_common_ptr) {}

// One decompressor per thread, created on first use and reused: jpeg_abort_decompress returns it
// to the idle state after every image, so no per-image allocation of libjpeg's memory pools.
struct ThreadDecoder {
    jpeg_decompress_struct cinfo;
    ErrorManager err;
    bool ready = false;

    ThreadDecoder() {
        cinfo.err = jpeg_std_error(&err.pub);
        err.pub.error_exit = on_error;
        err.pub.output_message = on_message;
        if (setjmp(err.jump) == 0) {
            jpeg_create_decompress(&cinfo);
            ready = true;
        }
    }
    ~ThreadDecoder() {
        if (ready) jpeg_destroy_decompress(&cinfo);
    }
};

thread_local ThreadDecoder tls_decoder;

// This thread's scratch for decoded window rows, grown to the largest window met and kept: a
// scratch per batch slot, allocated by FFCV for every epoch, page-faulted its (up to) whole-image
// rows in again at every epoch (measured: 31 fresh pages per image at 512 px storage, about a
// tenth of a worker's time in the kernel). Not initialised: the decode writes every byte it reads.
uint8_t* thread_scratch(uint64_t size) {
    thread_local std::unique_ptr<uint8_t[]> buffer;
    thread_local uint64_t capacity = 0;
    if (size > capacity) {
        buffer.reset(new (std::nothrow) uint8_t[size]);  // no C++ exception may cross into numba
        capacity = buffer ? size : 0;
    }
    return buffer.get();  // null when out of memory
}

// Mirror each row of an RGB image in place. A pixel is 3 bytes, so a byte-wise swap costs six
// loads and six stores per pixel pair (measured: 11% of a worker's time at 256 px storage, half
// the images flipped). Instead each row is copied to a small buffer and written back reversed one
// pixel per 4-byte load and store: each store's 4th byte lands on the next pixel, which the next
// store overwrites; the row's last pixel is copied byte-wise so nothing past the row is written.
// The buffer has one byte of padding, so the 4-byte load of its last pixel stays inside it.
void flip_rows(uint8_t* image, int64_t rows, int64_t cols) {
    if (cols < 2) return;
    thread_local std::vector<uint8_t> row_copy;
    const size_t row_bytes = static_cast<size_t>(cols) * 3;
    if (row_copy.size() < row_bytes + 1) row_copy.resize(row_bytes + 1);
    uint8_t* tmp = row_copy.data();
    for (int64_t y = 0; y < rows; ++y) {
        uint8_t* row = image + y * static_cast<int64_t>(row_bytes);
        std::memcpy(tmp, row, row_bytes);
        const uint8_t* src = tmp + row_bytes - 3;  // the row's last pixel
        uint8_t* dst = row;
        for (int64_t x = 0; x + 1 < cols; ++x, src -= 3, dst += 3) {
            uint32_t pixel;
            std::memcpy(&pixel, src, 4);
            std::memcpy(dst, &pixel, 4);
        }
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
    }
}


// ------------------------------------------------------------------------------------------------
// Bilinear resize of an RGB window with the horizontal flip folded in (the "linear" interpolation).
//
// Why not cv::resize: on the pipeline's images (a ~150 px window to 224 px) OpenCV's INTER_LINEAR
// took 78 us per image and the flip after it 13 us more, a third of a worker's time at 256 px
// storage; its horizontal pass is scalar for 3-channel images. This one runs the horizontal pass
// with AVX2 (one shuffle and one multiply-add per output pixel, the two neighbours being adjacent in
// memory) and writes a flipped image directly (output column x takes the weights of column
// W - 1 - x: the same pixels as flipping afterwards). The arithmetic is integer and the same in the
// AVX2 and the scalar path (used on CPUs without AVX2), so every machine produces the same bytes:
//   source position (d + 0.5) * src / dst - 0.5, clamped to the image as OpenCV clamps it;
//   weights w0 + w1 = 2048 (11 bits) per axis;
//   horizontal h = (s0 * w0 + s1 * w1 + 8) >> 4          (at most 32640: 15 bits)
//   vertical   v = ((h0 * 16 w0') >> 16) + ((h1 * 16 w1') >> 16)   (unsigned 16-bit high products)
//   out = (v + 32) >> 6                                   (at most 255)
// Same-size windows come out unchanged (the identity is exact), and it agrees with OpenCV's
// INTER_LINEAR to within one level (tests/test_ffcv_crop_decode.py).

constexpr int kWeightBits = 11;
constexpr int kWeightOne = 1 << kWeightBits;

// Per call: the source column pair and weights of every output column, and the source row pair and
// weights of every output row. Thread-local and reused, so no allocation per image once warm.
struct ResizePlan {
    std::vector<int32_t> x0;       // [dst_w] left source column of the pair
    std::vector<int16_t> xw;       // [dst_w * 8] {w0, w1, w0, w1, w0, w1, 0, 0}: one 128-bit lane a column
    std::vector<int32_t> y0;       // [dst_h] upper source row of the pair
    std::vector<uint16_t> yw;      // [dst_h * 2] {16 w0, 16 w1}
    std::vector<int16_t> rows[2];  // horizontally resized source rows, 4 int16 a pixel (+ padding)
    std::vector<int32_t> xs;       // [dst_w] x0 before mirroring
    std::vector<int16_t> wa, wb;   // [dst_w] the column weights before mirroring
    std::vector<uint8_t> last_row; // a padded copy of the source's last row (the 8-byte loads read past a pixel pair)
};

// Source coordinate pairs and 11-bit weights of all `dst` positions along one axis, OpenCV's mapping
// and clamping: position (2d + 1) src / (2 dst) - 1/2, stepped in integers (no division a column:
// a 64-bit division costs tens of cycles, and a plan has ~450 of them). `first[k]`, `w0[k]` and
// `w1[k]` are written `stride` elements apart.
template <typename W>
void axis_plan(int64_t src, int64_t dst, int32_t* first, W* w0, W* w1, int64_t stride, int shift) {
    const int64_t den = 2 * dst;
    const int64_t step = 2 * src;
    // d = 0: position (src - dst) / den, floored (negative for an upscale).
    int64_t num = src - dst;
    int64_t i = num >= 0 ? num / den : -((-num + den - 1) / den);
    int64_t rem = num - i * den;  // in [0, den)
    const double to_weight = static_cast<double>(kWeightOne) / static_cast<double>(den);
    for (int64_t d = 0; d < dst; ++d) {
        int64_t ci = i, crem = rem;
        if (ci < 0) {
            ci = 0;
            crem = 0;
        }
        int32_t b = static_cast<int32_t>(static_cast<double>(crem) * to_weight + 0.5);  // round(frac * 2048)
        if (ci >= src - 1) {  // the last column: all weight on it, as the pair (src - 2, src - 1) when there are two
            ci = src >= 2 ? src - 2 : 0;
            b = src >= 2 ? kWeightOne : 0;
        }
        first[d] = static_cast<int32_t>(ci);
        w0[d * stride] = static_cast<W>((kWeightOne - b) << shift);
        w1[d * stride] = static_cast<W>(b << shift);
        rem += step;
        while (rem >= den) {
            rem -= den;
            ++i;
        }
    }
}

bool have_avx2() {
#if SUPMAE_X86
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
#else
    return false;
#endif
}

thread_local int64_t tls_row_cuts = 0;  // windows decoded from a cut (supmae_row_cut_count)
int g_no_row_cut = 0;    // tests: always skip rows with libjpeg (supmae_crop_decode_no_row_cut)
int g_force_scalar = 0;  // tests: run the scalar path on an AVX2 machine (supmae_resize_force_scalar)

// One source row (`src` = its first window pixel) resized horizontally to `dst_w` pixels of 4 int16.
void hrow_scalar(const uint8_t* src, int64_t dst_w, const int32_t* x0, const int16_t* xw, int16_t* out) {
    for (int64_t x = 0; x < dst_w; ++x) {
        const uint8_t* p = src + 3 * static_cast<int64_t>(x0[x]);
        const int32_t a = xw[8 * x], b = xw[8 * x + 1];
        for (int c = 0; c < 3; ++c) out[4 * x + c] = static_cast<int16_t>((p[c] * a + p[3 + c] * b + 8) >> 4);
        out[4 * x + 3] = 0;
    }
}

// Two resized rows blended into one output row of `dst_w` RGB pixels.
void vrow_scalar(const int16_t* r0, const int16_t* r1, uint32_t b0, uint32_t b1, int64_t dst_w, uint8_t* out) {
    for (int64_t x = 0; x < dst_w; ++x) {
        for (int c = 0; c < 3; ++c) {
            const uint32_t v = ((static_cast<uint32_t>(static_cast<uint16_t>(r0[4 * x + c])) * b0) >> 16) +
                               ((static_cast<uint32_t>(static_cast<uint16_t>(r1[4 * x + c])) * b1) >> 16);
            out[3 * x + c] = static_cast<uint8_t>((v + 32) >> 6);
        }
    }
}

#if SUPMAE_X86
__attribute__((target("avx2"))) void hrow_avx2(const uint8_t* src, int64_t dst_w, const int32_t* x0,
                                               const int16_t* xw, int16_t* out) {
    // Bytes r0 g0 b0 r1 g1 b1 of a column pair -> 16-bit lanes r0 r1 g0 g1 b0 b1 0 0.
    const __m256i pairs = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                           0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
    const __m256i round = _mm256_set1_epi32(8);
    int64_t x = 0;
    for (; x + 4 <= dst_w; x += 4) {
        __m256i p01 = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 3 * int64_t{x0[x]}))),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 3 * int64_t{x0[x + 1]})), 1);
        __m256i p23 = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 3 * int64_t{x0[x + 2]}))),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 3 * int64_t{x0[x + 3]})), 1);
        __m256i m01 = _mm256_madd_epi16(_mm256_shuffle_epi8(p01, pairs),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + 8 * x)));
        __m256i m23 = _mm256_madd_epi16(_mm256_shuffle_epi8(p23, pairs),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + 8 * x + 16)));
        m01 = _mm256_srai_epi32(_mm256_add_epi32(m01, round), 4);
        m23 = _mm256_srai_epi32(_mm256_add_epi32(m23, round), 4);
        // packs interleaves the 128-bit lanes: columns 0 2 1 3 -> 0 1 2 3.
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(m01, m23), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * x), packed);
    }
    hrow_scalar(src, dst_w - x, x0 + x, xw + 8 * x, out + 4 * x);
}

__attribute__((target("avx2"))) void vrow_avx2(const int16_t* r0, const int16_t* r1, uint32_t b0, uint32_t b1,
                                               int64_t dst_w, uint8_t* out, bool last_row) {
    const __m256i w0 = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(b0)));
    const __m256i w1 = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(b1)));
    const __m256i round = _mm256_set1_epi16(32);
    // 4 pixels of 4 bytes -> 12 bytes (the 4th byte of each dropped), per 128-bit lane.
    const __m256i drop = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,  //
                                          0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    // Each step writes 28 bytes for 24: the 4 past them are rewritten by the next step or the next
    // row. On the image's last row the steps stop 2 pixels early so nothing past it is written.
    const int64_t limit = last_row ? dst_w - 2 : dst_w;
    int64_t x = 0;
    for (; x + 8 <= limit; x += 8) {
        __m256i a = _mm256_add_epi16(
            _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 4 * x)), w0),
            _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 4 * x)), w1));
        __m256i b = _mm256_add_epi16(
            _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 4 * x + 16)), w0),
            _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 4 * x + 16)), w1));
        a = _mm256_srli_epi16(_mm256_add_epi16(a, round), 6);
        b = _mm256_srli_epi16(_mm256_add_epi16(b, round), 6);
        // packus interleaves the lanes: pixels (0 1 4 5 | 2 3 6 7) -> (0 1 2 3 | 4 5 6 7).
        __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
        bytes = _mm256_shuffle_epi8(bytes, drop);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * x), _mm256_castsi256_si128(bytes));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * x + 12), _mm256_extracti128_si256(bytes, 1));
    }
    vrow_scalar(r0 + 4 * x, r1 + 4 * x, b0, b1, dst_w - x, out + 3 * x);
}

#endif  // SUPMAE_X86

// Resize rows [row0, row1) x columns [col0, col1) of `src` (RGB, rows `stride` bytes apart; the
// array has `rows` rows) to dst (dst_h x dst_w RGB, contiguous), mirrored when `flip`.
int resize_linear(const uint8_t* src, int64_t rows, int64_t stride, int64_t row0, int64_t row1, int64_t col0,
                  int64_t col1, uint8_t* dst, int64_t dst_h, int64_t dst_w, bool flip) {
    thread_local ResizePlan plan;
    const int64_t src_h = row1 - row0, src_w = col1 - col0;
    plan.x0.resize(static_cast<size_t>(dst_w));
    plan.xw.resize(static_cast<size_t>(dst_w) * 8 + 16);
    plan.y0.resize(static_cast<size_t>(dst_h));
    plan.yw.resize(static_cast<size_t>(dst_h) * 2);
    plan.wa.resize(static_cast<size_t>(dst_w));
    plan.wb.resize(static_cast<size_t>(dst_w));
    plan.xs.resize(static_cast<size_t>(dst_w));
    axis_plan<int16_t>(src_w, dst_w, plan.xs.data(), plan.wa.data(), plan.wb.data(), 1, 0);
    // Output column x takes column dst_w - 1 - x's pair and weights when flipping; the weights are
    // repeated for the 3 channels (one 128-bit lane a column, the 4th pair zero).
    for (int64_t x = 0; x < dst_w; ++x) {
        const int64_t from = flip ? dst_w - 1 - x : x;
        plan.x0[x] = plan.xs[from];
        int16_t* w = plan.xw.data() + 8 * x;
        w[0] = w[2] = w[4] = plan.wa[from];
        w[1] = w[3] = w[5] = plan.wb[from];
        w[6] = w[7] = 0;
    }
    axis_plan<uint16_t>(src_h, dst_h, plan.y0.data(), plan.yw.data(), plan.yw.data() + 1, 2, 4);  // 16 w
    const size_t row_len = static_cast<size_t>(dst_w) * 4 + 32;
    for (auto& r : plan.rows) {
        if (r.size() < row_len) r.resize(row_len);
    }
    const bool simd = have_avx2() && !g_force_scalar;
    (void)simd;  // unused where there is no AVX2 path
    int64_t cached[2] = {-1, -1};
    auto resized_row = [&](int64_t sy) -> const int16_t* {
        for (int k = 0; k < 2; ++k) {
            if (cached[k] == sy) return plan.rows[k].data();
        }
        // Replace the cached row that is not the other one needed now (rows only move down).
        const int k = (cached[0] < cached[1]) ? 0 : 1;
        cached[k] = sy;
        const int64_t r = row0 + sy;
        const uint8_t* p = src + r * stride + col0 * 3;
        if (r == rows - 1) {  // the 8-byte loads read up to 2 bytes past a pair: not past the source
            plan.last_row.resize(static_cast<size_t>(src_w) * 3 + 16);
            std::memcpy(plan.last_row.data(), p, static_cast<size_t>(src_w) * 3);
            p = plan.last_row.data();
        }
#if SUPMAE_X86
        if (simd) {
            hrow_avx2(p, dst_w, plan.x0.data(), plan.xw.data(), plan.rows[k].data());
            return plan.rows[k].data();
        }
#endif
        hrow_scalar(p, dst_w, plan.x0.data(), plan.xw.data(), plan.rows[k].data());
        return plan.rows[k].data();
    };
    for (int64_t y = 0; y < dst_h; ++y) {
        const int64_t s0 = plan.y0[y];
        const int64_t s1 = s0 + 1 < src_h ? s0 + 1 : s0;
        const int16_t* r0 = resized_row(s0);
        const int16_t* r1 = resized_row(s1);
        uint8_t* out = dst + y * dst_w * 3;
#if SUPMAE_X86
        if (simd) {
            vrow_avx2(r0, r1, plan.yw[2 * y], plan.yw[2 * y + 1], dst_w, out, y == dst_h - 1);
            continue;
        }
#endif
        vrow_scalar(r0, r1, plan.yw[2 * y], plan.yw[2 * y + 1], dst_w, out);
    }
    return 0;
}
}  // namespace

extern "C" {

// Resize rows [row0, row1) x columns [col0, col1) of the RGB image `src` (rows x cols x 3, rows
// `src_stride` bytes apart) to `dst` (dst_h x dst_w x 3, contiguous) with OpenCV interpolation
// `interpolation`, then mirror `dst` left-right when `flip`. OpenCV runs a resize this small
// (fewer than 2^16 output pixels per stripe) on the calling thread.
int supmae_resize_flip(const uint8_t* src, int64_t rows, int64_t cols, int64_t src_stride, int64_t row0, int64_t row1,
                       int64_t col0, int64_t col1, uint8_t* dst, int64_t dst_h, int64_t dst_w, int64_t interpolation,
                       int64_t flip) {
    if (row0 < 0 || col0 < 0 || row1 > rows || col1 > cols || row0 >= row1 || col0 >= col1 || dst_h < 1 || dst_w < 1) {
        return kErrArgument;
    }
    if (interpolation == 1) {  // INTER_LINEAR: ours (see resize_linear), the flip folded in
        try {
            return resize_linear(src, rows, src_stride, row0, row1, col0, col1, dst, dst_h, dst_w, flip != 0);
        } catch (const std::exception&) {  // its plan's buffers (bad_alloc): no exception may reach numba
            return kErrResize;
        }
    }
    try {
        const cv::Mat source(static_cast<int>(rows), static_cast<int>(cols), CV_8UC3, const_cast<uint8_t*>(src),
                         static_cast<size_t>(src_stride));
        cv::Mat dest(static_cast<int>(dst_h), static_cast<int>(dst_w), CV_8UC3, dst);
        cv::resize(source(cv::Range(static_cast<int>(row0), static_cast<int>(row1)),
                          cv::Range(static_cast<int>(col0), static_cast<int>(col1))),
                   dest, dest.size(), 0, 0, static_cast<int>(interpolation));
    } catch (const cv::Exception&) {  // no C++ exception may cross into the numba caller
        return kErrResize;
    }
    if (flip) flip_rows(dst, dst_h, dst_w);
    return 0;
}

}  // extern "C"

namespace {

// ------------------------------------------------------------------------------------------------
// Starting at the window's first row: restart markers.
//
// jpeg_skip_scanlines still entropy-decodes every row above the window (Huffman codes have no
// boundaries to jump to), and entropy decoding is ~3/4 of a decode. The converter writes a restart
// marker after every MCU row (tools/imageio.py): the entropy-coded data of each row then starts on
// a byte boundary with fresh DC predictions, so a decoder can begin at any row. libjpeg has no call
// for that, so we hand it a smaller JPEG: the same header with the height cut, the entropy-coded
// data of MCU rows r0..r_end, the markers in between renumbered from RST0 (libjpeg checks their
// sequence), and EOI. A JPEG without such markers (an older .beton) takes the skip path.
//
// Pixels stay those of the whole-image decode: fancy (triangle) chroma upsampling reads the
// chroma row above and below, which at the small JPEG's first and last rows is its own edge, so the
// window keeps one (scaled) row of margin from both: r0 is the MCU row of (first window row - 1)
// and r_end that of (last window row + 1).

struct RowLayout {
    uint64_t sof_height_at = 0;  // offset of the SOF segment's 2-byte image height
    uint64_t entropy_at = 0;     // first byte of the entropy-coded data
    int64_t height = 0, width = 0;
    int64_t mcu_h = 0;     // MCU height in pixels: 8 x the largest vertical sampling factor
    int64_t mcu_rows = 0;  // MCU rows in the image
};

// True when `d` is a baseline (or extended Huffman) single-scan 3-component JPEG whose restart
// interval is exactly one MCU row; fills `out`. Reads the header only.
bool parse_row_layout(const uint8_t* d, uint64_t n, RowLayout* out) {
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return false;
    uint64_t pos = 2;
    int64_t interval = 0, components = 0, hmax = 0, vmax = 0;
    bool sof = false;
    while (pos + 4 <= n) {
        if (d[pos] != 0xFF) return false;
        const uint8_t marker = d[pos + 1];
        if (marker == 0xFF) {  // fill byte
            ++pos;
            continue;
        }
        const uint64_t length = (static_cast<uint64_t>(d[pos + 2]) << 8) | d[pos + 3];
        const uint64_t seg = pos + 2;
        if (length < 2 || seg + length > n) return false;
        if (marker == 0xC0 || marker == 0xC1) {
            if (length < 8) return false;
            out->sof_height_at = seg + 3;
            out->height = (static_cast<int64_t>(d[seg + 3]) << 8) | d[seg + 4];
            out->width = (static_cast<int64_t>(d[seg + 5]) << 8) | d[seg + 6];
            components = d[seg + 7];
            if (components != 3 || length < 8 + 3 * static_cast<uint64_t>(components)) return false;
            for (int64_t c = 0; c < components; ++c) {
                const uint8_t factors = d[seg + 9 + 3 * c];
                hmax = std::max<int64_t>(hmax, factors >> 4);
                vmax = std::max<int64_t>(vmax, factors & 0x0F);
            }
            sof = true;
        } else if ((marker >= 0xC2 && marker <= 0xCF) && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
            return false;  // progressive, lossless or arithmetic-coded
        } else if (marker == 0xDD) {
            if (length < 4) return false;
            interval = (static_cast<int64_t>(d[seg + 2]) << 8) | d[seg + 3];
        } else if (marker == 0xDA) {
            if (!sof || length < 3 || d[seg + 2] != components) return false;  // one interleaved scan
            out->entropy_at = seg + length;
            break;
        }
        pos = seg + length;
    }
    if (!sof || out->entropy_at == 0 || hmax < 1 || vmax < 1 || out->height < 1 || out->width < 1) return false;
    const int64_t mcus_per_row = (out->width + 8 * hmax - 1) / (8 * hmax);
    if (interval != mcus_per_row) return false;
    out->mcu_h = 8 * vmax;
    out->mcu_rows = (out->height + out->mcu_h - 1) / out->mcu_h;
    return true;
}

// The offsets of the first `count` restart markers (marker k ends MCU row k), and the offset where
// the entropy-coded data ends (EOI or the end of the data) in `*end`. False when the data holds
// fewer markers, or one out of sequence.
bool find_restarts(const uint8_t* d, uint64_t n, uint64_t from, int64_t count, std::vector<uint64_t>& marks,
                   uint64_t* end) {
    marks.clear();
    uint64_t p = from;
    *end = n;
    while (p + 1 < n) {
        const void* hit = std::memchr(d + p, 0xFF, n - p - 1);
        if (hit == nullptr) break;
        const uint64_t i = static_cast<uint64_t>(static_cast<const uint8_t*>(hit) - d);
        const uint8_t b = d[i + 1];
        if (b == 0x00 || b == 0xFF) {  // a stuffed 0xFF data byte, or fill before a marker
            p = i + 1 + (b == 0x00);
            continue;
        }
        if (b >= 0xD0 && b <= 0xD7) {
            if (static_cast<int64_t>(b - 0xD0) != static_cast<int64_t>(marks.size() % 8)) return false;
            if (static_cast<int64_t>(marks.size()) == count) {
                *end = i;
                return true;
            }
            marks.push_back(i);
            p = i + 2;
            continue;
        }
        *end = i;  // EOI (or another marker): the scan's data ends here
        break;
    }
    return static_cast<int64_t>(marks.size()) >= count;
}

// The JPEG of MCU rows [r0, r_end] of `d` (see above) in a buffer of this thread's; its size in
// `*size`, its height in `*height`. Null when the markers are not where the header says.
const uint8_t* cut_rows(const uint8_t* d, uint64_t n, const RowLayout& lay, int64_t r0, int64_t r_end, uint64_t* size,
                        int64_t* height) {
    thread_local std::vector<uint64_t> marks;
    thread_local std::vector<uint8_t> buffer;
    uint64_t data_end = n;
    // Markers 0..r_end (r_end ends the cut) unless the cut runs to the last row.
    const int64_t needed = r_end < lay.mcu_rows - 1 ? r_end + 1 : lay.mcu_rows - 1;
    if (!find_restarts(d, n, lay.entropy_at, needed, marks, &data_end)) return nullptr;
    const uint64_t start = r0 == 0 ? lay.entropy_at : marks[static_cast<size_t>(r0 - 1)] + 2;
    const uint64_t stop = r_end < lay.mcu_rows - 1 ? marks[static_cast<size_t>(r_end)] : data_end;
    if (stop < start) return nullptr;
    const int64_t rows_end = std::min(lay.height, (r_end + 1) * lay.mcu_h);
    *height = rows_end - r0 * lay.mcu_h;
    buffer.resize(lay.entropy_at + (stop - start) + 2);
    uint8_t* b = buffer.data();
    std::memcpy(b, d, lay.entropy_at);
    b[lay.sof_height_at] = static_cast<uint8_t>(*height >> 8);
    b[lay.sof_height_at + 1] = static_cast<uint8_t>(*height & 0xFF);
    std::memcpy(b + lay.entropy_at, d + start, stop - start);
    for (int64_t k = r0; k < r_end && k < static_cast<int64_t>(marks.size()); ++k) {
        b[lay.entropy_at + (marks[static_cast<size_t>(k)] - start) + 1] = static_cast<uint8_t>(0xD0 + (k - r0) % 8);
    }
    b[buffer.size() - 2] = 0xFF;
    b[buffer.size() - 1] = 0xD9;
    *size = buffer.size();
    return b;
}

// Decode rows [row0, row1) x columns [col0, col1) (at scale scale_num/8) of the JPEG `jpeg`, which
// must be `image_h` x `image_w`, then resize and flip into `dst` (see supmae_crop_decode).
int decode_scaled_window(const uint8_t* jpeg, uint64_t size, int64_t image_h, int64_t image_w, int64_t row0,
                         int64_t row1, int64_t col0, int64_t col1, int64_t scale_num, uint8_t* scratch,
                         uint64_t scratch_size, uint8_t* dst, int64_t dst_h, int64_t dst_w, int64_t interpolation,
                         int64_t flip) {
    ThreadDecoder& dec = tls_decoder;
    if (!dec.ready) return kErrJpeg;
    j_decompress_ptr cinfo = &dec.cinfo;
    if (setjmp(dec.err.jump) != 0) {
        jpeg_abort_decompress(cinfo);
        return kErrJpeg;
    }
    dec.err.pub.num_warnings = 0;
    jpeg_mem_src(cinfo, jpeg, static_cast<unsigned long>(size));
    jpeg_read_header(cinfo, TRUE);
    if (static_cast<int64_t>(cinfo->image_height) != image_h || static_cast<int64_t>(cinfo->image_width) != image_w) {
        jpeg_abort_decompress(cinfo);
        return kErrSize;
    }
    cinfo->out_color_space = JCS_RGB;
    cinfo->scale_num = static_cast<unsigned int>(scale_num);
    cinfo->scale_denom = 8;
    cinfo->dct_method = JDCT_IFAST;
    cinfo->do_fancy_upsampling = TRUE;
    jpeg_start_decompress(cinfo);
    const int64_t sh = cinfo->output_height;
    const int64_t sw = cinfo->output_width;
    if (row1 > sh || col1 > sw) {
        jpeg_abort_decompress(cinfo);
        return kErrArgument;
    }
    // One column of margin on each side (see the top of the file); crop_scanline then moves the
    // start left to an iMCU boundary and widens the region to match.
    JDIMENSION xoff = static_cast<JDIMENSION>(col0 > 0 ? col0 - 1 : 0);
    const int64_t xend = col1 < sw ? col1 + 1 : sw;
    JDIMENSION xwidth = static_cast<JDIMENSION>(xend - xoff);
    if (xoff > 0 || static_cast<int64_t>(xwidth) < sw) jpeg_crop_scanline(cinfo, &xoff, &xwidth);
    const int64_t stride = static_cast<int64_t>(cinfo->output_width) * 3;
    const int64_t rows = row1 - row0;
    if (scratch == nullptr) {
        scratch = thread_scratch(static_cast<uint64_t>(rows * stride));
        scratch_size = scratch != nullptr ? static_cast<uint64_t>(rows * stride) : 0;
    }
    if (static_cast<uint64_t>(rows * stride) > scratch_size) {
        jpeg_abort_decompress(cinfo);
        return kErrScratch;
    }
    if (row0 > 0) jpeg_skip_scanlines(cinfo, static_cast<JDIMENSION>(row0));
    while (static_cast<int64_t>(cinfo->output_scanline) < row1) {
        JSAMPROW row = scratch + (static_cast<int64_t>(cinfo->output_scanline) - row0) * stride;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    const int64_t decoded_w = cinfo->output_width;
    // The rows below the window are never decoded (damage there is the caller's checksum's to see).
    jpeg_abort_decompress(cinfo);
    if (dec.err.pub.num_warnings > 0) return kErrCorrupt;
    return supmae_resize_flip(scratch, rows, decoded_w, stride, 0, rows, col0 - xoff, col1 - xoff, dst, dst_h, dst_w,
                              interpolation, flip);
}

}  // namespace

extern "C" {

// Decode the window [top, top + height) x [left, left + width) (stored-image pixels) of the JPEG
// `jpeg` (`size` bytes, `image_h` x `image_w`) at DCT scale scale_num/8, resize it to `dst`
// (dst_h x dst_w x 3 RGB) and flip it when `flip`. At scale k/8 the window is rows
// [top*k/8, max(that + 1, (top + height)*k/8)) of the scaled image (floors, clamped to it) and
// likewise for columns: the same pixels as FFCV's whole-image decoder path cut from a full
// decode. A JPEG with a restart marker after every MCU row is decoded from the window's MCU row
// on (cut_rows). `scratch` (scratch_size bytes) receives the decoded window rows, or when null a
// buffer of the calling thread's own (thread_scratch). Returns 0 or an error code (negative):
// kErrCorrupt when libjpeg warned of corrupt data in what it decoded.
int supmae_crop_decode(const uint8_t* jpeg, uint64_t size, int64_t image_h, int64_t image_w, int64_t top, int64_t left,
                       int64_t height, int64_t width, int64_t scale_num, uint8_t* scratch, uint64_t scratch_size,
                       uint8_t* dst, int64_t dst_h, int64_t dst_w, int64_t interpolation, int64_t flip) {
    if (scale_num < 1 || scale_num > 8 || top < 0 || left < 0 || height < 1 || width < 1 || top + height > image_h ||
        left + width > image_w) {
        return kErrArgument;
    }
    const int64_t sh = (image_h * scale_num + 7) / 8;  // libjpeg's scaled size (jdiv_round_up)
    const int64_t sw = (image_w * scale_num + 7) / 8;
    const int64_t row0 = (top * scale_num) / 8;
    const int64_t col0 = (left * scale_num) / 8;
    const int64_t row1 = std::min(sh, std::max(row0 + 1, ((top + height) * scale_num) / 8));
    const int64_t col1 = std::min(sw, std::max(col0 + 1, ((left + width) * scale_num) / 8));
    if (row0 >= row1 || col0 >= col1) return kErrArgument;
    RowLayout lay;
    if (!g_no_row_cut && parse_row_layout(jpeg, size, &lay) && lay.height == image_h && lay.width == image_w &&
        (lay.mcu_h * scale_num) % 8 == 0) {
        const int64_t mcu_rows_scaled = lay.mcu_h * scale_num / 8;  // an MCU row's height at this scale
        const int64_t r0 = (row0 > 0 ? row0 - 1 : 0) / mcu_rows_scaled;
        if (r0 > 0) {
            const int64_t r_end = std::min(lay.mcu_rows - 1, row1 / mcu_rows_scaled);
            uint64_t cut_size = 0;
            int64_t cut_height = 0;
            const uint8_t* cut = nullptr;
            try {
                cut = cut_rows(jpeg, size, lay, r0, r_end, &cut_size, &cut_height);
            } catch (const std::exception&) {  // its buffers (bad_alloc): take the skip path instead
                cut = nullptr;
            }
            if (cut != nullptr) {
                ++tls_row_cuts;
                const int64_t shift = r0 * mcu_rows_scaled;
                return decode_scaled_window(cut, cut_size, cut_height, image_w, row0 - shift, row1 - shift, col0, col1,
                                            scale_num, scratch, scratch_size, dst, dst_h, dst_w, interpolation, flip);
            }
        }
    }
    return decode_scaled_window(jpeg, size, image_h, image_w, row0, row1, col0, col1, scale_num, scratch, scratch_size,
                                dst, dst_h, dst_w, interpolation, flip);
}

// Tests: 1 decodes every window with jpeg_skip_scanlines even where restart markers allow a cut.
void supmae_crop_decode_no_row_cut(int64_t on) { g_no_row_cut = on != 0; }

// Tests: how many windows this thread has decoded from a cut at a restart marker (cut_rows).
int64_t supmae_row_cut_count() { return tls_row_cuts; }

// The two ceilings `supmae bench loaders` measures the pipelines against, on the stored files, one
// core, files already in memory, `n` JPEGs at `jpegs[i]` (`sizes[i]` bytes), in one call (no
// per-image call overhead in the figure):
//   mode 0, entropy decoding only: jpeg_read_coefficients (Huffman decoding into DCT coefficients;
//     no IDCT, no upsampling, no colour conversion): what any decoder of the whole files must do,
//     the floor of the storage format (a crop-window decode entropy-decodes only the rows from its
//     window's MCU row, with restart markers, down to the window's last: it can come near it);
//   mode 1, full decode to RGB at the pipeline's settings (JDCT_IFAST, fancy upsampling) into
//     `scratch` (scratch_size bytes; one image's rows), or when null a buffer of the thread's own:
//     what a decoder without windows pays.
// Returns the number of images that failed (libjpeg error or warning); 0 when all decoded.
int64_t supmae_decode_ceiling(const uint64_t* jpegs, const uint64_t* sizes, int64_t n, int64_t mode, uint8_t* scratch,
                              uint64_t scratch_size) {
    ThreadDecoder& dec = tls_decoder;
    if (!dec.ready || (mode != 0 && mode != 1)) return n;
    j_decompress_ptr cinfo = &dec.cinfo;
    int64_t failed = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (setjmp(dec.err.jump) != 0) {
            jpeg_abort_decompress(cinfo);
            ++failed;
            continue;
        }
        dec.err.pub.num_warnings = 0;
        jpeg_mem_src(cinfo, reinterpret_cast<const uint8_t*>(jpegs[i]), static_cast<unsigned long>(sizes[i]));
        jpeg_read_header(cinfo, TRUE);
        if (mode == 0) {
            jpeg_read_coefficients(cinfo);
        } else {
            cinfo->out_color_space = JCS_RGB;
            cinfo->dct_method = JDCT_IFAST;
            cinfo->do_fancy_upsampling = TRUE;
            jpeg_start_decompress(cinfo);
            const uint64_t stride = static_cast<uint64_t>(cinfo->output_width) * 3;
            uint8_t* rows = scratch;
            uint64_t rows_size = scratch_size;
            if (rows == nullptr) {  // the thread's own, grown as needed
                rows = thread_scratch(stride * cinfo->output_height);
                rows_size = rows != nullptr ? stride * cinfo->output_height : 0;
            }
            if (stride * cinfo->output_height > rows_size) {
                jpeg_abort_decompress(cinfo);
                ++failed;
                continue;
            }
            while (cinfo->output_scanline < cinfo->output_height) {
                JSAMPROW row = rows + cinfo->output_scanline * stride;
                jpeg_read_scanlines(cinfo, &row, 1);
            }
        }
        jpeg_abort_decompress(cinfo);
        if (dec.err.pub.num_warnings > 0) ++failed;
    }
    return failed;
}

// Where this thread's next batch of decoded images goes (an address, 0 for none), set by the
// pipeline's Python stage in FFCV's epoch thread after each batch and read by the compiled decode
// at the start of the next one, in the same thread. Thread-local, so an epoch thread still
// finishing its batch after the consumer moved on to a new epoch (a new thread) never shares it.
namespace {
thread_local int64_t tls_batch_output = 0;
}  // namespace

// Tests: 1 runs the resize's scalar path even where AVX2 is present (both must give the same bytes).
void supmae_resize_force_scalar(int64_t on) { g_force_scalar = on != 0; }

void supmae_set_batch_output(int64_t address) { tls_batch_output = address; }

int64_t supmae_batch_output() { return tls_batch_output; }

}  // extern "C"
