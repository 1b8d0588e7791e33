# Writes OUT: the lines of HEADER, then `FERRYD --print-config FLAGS...`
# (run by cmake/packaging.cmake at build time).
execute_process(COMMAND ${FERRYD} --print-config ${FLAGS}
  OUTPUT_VARIABLE body ERROR_VARIABLE err RESULT_VARIABLE rc
)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${FERRYD} --print-config failed (${rc}): ${err}")
endif()
# Its first line names where the configuration came from ("embedded
# default"); the header says that instead.
string(REGEX REPLACE "^# ferryd configuration [^\n]*\n" "" body "${body}")
file(READ ${HEADER} head)
file(WRITE ${OUT}.tmp "${head}${body}")
file(RENAME ${OUT}.tmp ${OUT})
