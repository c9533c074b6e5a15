/* The portable (non-x86) path of parrot_kernels.c against a plain double-precision
 * reference, for CPUs the Python suite does not run on. Not part of pytest (CI has no cross
 * compiler); on x86 the same code is covered by tests/test_kernels.py. To check ARM:
 *
 *   aarch64-linux-gnu-gcc -O3 -std=gnu11 -fopenmp -I parrot_cli/kernels \
 *       tests/kernels_portable_check.c -o /tmp/pk-check -lm
 *   qemu-aarch64 -L /usr/aarch64-linux-gnu /tmp/pk-check
 */
#include <stdio.h>

#include "parrot_kernels.c"

static uint32_t state = 12345;
static float uniform(void) { /* [-1, 1) */
    state = state * 1664525u + 1013904223u;
    return (float)(state >> 8) / (float)(1 << 23) - 1.f;
}

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static int check(const char *what, const float *y, const double *ref, int n) {
    double worst = 0, scale = 0;
    for (int i = 0; i < n; i++) scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
    for (int i = 0; i < n; i++) worst = fabs(y[i] - ref[i]) > worst ? fabs(y[i] - ref[i]) : worst;
    int ok = worst <= 2e-4 * scale;
    printf("%-28s rel err %.2e %s\n", what, worst / scale, ok ? "ok" : "FAILED");
    return ok;
}

static int q4_case(int n, int k, int group, int integer_zeros) {
    int groups = k / group;
    uint8_t *w = malloc((size_t)n * k / 2);
    uint16_t *sc = malloc(sizeof(uint16_t) * n * groups), *zf = malloc(sizeof(uint16_t) * n * groups);
    uint8_t *zi = malloc((size_t)n * groups);
    float *x = malloc(sizeof(float) * k), *y = malloc(sizeof(float) * n);
    double *ref = malloc(sizeof(double) * n);
    for (int i = 0; i < n * k / 2; i++) w[i] = (uint8_t)(state = state * 1664525u + 1013904223u) ;
    for (int i = 0; i < n * groups; i++) {
        sc[i] = to_bf16(0.5f + 0.25f * uniform());
        zf[i] = to_bf16(uniform());
        zi[i] = (uint8_t)((state = state * 1664525u + 1013904223u) >> 28);
    }
    for (int i = 0; i < k; i++) x[i] = uniform();
    for (int r = 0; r < n; r++) {
        double s = 0;
        for (int i = 0; i < k; i++) {
            int q = (w[(size_t)r * k / 2 + i / 2] >> (4 * (i & 1))) & 15;
            double scale = bf16_to_f32(sc[r * groups + i / group]);
            double v = integer_zeros ? scale * (q - zi[r * groups + i / group])
                                     : (q - 8) * scale + bf16_to_f32(zf[r * groups + i / group]);
            s += v * x[i];
        }
        ref[r] = s;
    }
    pk_linear L = {PK_Q4, n, k, group, PK_DT_BF16, integer_zeros ? PK_DT_U8 : PK_DT_BF16,
                   w, sc, integer_zeros ? (const void *)zi : (const void *)zf, NULL, NULL};
    pk_linear_forward(&L, x, 1, y, 2);
    char what[64];
    snprintf(what, sizeof what, "int4 %dx%d g%d %s", n, k, group, integer_zeros ? "int-z" : "float-z");
    int ok = check(what, y, ref, n);
    free(w); free(sc); free(zf); free(zi); free(x); free(y); free(ref);
    return ok;
}

static int dense_case(int kind, int n, int k) {
    float *wf = malloc(sizeof(float) * n * k), *x = malloc(sizeof(float) * k), *y = malloc(sizeof(float) * n);
    uint16_t *wb = malloc(sizeof(uint16_t) * n * k);
    int8_t *w8 = malloc((size_t)n * k);
    uint16_t *s8 = malloc(sizeof(uint16_t) * n);
    double *ref = malloc(sizeof(double) * n);
    for (int i = 0; i < n * k; i++) {
        wf[i] = uniform();
        wb[i] = to_bf16(wf[i]);
        w8[i] = (int8_t)(127 * uniform());
    }
    for (int r = 0; r < n; r++) s8[r] = to_bf16(0.01f * (1.5f + uniform()));
    for (int i = 0; i < k; i++) x[i] = uniform();
    for (int r = 0; r < n; r++) {
        double s = 0;
        for (int i = 0; i < k; i++) {
            double v = kind == PK_F32 ? wf[r * k + i] : kind == PK_BF16 ? bf16_to_f32(wb[r * k + i])
                                                                        : w8[r * k + i] * (double)bf16_to_f32(s8[r]);
            s += v * x[i];
        }
        ref[r] = s;
    }
    const void *w = kind == PK_F32 ? (const void *)wf : kind == PK_BF16 ? (const void *)wb : (const void *)w8;
    pk_linear L = {kind, n, k, k, PK_DT_BF16, 0, w, s8, NULL, NULL, NULL};
    pk_linear_forward(&L, x, 1, y, 2);
    const char *names[] = {"fp32", "bf16", "int8"};
    char what[64];
    snprintf(what, sizeof what, "%s %dx%d", names[kind], n, k);
    int ok = check(what, y, ref, n);
    free(wf); free(x); free(y); free(wb); free(w8); free(s8); free(ref);
    return ok;
}

int main(void) {
    printf("isa %d (0 = portable C), openmp %d\n", pk_select_isa(-1), pk_openmp());
    int ok = 1;
    ok &= q4_case(37, 576, 32, 0);
    ok &= q4_case(16, 2048, 64, 1);
    ok &= q4_case(9, 1024, 128, 0);
    ok &= q4_case(8, 160, 160, 1);
    ok &= q4_case(12, 96, 32, 0);
    for (int kind = PK_F32; kind <= PK_Q8; kind++) ok &= dense_case(kind, 37, 200);
    printf(ok ? "all ok\n" : "SOME FAILED\n");
    return ok ? 0 : 1;
}
