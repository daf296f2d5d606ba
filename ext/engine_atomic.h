/* Small atomics for the engine (GCC/Clang builtins).
 *
 * A subscriber's rating step (allowance draw, balance check and decrement,
 * carry, counters) runs under a one-byte spinlock so that several nfqueue
 * threads never overspend together; the critical section is a few dozen
 * instructions, shorter than a futex round trip. */
#ifndef TOLLGATE_ENGINE_ATOMIC_H
#define TOLLGATE_ENGINE_ATOMIC_H
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define tg_cpu_relax() __builtin_ia32_pause()
#else
#define tg_cpu_relax() ((void)0)
#endif

static inline void tg_lock(uint8_t *l) {
    while (__atomic_test_and_set(l, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            tg_cpu_relax();
    }
}

static inline void tg_unlock(uint8_t *l) { __atomic_clear(l, __ATOMIC_RELEASE); }

static inline void tg_add_u64(uint64_t *p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

static inline uint32_t tg_fetch_add_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint8_t tg_load_u8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

#endif
