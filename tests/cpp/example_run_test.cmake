# ctest qatx_example_run: runs examples/cpp's qatx_run on the CNN exported by the Python tests
# and compares its output with the Python output (bit for bit: the same kernels run).
# Reported as skipped (SKIP_REGULAR_EXPRESSION "SKIP:") when the fixtures are absent.
set(model "${FIXTURES}/cnn_w8a8.pt")
if(NOT EXISTS "${model}")
  message("SKIP: ${model} is missing: run `pytest tests/python/test_export.py` first (make test does)")
  return()
endif()
execute_process(COMMAND "${EXE}" "${model}" --input "${FIXTURES}/cnn_w8a8_input.pt"
                        --expected "${FIXTURES}/cnn_w8a8_expected.pt" --atol 0 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "qatx_run failed (${rc})")
endif()
