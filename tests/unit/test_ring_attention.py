"""Ring attention without processes: cp ranks as threads passing tensors through queues run the real ring
(forward and backward) and together give PyTorch's SDPA over the whole sequence (causal, or packed documents
by a dense mask), outputs and q/k/v gradients, with grouped-query heads; with either block kernel."""

import queue
import threading
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from cybertron.parallel.context_parallel import document_ids
from cybertron.parallel.ring_attention import (
    ZigzagLayout,
    flash_cpu_block_backward,
    flash_cpu_block_forward,
    matmul_block_backward,
    matmul_block_forward,
    ring_attention,
    zigzag_indices,
)


class QueueRing:
    """A Ring whose ranks are threads: rank r's inbox per tag is a queue the previous rank puts into."""

    def __init__(self, rank: int, inboxes: list[dict[int, queue.Queue]]):
        self.rank, self.size, self.inboxes = rank, len(inboxes), inboxes

    def shift(self, tensor, tag):
        self.inboxes[(self.rank + 1) % self.size][tag].put(tensor.clone())
        return lambda: self.inboxes[self.rank][tag].get(timeout=60)


def _run_ring(cp, q, k, v, dout, documents, kernels):
    t = q.shape[2]
    inboxes = [{tag: queue.Queue() for tag in (7101, 7102)} for _ in range(cp)]
    results, errors = [None] * cp, []

    def rank_main(rank):
        try:
            mine = zigzag_indices(t, cp, rank)
            ql, kl, vl = (x[:, :, mine].detach().requires_grad_() for x in (q, k, v))
            layout = ZigzagLayout(cp, rank, t, documents)
            out = ring_attention(ql, kl, vl, QueueRing(rank, inboxes), layout, kernels)
            out.backward(dout[:, :, mine])
            results[rank] = (mine, out.detach(), ql.grad, kl.grad, vl.grad)
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(cp)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    whole = [torch.zeros_like(x) for x in (q, q, q, k, v)]
    for mine, *parts in results:
        for w, p in zip(whole, [None, *parts], strict=True):
            if p is not None:
                w[:, :, mine] = p
    return whole[1:]


@pytest.mark.parametrize("kernels", [(flash_cpu_block_forward, flash_cpu_block_backward),
                                     # a few query rows per tile: uneven tiles of every block
                                     (partial(matmul_block_forward, tile_elements=3 * 32 * 4),
                                      partial(matmul_block_backward, tile_elements=3 * 32 * 4))],
                         ids=["flash_cpu", "matmul"])
@pytest.mark.parametrize(("cp", "packed"), [(2, False), (2, True), (4, False), (4, True)])
def test_ring_matches_sdpa_forward_and_backward(cp, packed, kernels):
    g = torch.Generator().manual_seed(cp)
    b, nh, nkv, t, hd = 2, 4, 2, 32, 8
    q = torch.randn(b, nh, t, hd, generator=g)
    k, v = torch.randn(b, nkv, t, hd, generator=g), torch.randn(b, nkv, t, hd, generator=g)
    dout = torch.randn(b, nh, t, hd, generator=g)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    documents = None
    if packed:  # documents of 5, 13 and 14 tokens (row 0) and 20 and 12 (row 1): boundaries inside chunks
        positions = torch.cat([torch.cat([torch.arange(n) for n in lens])[None] for lens in ([5, 13, 14], [20, 12])])
        documents = document_ids(positions)
        mask = mask & (documents[:, :, None] == documents[:, None, :])
        mask = mask[:, None]
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True)
    ref.backward(dout)
    out, dq, dk, dv = _run_ring(cp, q, k, v, dout, documents, kernels)
    for got, want in [(out, ref), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_blocks_are_chunk_pairs_that_share_a_document():
    # cp 2, chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2; two documents of 8 tokens
    documents = document_ids(torch.cat([torch.arange(8), torch.arange(8)])[None])
    spans = lambda blocks: [(b.q.start, b.k.start, b.mask[0, 0].all().item()) for b in blocks]
    # rank 1's chunk 1 sees rank 0's chunk 0 (document 0, all of it); its chunk 2 (document 1) sees neither
    assert spans(ZigzagLayout(2, 1, 16, documents).blocks(1)) == [(0, 0, True)]
    # rank 0's chunk 3 sees rank 1's chunk 2 (document 1); chunk 0 sees nothing later
    assert spans(ZigzagLayout(2, 0, 16, documents).blocks(1)) == [(4, 4, True)]
    # one document per chunk: only each chunk with itself, causally
    layout = ZigzagLayout(2, 0, 16, document_ids(torch.arange(16)[None] % 4))
    assert layout.blocks(1) == []
    assert spans(layout.blocks(0)) == [(0, 0, False), (4, 4, False)]
    assert layout.blocks(0)[0].mask[0, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())
