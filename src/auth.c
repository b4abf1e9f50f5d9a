/*
 * auth.c - CURVE keys and the ZAP handler (RFC 27).
 *
 * DESIGN: libzmq asks the handler bound to inproc://zeromq.zap.01 about
 * every new CURVE connection. The handler thread owns that REP socket and
 * the immutable allowed-key list; it polls with a timeout so auth_stop() is
 * seen within AUTH_POLL_MS. No kvstash lock is involved.
 */
#include "auth.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "log.h"

#define AUTH_POLL_MS 200
#define AUTH_MAX_CLIENTS 4096
#define AUTH_ZAP_ENDPOINT "inproc://zeromq.zap.01"

struct auth {
	char server_public[AUTH_Z85_KEY_LEN + 1];
	uint8_t (*allowed)[32];	/* [nallowed] decoded client keys; owned */
	size_t nallowed;
	void *zap;		/* REP socket, owned by the thread after start */
	pthread_t thread;
	bool running;
	_Atomic bool stop;
};

int auth_read_key_file(const char *path, char out[AUTH_Z85_KEY_LEN + 1], char *err,
		       size_t errlen)
{
	char buf[256];
	FILE *f = fopen(path, "r");
	size_t n = 0;
	uint8_t raw[32];

	if (!f) {
		int rc = -errno;

		snprintf(err, errlen, "cannot open key file %s: %s", path, strerror(errno));
		return rc;
	}
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	char *p = buf;
	while (isspace((unsigned char)*p))
		p++;
	size_t len = strcspn(p, " \t\r\n");
	if (len != AUTH_Z85_KEY_LEN || !zmq_z85_decode(raw, (p[len] = '\0', p))) {
		snprintf(err, errlen, "%s does not hold a 40-character Z85 CURVE key", path);
		return -EINVAL;
	}
	memcpy(out, p, AUTH_Z85_KEY_LEN + 1);
	return 0;
}

static int load_allowed(struct auth *a, const char *path, char *err, size_t errlen)
{
	char line[256];
	FILE *f = fopen(path, "r");
	int lineno = 0;

	if (!f) {
		int rc = -errno;

		snprintf(err, errlen, "cannot open allowed-clients file %s: %s", path,
			 strerror(errno));
		return rc;
	}
	a->allowed = calloc(AUTH_MAX_CLIENTS, sizeof(*a->allowed));
	if (!a->allowed) {
		fclose(f);
		return -ENOMEM;
	}
	while (fgets(line, sizeof(line), f)) {
		char *p = line;
		size_t len;

		lineno++;
		while (isspace((unsigned char)*p))
			p++;
		if (!*p || *p == '#')
			continue;
		/* '#' starts a comment only at the start of a line: Z85 uses it. */
		len = strcspn(p, " \t\r\n");
		p[len] = '\0';
		if (len != AUTH_Z85_KEY_LEN || a->nallowed == AUTH_MAX_CLIENTS ||
		    !zmq_z85_decode(a->allowed[a->nallowed], p)) {
			snprintf(err, errlen, "%s:%d: not a 40-character Z85 public key (or more "
				 "than %d keys)", path, lineno, AUTH_MAX_CLIENTS);
			fclose(f);
			return -EINVAL;
		}
		a->nallowed++;
	}
	fclose(f);
	return 0;
}

static bool key_allowed(const struct auth *a, const uint8_t *key, size_t len)
{
	if (len != 32)
		return false;
	for (size_t i = 0; i < a->nallowed; i++)
		if (!memcmp(a->allowed[i], key, 32))
			return true;
	return false;
}

/* Handle one ZAP request: [version, id, domain, address, identity, mechanism, creds...]. */
static void zap_handle(struct auth *a)
{
	zmq_msg_t f[8];
	int n = 0, more = 1;
	char addr[64] = "";
	bool ok;

	while (more && n < 8) {
		zmq_msg_init(&f[n]);
		if (zmq_msg_recv(&f[n], a->zap, 0) < 0) {
			zmq_msg_close(&f[n]);
			break;
		}
		more = zmq_msg_more(&f[n]);
		n++;
	}
	while (more) {	/* drain frames beyond what ZAP defines */
		zmq_msg_t extra;

		zmq_msg_init(&extra);
		if (zmq_msg_recv(&extra, a->zap, 0) < 0)
			more = 0;
		else
			more = zmq_msg_more(&extra);
		zmq_msg_close(&extra);
	}
	if (n < 6) {
		for (int i = 0; i < n; i++)
			zmq_msg_close(&f[i]);
		return;
	}
	ok = n >= 7 && zmq_msg_size(&f[5]) == 5 && !memcmp(zmq_msg_data(&f[5]), "CURVE", 5) &&
	     key_allowed(a, zmq_msg_data(&f[6]), zmq_msg_size(&f[6]));
	snprintf(addr, sizeof(addr), "%.*s", (int)zmq_msg_size(&f[3]),
		 (const char *)zmq_msg_data(&f[3]));
	if (!ok) {
		char z85[AUTH_Z85_KEY_LEN + 1] = "?";

		if (n >= 7 && zmq_msg_size(&f[6]) == 32)
			zmq_z85_encode(z85, zmq_msg_data(&f[6]), 32);
		log_warn("auth: refused client %s with key %s (not in the allowed list)", addr, z85);
	}
	/* Reply: version, request id, status code, status text, user id, metadata. */
	zmq_send(a->zap, "1.0", 3, ZMQ_SNDMORE);
	zmq_send(a->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
	zmq_send(a->zap, ok ? "200" : "400", 3, ZMQ_SNDMORE);
	zmq_send(a->zap, ok ? "OK" : "key not allowed", ok ? 2 : 15, ZMQ_SNDMORE);
	/* User id: the client's key (Z85), which libzmq attaches to each of its
	 * messages as "User-Id": the reconnect rule's proof on CURVE connections. */
	{
		char uid[AUTH_Z85_KEY_LEN + 1] = "";

		if (ok && zmq_msg_size(&f[6]) == 32)
			zmq_z85_encode(uid, zmq_msg_data(&f[6]), 32);
		zmq_send(a->zap, uid, strlen(uid), ZMQ_SNDMORE);
	}
	zmq_send(a->zap, "", 0, 0);
	for (int i = 0; i < n; i++)
		zmq_msg_close(&f[i]);
}

static void *zap_main(void *p)
{
	struct auth *a = p;

	while (!atomic_load(&a->stop)) {
		zmq_pollitem_t it = { .socket = a->zap, .events = ZMQ_POLLIN };

		if (zmq_poll(&it, 1, AUTH_POLL_MS) > 0)
			zap_handle(a);
	}
	zmq_close(a->zap);
	return NULL;
}

int auth_setup(void *zctx, void *sock, const char *secret_path, const char *allowed_path,
	       struct auth **out, char *err, size_t errlen)
{
	char secret[AUTH_Z85_KEY_LEN + 1];
	struct auth *a;
	int one = 1, rc;

	*out = NULL;
	if (!secret_path || !*secret_path) {
		if (allowed_path && *allowed_path) {
			snprintf(err, errlen, "--curve-allowed-clients needs --curve-secret-key-file");
			return -EINVAL;
		}
		return 0;
	}
	if (!zmq_has("curve")) {
		snprintf(err, errlen, "this libzmq has no CURVE support");
		return -ENOTSUP;
	}
	rc = auth_read_key_file(secret_path, secret, err, errlen);
	if (rc)
		return rc;
	a = calloc(1, sizeof(*a));
	if (!a)
		return -ENOMEM;
	if (zmq_curve_public(a->server_public, secret) < 0) {
		snprintf(err, errlen, "%s: cannot derive the public key", secret_path);
		free(a);
		return -EINVAL;
	}
	if (allowed_path && *allowed_path) {
		rc = load_allowed(a, allowed_path, err, errlen);
		if (rc)
			goto out_free;
		a->zap = zmq_socket(zctx, ZMQ_REP);
		if (!a->zap || zmq_bind(a->zap, AUTH_ZAP_ENDPOINT) < 0) {
			snprintf(err, errlen, "ZAP handler: %s", zmq_strerror(zmq_errno()));
			rc = -EIO;
			goto out_free;
		}
		rc = -pthread_create(&a->thread, NULL, zap_main, a);
		if (rc) {
			zmq_close(a->zap);
			goto out_free;
		}
		a->running = true;
	}
	if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) < 0 ||
	    zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret, AUTH_Z85_KEY_LEN) < 0) {
		snprintf(err, errlen, "CURVE socket options: %s", zmq_strerror(zmq_errno()));
		auth_stop(a);
		return -EIO;
	}
	if (a->running) {
		/* Ask ZAP about every connection, also those of the NULL mechanism. */
		zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, "kvstash", 7);
	}
	*out = a;
	return 0;
out_free:
	free(a->allowed);
	free(a);
	return rc;
}

void auth_stop(struct auth *a)
{
	if (!a)
		return;
	if (a->running) {
		atomic_store(&a->stop, true);
		pthread_join(a->thread, NULL);
	}
	free(a->allowed);
	free(a);
}

const char *auth_server_public(const struct auth *a)
{
	return a->server_public;
}
