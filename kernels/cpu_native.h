/* The kernels of kernels/cpu_native.c that other C files of the library compose. */
#ifndef MOE_SERVE_CPU_NATIVE_H
#define MOE_SERVE_CPU_NATIVE_H
#include <stdint.h>

void ms_linear(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
               int64_t m_rows, int64_t n, int64_t k, int threads);
void ms_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t m_rows,
                 int64_t d);
void ms_attend(const float *q, const float *k, const float *v, int64_t kv_row, int64_t keys, int64_t nh,
               int64_t nkv, int64_t d, float scale, float *out, float *scores, int threads);
void ms_rope(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t d, const float *cos,
             const float *sin_signed);

#endif
