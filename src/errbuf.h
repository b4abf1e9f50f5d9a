/*
 * errbuf.h - where a decoder writes its one-line reason for refusing input:
 * the protocol decoder (protocol.c) and the pickle reader (pickle.c) both
 * report through it, so every refusal comes back to the caller as a
 * -errno plus a sentence, with no allocation.
 */
#ifndef KS_ERRBUF_H
#define KS_ERRBUF_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "compiler.h"

/* The caller's buffer; buf may be NULL (no message wanted). */
struct ks_errbuf {
	char *buf;
	size_t len;
};

/* Write the reason into @e (if it has room) and return @rc, for `return ks_err(...)`. */
static inline int KS_PRINTF(3, 4) ks_err(struct ks_errbuf *e, int rc, const char *fmt, ...)
{
	va_list ap;

	if (e && e->buf && e->len) {
		va_start(ap, fmt);
		vsnprintf(e->buf, e->len, fmt, ap);
		va_end(ap);
	}
	return rc;
}

#endif /* KS_ERRBUF_H */
