/*
 * transfer_host.h - CPU gather/scatter between paged KV and chunk objects.
 *
 * The host backend of the transfer engine. Whole rows are copied with
 * memcpy (one row = one token of one K/V plane of one layer, hidden *
 * elem_bytes bytes), or one memcpy per head when heads are strided. Callers
 * validated every slot against kv_num_slots() before calling.
 *
 * Tokens whose rows are adjacent in paged memory (consecutive slots with
 * token_stride == hidden) move as one larger copy. Transfers of 1 MiB or more
 * use non-temporal stores on x86 and end with a store fence, so every byte is
 * visible to other threads and processes when the call returns. No shared
 * state: calls may run concurrently when their destinations do not overlap.
 */
#ifndef KS_TRANSFER_HOST_H
#define KS_TRANSFER_HOST_H

#include <stdint.h>

#include "layout.h"

/*
 * Copy paged -> object.
 *   layers : [NL] base address of each layer's element 0
 *   slots  : [ntokens] paged slot (block * BS + offset) of each chunk token
 *   obj    : [K, NL, ntokens, hidden] elements, dense
 */
void xfer_host_gather(const struct kv_layout *l, void *const *layers, const int64_t *slots,
		      uint32_t ntokens, void *obj);

/*
 * Copy object -> paged, skipping chunk tokens [0, skip_tokens) (they stay
 * untouched in the paged buffer; protocol.md RETRIEVE step 2).
 *   obj    : [K, NL, ntokens, hidden] elements, dense
 */
void xfer_host_scatter(const struct kv_layout *l, void *const *layers, const int64_t *slots,
		       uint32_t ntokens, uint32_t skip_tokens, const void *obj);

#endif /* KS_TRANSFER_HOST_H */
