# gendocs.cmake - build step: the default config file and the man pages,
# written by the programs themselves from their option tables (kvstashd
# --print-config / --print-man, kvstash --print-man), so that they list
# exactly the options --help lists. Man pages are gzipped -9n (reproducible)
# as Debian ships them.
# Usage: cmake -DKVSTASHD=... -DKVSTASH=... -DOUT=dir -P gendocs.cmake
foreach(_job "${KVSTASHD};--print-config;kvstashd.conf" "${KVSTASHD};--print-man;kvstashd.8"
             "${KVSTASH};--print-man;kvstash.1")
  list(GET _job 0 _prog)
  list(GET _job 1 _flag)
  list(GET _job 2 _file)
  execute_process(COMMAND "${_prog}" "${_flag}" OUTPUT_FILE "${OUT}/${_file}.tmp"
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${_prog} ${_flag} failed: ${_rc}")
  endif()
  file(RENAME "${OUT}/${_file}.tmp" "${OUT}/${_file}")
endforeach()
foreach(_page kvstashd.8 kvstash.1)
  execute_process(COMMAND gzip -9nf -c "${OUT}/${_page}" OUTPUT_FILE "${OUT}/${_page}.gz"
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "gzip ${_page} failed: ${_rc}")
  endif()
endforeach()
