/*
 * auth.h - optional ZMQ CURVE encryption and client authentication.
 *
 * With a server secret key, the ROUTER socket is a CURVE server: traffic is
 * encrypted and only clients that know the server's public key can talk to
 * it. With an allowed-clients file as well, a ZAP handler accepts only the
 * client public keys listed there (one Z85 key per line, '#' comments).
 */
#ifndef KS_AUTH_H
#define KS_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#define AUTH_Z85_KEY_LEN 40

struct auth;

/*
 * Read a Z85 key (40 characters, surrounding whitespace ignored) from @path.
 * 0, -errno, or -EINVAL when the file holds no valid key; reason in @err.
 */
int auth_read_key_file(const char *path, char out[AUTH_Z85_KEY_LEN + 1], char *err,
		       size_t errlen);

/*
 * Set up CURVE on @zctx/@sock (before zmq_bind): load the server secret key
 * from @secret_path, and when @allowed_path is non-empty start a ZAP handler
 * thread on @zctx that accepts only the listed client keys. Returns 0 with
 * *out set (NULL when @secret_path is empty: CURVE off), or -errno with a
 * reason in @err.
 */
int auth_setup(void *zctx, void *sock, const char *secret_path, const char *allowed_path,
	       struct auth **out, char *err, size_t errlen);
/* Stop the ZAP thread (before the context is terminated) and free. */
void auth_stop(struct auth *a);
/* The server's public key (Z85), for the startup log. */
const char *auth_server_public(const struct auth *a);

#endif /* KS_AUTH_H */
