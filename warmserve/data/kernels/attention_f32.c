/* Decode attention over a paged KV cache, fp32, reading each key and value in its block.
 *
 * One query token per sequence. A sequence's keys live in the blocks of its block table, in
 * order; position p is row p % bs of block table[p / bs]. Gathering every sequence's blocks
 * into one tensor per layer (what an attention library needs) copied the whole context once
 * a layer a step; here each key and value is read where it lies, once per KV head for all
 * the query heads sharing it (grouped-query attention). Keys below `lo` (a sliding window)
 * are skipped. Softmax is two-pass over a scratch row of scores.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

/* e^x for x <= 0 (scores less their maximum), 16 at a time: Cephes' expf (range reduction by
 * ln 2, a degree-6 polynomial, the exponent added in the bits), within 2 ulp of expf down to
 * -87; below that, where a weight vanishes beside the maximum's 1, the smallest normal float.
 * By hand rather than -ffast-math's vector library: a shared library built with -ffast-math
 * sets flush-to-zero for the whole process when it loads. */
static inline v16 exp16(v16 x)
{
    const v16 lo = (v16){0} - 87.3365447504f;
    vi16 small = x < lo;
    x = (v16)(((vi16)x & ~small) | ((vi16)lo & small));
    v16 fx = x * 1.44269504088896341f;
    vi16 n = __builtin_convertvector(fx, vi16); /* toward zero; fx <= 0, so round down: */
    v16 nf = __builtin_convertvector(n, v16);
    vi16 up = nf > fx;
    n += up; /* true is -1 */
    nf = __builtin_convertvector(n, v16);
    x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    v16 z = x * x;
    v16 y = (v16){0} + 1.9875691500E-4f;
    y = y * x + 1.3981999507E-3f;
    y = y * x + 8.3334519073E-3f;
    y = y * x + 4.1665795894E-2f;
    y = y * x + 1.6666665459E-1f;
    y = y * x + 5.0000001201E-1f;
    y = y * z + x + 1.0f;
    vi16 bits = (n + 127) << 23;
    return y * (v16)bits;
}

/* q: [B][H][D]; k, v: a layer's cache, block b's row r of KV head g at
 * (b * block_stride + r * KVH * D + g * D); tables: [B][width]; lens: keys per sequence
 * (the query's own included); lo: first visible key per sequence; scratch: >= max(lens)
 * floats per query head of a group (H / KVH rows); out: [B][H][D]. D % 16 == 0. */
void ws_paged_decode_attention_f32(
    const float *q, const float *k, const float *v, int64_t block_stride,
    const int64_t *tables, int64_t width, const int64_t *lens, const int64_t *lo,
    int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs, float scale,
    float *scratch, int64_t scratch_stride, float *out)
{
    const int64_t group = H / KVH, nv = D / 16;
    for (int64_t b = 0; b < B; b++) {
        const int64_t *table = tables + b * width;
        const int64_t n = lens[b], first = lo[b] > 0 ? lo[b] : 0;
        for (int64_t g = 0; g < KVH; g++) {
            /* scores[h][p] = scale * q_h . k_p */
            for (int64_t p = first; p < n; p++) {
                const float *kp = k + table[p / bs] * block_stride + (p % bs) * KVH * D + g * D;
                for (int64_t h = 0; h < group; h++) {
                    const float *qh = q + (b * H + g * group + h) * D;
                    v16 acc = (v16){0};
                    for (int64_t i = 0; i < nv; i++) {
                        v16 a, c;
                        memcpy(&a, qh + 16 * i, 64);
                        memcpy(&c, kp + 16 * i, 64);
                        acc += a * c;
                    }
                    float s = 0;
                    for (int j = 0; j < 16; j++) s += acc[j];
                    scratch[h * scratch_stride + p] = s * scale;
                }
            }
            for (int64_t h = 0; h < group; h++) {
                float *row = scratch + h * scratch_stride;
                float m = -INFINITY, sum = 0;
                for (int64_t p = first; p < n; p++) m = row[p] > m ? row[p] : m;
                int64_t p = first;
                v16 acc = (v16){0};
                for (; p + 16 <= n; p += 16) {
                    v16 e;
                    memcpy(&e, row + p, 64);
                    e = exp16(e - m);
                    memcpy(row + p, &e, 64);
                    acc += e;
                }
                for (int j = 0; j < 16; j++) sum += acc[j];
                for (; p < n; p++) {
                    row[p] = expf(row[p] - m);
                    sum += row[p];
                }
                float inv = n > first ? 1.0f / sum : 0.0f;
                for (int64_t p = first; p < n; p++) row[p] *= inv;
            }
            /* out_h = sum_p w[h][p] * v_p */
            for (int64_t h = 0; h < group; h++) {
                float *o = out + (b * H + g * group + h) * D;
                memset(o, 0, D * sizeof(float));
            }
            for (int64_t p = first; p < n; p++) {
                const float *vp = v + table[p / bs] * block_stride + (p % bs) * KVH * D + g * D;
                for (int64_t h = 0; h < group; h++) {
                    float w = scratch[h * scratch_stride + p];
                    float *o = out + (b * H + g * group + h) * D;
                    for (int64_t i = 0; i < nv; i++) {
                        v16 a, c;
                        memcpy(&a, o + 16 * i, 64);
                        memcpy(&c, vp + 16 * i, 64);
                        a += w * c;
                        memcpy(o + 16 * i, &a, 64);
                    }
                }
            }
        }
    }
}
