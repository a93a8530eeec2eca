// Crop-window JPEG decode + resize + flip for the ffcv pipeline, called from numba through ctypes
// (as FFCV calls its own libffcv), one image per call, on FFCV's worker threads.
//
// Why: a RandomResizedCrop keeps 20-100% of the image, yet a whole-image decode pays for every
// pixel. libjpeg-turbo can skip the rows above the window (jpeg_skip_scanlines: entropy decoding
// only, no IDCT, upsampling or colour conversion), decode only the iMCU columns that cover it
// (jpeg_crop_scanline) and stop after its last row (jpeg_abort_decompress), at a reduced DCT scale
// k/8 chosen by the caller. The decoded window is then resized with OpenCV (the library FFCV
// itself resizes with) and flipped in place.
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
#include <cstring>
#include <vector>

#include <jpeglib.h>

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

// Decode the window [top, top + height) x [left, left + width) (stored-image pixels) of the JPEG
// `jpeg` (`size` bytes, `image_h` x `image_w`) at DCT scale scale_num/8, resize it to `dst`
// (dst_h x dst_w x 3 RGB) and flip it when `flip`. At scale k/8 the window is rows
// [top*k/8, max(that + 1, (top + height)*k/8)) of the scaled image (floors, clamped to it) and
// likewise for columns: the same pixels as FFCV's whole-image decoder path cut from a full
// decode. `scratch` (scratch_size bytes) receives the decoded window rows. Returns 0 or an error
// code (negative): kErrCorrupt when libjpeg warned of corrupt data in what it decoded.
int supmae_crop_decode(const uint8_t* jpeg, uint64_t size, int64_t image_h, int64_t image_w, int64_t top, int64_t left,
                       int64_t height, int64_t width, int64_t scale_num, uint8_t* scratch, uint64_t scratch_size,
                       uint8_t* dst, int64_t dst_h, int64_t dst_w, int64_t interpolation, int64_t flip) {
    if (scale_num < 1 || scale_num > 8 || top < 0 || left < 0 || height < 1 || width < 1 || top + height > image_h ||
        left + width > image_w) {
        return kErrArgument;
    }
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
    const int64_t row0 = (top * scale_num) / 8;
    const int64_t col0 = (left * scale_num) / 8;
    int64_t row1 = ((top + height) * scale_num) / 8;
    int64_t col1 = ((left + width) * scale_num) / 8;
    row1 = row1 < row0 + 1 ? row0 + 1 : row1;
    col1 = col1 < col0 + 1 ? col0 + 1 : col1;
    row1 = row1 > sh ? sh : row1;
    col1 = col1 > sw ? sw : col1;
    if (row0 >= row1 || col0 >= col1) {
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

// Where this thread's next batch of decoded images goes (an address, 0 for none), set by the
// pipeline's Python stage in FFCV's epoch thread after each batch and read by the compiled decode
// at the start of the next one, in the same thread. Thread-local, so an epoch thread still
// finishing its batch after the consumer moved on to a new epoch (a new thread) never shares it.
namespace {
thread_local int64_t tls_batch_output = 0;
}  // namespace

void supmae_set_batch_output(int64_t address) { tls_batch_output = address; }

int64_t supmae_batch_output() { return tls_batch_output; }

}  // extern "C"
