// 16-byte vector loads and stores: the element type's width decides how many elements travel.
#pragma once

#include <cstdint>

template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  T value[N];
};

template <typename T>
constexpr int kVectorWidth = 16 / sizeof(T);

template <typename T, int N>
__device__ __forceinline__ Vector<T, N> load_vector(const T* ptr) {
  return *reinterpret_cast<const Vector<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* ptr, const Vector<T, N>& vector) {
  *reinterpret_cast<Vector<T, N>*>(ptr) = vector;
}

// Whether every row of `row_elements` elements starting at `ptr` can be read in N-wide vectors.
template <typename T, int N>
inline bool vector_aligned(const void* ptr, int64_t row_elements) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * N) == 0 && row_elements % N == 0;
}
