/* A list of kernel calls, run in one go: a captured decode step (model/decode_plan.py) replays every
 * layer's kernels with one call from Python instead of one Python call (and its argument checks) per
 * kernel, the way a CUDA graph replays a captured stream.
 *
 * Each call is a row of FIELDS int64 values: the kind, the kernel's address, then its arguments in
 * order (pointers and sizes as integers, a float as its bits in the low 32). The kernels are the
 * other files of this directory, loaded by Python; their addresses come from there.
 */

#include <stdint.h>
#include <string.h>

#define FIELDS 24

enum { ADD_RMS_NORM = 1, INT8_LINEAR = 2, GROUPED_LINEAR = 3, DECODE_ATTENTION = 4 };

typedef void (*add_rms_norm_fn)(const void *, const void *, void *, int64_t, int64_t, const void *, float, void *);
typedef int (*int8_linear_fn)(const void *, int64_t, int64_t, const void *, int64_t, const void *, const void *, int,
                              int, int, void *);
typedef int (*grouped_linear_fn)(const void *, int64_t, int64_t, const void *, int64_t, const void *, int, int, int,
                                 void *);
typedef int (*decode_attention_fn)(const void *, int64_t, int64_t, int64_t, int64_t, const void *, const void *,
                                   const void *, const void *, float, void *, void *, const void *, const void *,
                                   int64_t, const void *, int64_t, void *, void *, void *);

static float as_float(int64_t bits) {
    uint32_t low = (uint32_t)bits;
    float f;
    memcpy(&f, &low, sizeof f);
    return f;
}

#define P(i) ((void *)(intptr_t)a[i])

/* Run calls[0..count): 0 when every kernel succeeded, else 1 + the index of the first that failed
 * (the calls after it are not run). */
int64_t tunelab_run_calls(const int64_t *calls, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        const int64_t *call = calls + i * FIELDS, *a = call + 2;
        void *function = (void *)(intptr_t)call[1];
        int status = 0;
        switch (call[0]) {
        case ADD_RMS_NORM:
            ((add_rms_norm_fn)function)(P(0), P(1), P(2), a[3], a[4], P(5), as_float(a[6]), P(7));
            break;
        case INT8_LINEAR:
            status = ((int8_linear_fn)function)(P(0), a[1], a[2], P(3), a[4], P(5), P(6), (int)a[7], (int)a[8], (int)a[9],
                                                P(10));
            break;
        case GROUPED_LINEAR:
            status = ((grouped_linear_fn)function)(P(0), a[1], a[2], P(3), a[4], P(5), (int)a[6], (int)a[7], (int)a[8],
                                                   P(9));
            break;
        case DECODE_ATTENTION:
            status = ((decode_attention_fn)function)(P(0), a[1], a[2], a[3], a[4], P(5), P(6), P(7), P(8),
                                                     as_float(a[9]), P(10), P(11), P(12), P(13), a[14], P(15), a[16],
                                                     P(17), P(18), P(19));
            break;
        default:
            status = -1;
        }
        if (status != 0) return i + 1;
    }
    return 0;
}
