// Counter-based random numbers, the same functions as src/backend/rng.rs: every draw is a pure
// function of (key, index), so a GPU draws bit for bit what the CPU draws (dropout masks stay
// the same across backends, processes and resumptions).
#pragma once

typedef unsigned long long u64;

// SplitMix64's finaliser.
__device__ __forceinline__ u64 mix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in [0, 1) with 24 bits: the `index`-th draw of stream `key`.
__device__ __forceinline__ float uniform24(u64 key, u64 index) {
    return (float)(mix64(key ^ (index * 0xD1B54A32D192ED03ull)) >> 40) * (1.0f / 16777216.0f);
}
