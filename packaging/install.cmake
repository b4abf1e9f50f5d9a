# install.cmake - install rules (GNUInstallDirs) and the Debian packages
# (cpack -G DEB: kvstash, libkvstash0, libkvstash-dev). Included by the top
# CMakeLists.txt once the targets exist.
#
# Components, one per Debian package:
#   daemon -> kvstash         kvstashd, kvstash, unit, config, sysusers, man pages
#   lib    -> libkvstash0     libkvstash.so.0*
#   dev    -> libkvstash-dev  kvstash.h, libkvstash.so, kvstash.pc, CMake package

set(KS_GEN_DIR ${CMAKE_BINARY_DIR}/packaging)
file(MAKE_DIRECTORY ${KS_GEN_DIR})
set(KS_DEB_VERSION ${PROJECT_VERSION}-1)

# ---- generated from the option tables: config file and man pages ----------
add_custom_command(
  OUTPUT ${KS_GEN_DIR}/kvstashd.conf ${KS_GEN_DIR}/kvstashd.8 ${KS_GEN_DIR}/kvstash.1
         ${KS_GEN_DIR}/kvstashd.8.gz ${KS_GEN_DIR}/kvstash.1.gz
  COMMAND ${CMAKE_COMMAND} -DKVSTASHD=$<TARGET_FILE:kvstashd> -DKVSTASH=$<TARGET_FILE:kvstash-cli>
          -DOUT=${KS_GEN_DIR} -P ${CMAKE_SOURCE_DIR}/packaging/gendocs.cmake
  DEPENDS kvstashd kvstash-cli ${CMAKE_SOURCE_DIR}/packaging/gendocs.cmake
  COMMENT "Generating kvstashd.conf, kvstashd(8) and kvstash(1) from the option tables")
set(KS_VERSION ${PROJECT_VERSION})
configure_file(${CMAKE_SOURCE_DIR}/packaging/copyright.in ${KS_GEN_DIR}/copyright @ONLY)
configure_file(${CMAKE_SOURCE_DIR}/packaging/changelog.Debian.in ${KS_GEN_DIR}/changelog.Debian
               @ONLY)
add_custom_command(OUTPUT ${KS_GEN_DIR}/changelog.Debian.gz
  COMMAND gzip -9nf -k ${KS_GEN_DIR}/changelog.Debian
  DEPENDS ${KS_GEN_DIR}/changelog.Debian)
add_custom_target(kvstash_generated ALL DEPENDS ${KS_GEN_DIR}/kvstashd.conf
                  ${KS_GEN_DIR}/kvstashd.8.gz ${KS_GEN_DIR}/kvstash.1.gz
                  ${KS_GEN_DIR}/changelog.Debian.gz)

# ---- install rules -----------------------------------------------------------
install(TARGETS kvstashd kvstash-cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT daemon)
install(TARGETS kvstash EXPORT kvstashTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT lib NAMELINK_COMPONENT dev)
install(FILES ${CMAKE_SOURCE_DIR}/include/kvstash.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        COMPONENT dev)
install(FILES ${KS_GEN_DIR}/kvstashd.8.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man8 COMPONENT daemon)
install(FILES ${KS_GEN_DIR}/kvstash.1.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man1 COMPONENT daemon)
# sysusers.d is arch-independent: lib/, not the multiarch libdir.
install(FILES ${CMAKE_SOURCE_DIR}/packaging/kvstash.sysusers DESTINATION lib/sysusers.d
        RENAME kvstash.conf COMPONENT daemon)
foreach(_c daemon lib dev)
  set(_pkg_daemon kvstash)
  set(_pkg_lib libkvstash0)
  set(_pkg_dev libkvstash-dev)
  install(FILES ${KS_GEN_DIR}/copyright ${KS_GEN_DIR}/changelog.Debian.gz
          DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/${_pkg_${_c}} COMPONENT ${_c})
endforeach()

# Paths that follow the install-time prefix: unit, /etc config, kvstash.pc.
foreach(_part daemon dev)
  install(CODE "set(KS_PART ${_part})
set(KS_SOURCE_DIR \"${CMAKE_SOURCE_DIR}\")
set(KS_GEN_DIR \"${KS_GEN_DIR}\")
set(KS_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
set(KS_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
set(KS_BINDIR \"${CMAKE_INSTALL_BINDIR}\")
set(KS_VERSION \"${PROJECT_VERSION}\")" COMPONENT ${_part})
  install(SCRIPT ${CMAKE_SOURCE_DIR}/packaging/install-generated.cmake COMPONENT ${_part})
endforeach()

# find_package(kvstash) -> kvstash::kvstash
include(CMakePackageConfigHelpers)
set(_cmakedir ${CMAKE_INSTALL_LIBDIR}/cmake/kvstash)
install(EXPORT kvstashTargets NAMESPACE kvstash:: DESTINATION ${_cmakedir} COMPONENT dev)
configure_package_config_file(${CMAKE_SOURCE_DIR}/packaging/kvstashConfig.cmake.in
  ${KS_GEN_DIR}/kvstashConfig.cmake INSTALL_DESTINATION ${_cmakedir})
# 0.x: a minor version may change the API.
write_basic_package_version_file(${KS_GEN_DIR}/kvstashConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${KS_GEN_DIR}/kvstashConfig.cmake ${KS_GEN_DIR}/kvstashConfigVersion.cmake
        DESTINATION ${_cmakedir} COMPONENT dev)

# ---- Debian packages: cpack -G DEB (./dev package) ---------------------------
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME kvstash)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "kvstash developers <kvstash@localhost>")
# No CPACK_PACKAGE_DESCRIPTION_SUMMARY: CPack would prepend it to every
# package's description, giving the libraries the daemon's synopsis.
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL daemon lib dev)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# dpkg-shlibdeps must find libkvstash.so.0 (and, in a CUDA build, the CUDA
# runtime from NVIDIA's installer) although no installed package owns them;
# their Depends come from the lines below (CUDA: see docs/operations.md).
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS ${CMAKE_BINARY_DIR})
if(KVSTASH_HAVE_CUDA)
  list(APPEND CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS ${CUDAToolkit_LIBRARY_DIR})
endif()
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
# Debian ships stripped binaries (no -dbgsym packages are built here).
set(CPACK_STRIP_FILES ON)

set(CPACK_DEBIAN_DAEMON_PACKAGE_NAME kvstash)
set(CPACK_DEBIAN_DAEMON_PACKAGE_SECTION net)
set(CPACK_DEBIAN_DAEMON_PACKAGE_DEPENDS "libkvstash0 (= ${KS_DEB_VERSION}), adduser")
set(CPACK_DEBIAN_DAEMON_DESCRIPTION "KV-cache server for LLM inference engines
kvstashd keeps attention KV-cache chunks of LLM inference engines (vLLM and
others speaking LMCache's multiprocess protocol) in a host-memory pool, with
optional disk and Redis tiers, so that a repeated prompt prefix is copied
back instead of recomputed. This package has the daemon, its systemd unit
and configuration, and the kvstash command-line tool.")
set(CPACK_DEBIAN_DAEMON_PACKAGE_CONTROL_EXTRA ${CMAKE_SOURCE_DIR}/packaging/deb/conffiles
    ${CMAKE_SOURCE_DIR}/packaging/deb/postinst ${CMAKE_SOURCE_DIR}/packaging/deb/prerm
    ${CMAKE_SOURCE_DIR}/packaging/deb/postrm)

set(CPACK_DEBIAN_LIB_PACKAGE_NAME libkvstash0)
set(CPACK_DEBIAN_LIB_PACKAGE_SECTION libs)
set(CPACK_DEBIAN_LIB_DESCRIPTION "client library of the kvstash KV-cache server
libkvstash speaks the LMCache multiprocess protocol to kvstashd over ZeroMQ:
register KV buffers, store, look up and retrieve KV-cache chunks.")
# ldconfig through a trigger (CPack's own postinst/postrm also call ldconfig).
set(CPACK_DEBIAN_LIB_PACKAGE_CONTROL_EXTRA ${CMAKE_SOURCE_DIR}/packaging/deb/lib/triggers)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS_POLICY ">=")

set(CPACK_DEBIAN_DEV_PACKAGE_NAME libkvstash-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS "libkvstash0 (= ${KS_DEB_VERSION})")
set(CPACK_DEBIAN_DEV_DESCRIPTION "client library of the kvstash KV-cache server (development files)
The header, pkg-config file (kvstash.pc) and CMake package
(find_package(kvstash), target kvstash::kvstash) for building programs
against libkvstash.")
include(CPack)
