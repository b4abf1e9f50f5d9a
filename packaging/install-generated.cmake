# install-generated.cmake - runs at install time (cmake --install, cpack).
#
# Files whose paths depend on the prefix are generated here, from the prefix
# chosen when installing (cmake --install --prefix, cpack's /usr), not the
# one chosen at configure time, so that one build tree installs correctly
# into a temporary prefix and into a Debian package. GNUInstallDirs' rule
# applies: under the /usr prefix the configuration goes to /etc and the unit
# to /lib/systemd/system (Debian 12), elsewhere under the prefix.
# Set by install(CODE) before this script: KS_PART (daemon | dev), KS_SOURCE_DIR,
# KS_GEN_DIR, KS_LIBDIR, KS_INCLUDEDIR, KS_BINDIR, KS_VERSION.

set(KS_PREFIX "${CMAKE_INSTALL_PREFIX}")
foreach(_v KS_LIBDIR KS_INCLUDEDIR KS_BINDIR)
  if(NOT IS_ABSOLUTE "${${_v}}")
    set(${_v} "${KS_PREFIX}/${${_v}}")
  endif()
endforeach()
if(KS_PREFIX STREQUAL "/usr")
  set(KS_CONFDIR /etc/kvstash)
  set(_unitdir /lib/systemd/system)
else()
  set(KS_CONFDIR "${KS_PREFIX}/etc/kvstash")
  set(_unitdir "${KS_PREFIX}/lib/systemd/system")
endif()

set(_out "${KS_GEN_DIR}/install${KS_PREFIX}")
if(KS_PART STREQUAL "daemon")
  configure_file("${KS_SOURCE_DIR}/packaging/kvstashd.service.in" "${_out}/kvstashd.service" @ONLY)
  file(INSTALL DESTINATION "${_unitdir}" TYPE FILE FILES "${_out}/kvstashd.service")
  file(INSTALL DESTINATION "${KS_CONFDIR}" TYPE FILE FILES "${KS_GEN_DIR}/kvstashd.conf")
elseif(KS_PART STREQUAL "dev")
  configure_file("${KS_SOURCE_DIR}/packaging/kvstash.pc.in" "${_out}/kvstash.pc" @ONLY)
  file(INSTALL DESTINATION "${KS_LIBDIR}/pkgconfig" TYPE FILE FILES "${_out}/kvstash.pc")
endif()
