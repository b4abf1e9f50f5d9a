# cmake/cuda.cmake - the CUDA transfer engine, its GPU test and benchmark.
# Included by CMakeLists.txt when KVSTASH_HAVE_CUDA (CUDA enabled, CUDAToolkit
# found, kvstash_core defined).

# The warning set of the top CMakeLists (add_compile_options) is gcc's: nvcc
# rejects -Wall/-Werror/-Wshadow as its own options. Restrict every
# directory-level option to C (and ASM) sources, for kvstash_core (already
# created) and for every target created after this point (tests/, bench),
# and give .cu files their own warning set through -Xcompiler.
get_directory_property(_ks_dir_opts COMPILE_OPTIONS)
set(_ks_c_opts "")
foreach(_o ${_ks_dir_opts})
  list(APPEND _ks_c_opts "$<$<COMPILE_LANGUAGE:C,ASM>:${_o}>")
endforeach()
set_directory_properties(PROPERTIES COMPILE_OPTIONS "${_ks_c_opts}")
set_target_properties(kvstash_core PROPERTIES COMPILE_OPTIONS "${_ks_c_opts}")
set(KVSTASH_CUDA_WARNINGS
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Wno-missing-field-initializers>)
if(KVSTASH_WERROR)
  list(APPEND KVSTASH_CUDA_WARNINGS $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Werror>
       $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings>)
endif()

# Hopper machine code plus PTX, which the driver JIT-compiles for newer GPUs.
if(NOT DEFINED KVSTASH_CUDA_ARCHITECTURES)
  set(KVSTASH_CUDA_ARCHITECTURES "90-real;90-virtual")
endif()

# The engine lives in kvstash_core; the stub is only for builds without CUDA.
set_source_files_properties(${CMAKE_SOURCE_DIR}/src/transfer_cuda_stub.c PROPERTIES HEADER_FILE_ONLY ON)
target_sources(kvstash_core PRIVATE ${CMAKE_SOURCE_DIR}/src/transfer_cuda.cu)
set_target_properties(kvstash_core PROPERTIES
  CUDA_ARCHITECTURES "${KVSTASH_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY Shared)
target_compile_options(kvstash_core PRIVATE ${KVSTASH_CUDA_WARNINGS}
  $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
target_compile_definitions(kvstash_core PUBLIC KVSTASH_HAVE_CUDA=1)
target_link_libraries(kvstash_core PUBLIC CUDA::cudart)

# bench/gpu_bench.cu -> build/bench/gpu_bench (not a test: run by hand on a GPU).
if(EXISTS ${CMAKE_SOURCE_DIR}/bench/gpu_bench.cu)
  add_executable(gpu_bench ${CMAKE_SOURCE_DIR}/bench/gpu_bench.cu)
  set_target_properties(gpu_bench PROPERTIES
    CUDA_ARCHITECTURES "${KVSTASH_CUDA_ARCHITECTURES}"
    CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Shared
    RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bench)
  target_compile_options(gpu_bench PRIVATE ${KVSTASH_CUDA_WARNINGS})
  target_link_libraries(gpu_bench PRIVATE kvstash_core Threads::Threads)
endif()

# tests/test_cuda_transfer.c is a plain C test picked up by tests/CMakeLists.txt
# (Labels: gpu, exit 77 without a device); it reaches the CUDA runtime API
# through kvstash_core's public CUDA::cudart.
