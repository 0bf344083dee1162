# ctest qatx_find_package: proves that an installed qatx is usable with find_package(qatx).
#   1. cmake --install the qatx build into a scratch prefix
#   2. configure tests/cpp/consumer against that prefix (and the same libtorch), build it
#   3. run both consumer programs; each exits 0 only when the op's output is the expected one
# Run as: cmake -DSETTINGS=<file written by tests/cpp/CMakeLists.txt> -P find_package_test.cmake
cmake_minimum_required(VERSION 3.18)

if(NOT SETTINGS OR NOT EXISTS "${SETTINGS}")
  message(FATAL_ERROR "pass -DSETTINGS=<find_package_test_<config>.cmake from the build tree>")
endif()
include("${SETTINGS}")

set(prefix "${WORK_DIR}/install")
set(build "${WORK_DIR}/consumer-build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step what)
  message(STATUS "[qatx_find_package] ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[qatx_find_package] ${what} failed (${rc})")
  endif()
endfunction()

run_step("install qatx" "${CMAKE_COMMAND}" --install "${QATX_BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}")

# The consumer sees the scratch prefix first, then whatever the qatx build was given to find
# libtorch; Torch_DIR pins the very same libtorch even when it was found another way. The
# settings go through an initial-cache file (-C) so that lists keep their semicolons.
set(prefix_path "${prefix}")
if(USER_PREFIX_PATH)
  list(APPEND prefix_path ${USER_PREFIX_PATH})
endif()
set(init_cache "${WORK_DIR}/consumer-init.cmake")
file(WRITE "${init_cache}" "")
function(cache_entry name value)
  if(NOT value STREQUAL "")
    file(APPEND "${init_cache}" "set(${name} [==[${value}]==] CACHE STRING \"\")\n")
  endif()
endfunction()
cache_entry(CMAKE_PREFIX_PATH "${prefix_path}")
cache_entry(Torch_DIR "${TORCH_DIR}")
cache_entry(CMAKE_CXX_COMPILER "${CXX_COMPILER}")
cache_entry(CMAKE_BUILD_TYPE "${CONFIG}")
cache_entry(QATX_EXPECTED_VERSION "${EXPECTED_VERSION}")
cache_entry(QATX_EXPECTED_PREFIX "${prefix}")
set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${build}" -G "${GENERATOR}" -C "${init_cache}")
if(GENERATOR_PLATFORM)
  list(APPEND configure_args -A "${GENERATOR_PLATFORM}")
endif()
run_step("configure consumer" "${CMAKE_COMMAND}" ${configure_args})
run_step("build consumer" "${CMAKE_COMMAND}" --build "${build}" --config "${CONFIG}")

foreach(program qatx_consumer qatx_consumer_dispatcher_only)
  set(candidates "${build}/${program}" "${build}/${CONFIG}/${program}" "${build}/${program}.exe"
                 "${build}/${CONFIG}/${program}.exe")
  set(exe "")
  foreach(c IN LISTS candidates)
    if(EXISTS "${c}" AND NOT IS_DIRECTORY "${c}")
      set(exe "${c}")
      break()
    endif()
  endforeach()
  if(NOT exe)
    message(FATAL_ERROR "[qatx_find_package] ${program} was not built under ${build}")
  endif()
  run_step("run ${program}" "${exe}")
endforeach()

message(STATUS "[qatx_find_package] passed")
