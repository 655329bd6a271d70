import textwrap
import threading

import pytest
import torch

from data_pipelines.errors import InputError
from encoders.base import ModalityProcessor
from fusion.cross_attention import GatedCrossAttention
from fusion.projector import MLPProjector, PerceiverResampler, ProjectorConfig, build_projector
from fusion.queues import ModalityQueues
from scale_utils import run_python


def test_gate_starts_closed_and_opens():
    torch.manual_seed(0)
    layer = GatedCrossAttention(dim=32, n_heads=4)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    assert torch.equal(layer(x, memory), torch.zeros(2, 5, 32))
    with torch.no_grad():
        layer.gate.fill_(0.5)
    assert layer(x, memory).abs().sum() > 0


def test_cross_attention_matches_reference_and_masks():
    torch.manual_seed(0)
    layer = GatedCrossAttention(dim=16, n_heads=2)
    with torch.no_grad():
        layer.gate.fill_(1.0)
    x, memory = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    out = layer(x, memory, mask)
    # reference: explicit softmax over the valid memory tokens only
    k, v = layer.memory_kv(memory)
    q = layer.wq(layer.norm(x)).view(3, 4, 2, 8).transpose(1, 2)
    for b, valid in ((0, 3), (1, 6)):
        scores = q[b] @ k[b, :, :valid].transpose(-1, -2) / 8 ** 0.5
        ref = (scores.softmax(-1) @ v[b, :, :valid]).transpose(0, 1).reshape(4, 16)
        torch.testing.assert_close(out[b], torch.tanh(torch.tensor(1.0)) * layer.wo(ref), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros(4, 16))  # a sample without modality tokens gets nothing
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_projectors_shapes_and_masks():
    tokens, mask = torch.randn(2, 9, 12), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out, out_mask = MLPProjector(12, 32)(tokens, mask)
    assert out.shape == (2, 9, 32) and torch.equal(out_mask, mask)
    resampler = build_projector(ProjectorConfig(kind="resampler", num_latents=4, heads=2), 12, 32)
    assert isinstance(resampler, PerceiverResampler)
    out, out_mask = resampler(tokens, mask)
    assert out.shape == (2, 4, 32) and out_mask.all()
    # padded input tokens must not influence the latents
    changed = tokens.clone()
    changed[1, 5:] = 100.0
    torch.testing.assert_close(resampler(changed, mask)[0], out)
    with pytest.raises(ValueError, match="kind"):
        ProjectorConfig(kind="linear")


class VectorProcessor(ModalityProcessor):
    """Test processor: inputs are python lists of floats; a negative first value is 'corrupt'."""

    modality = "vec"

    def load(self, source):
        if source[0] < 0:
            raise InputError("negative first value; expected a non-negative vector", source="<list>")
        return source

    def preprocess(self, raw):
        return torch.tensor(raw, dtype=torch.float32)

    def collate(self, items):
        longest = max(len(t) for t in items)
        values = torch.zeros(len(items), longest)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for i, t in enumerate(items):
            values[i, : len(t)] = t
            mask[i, : len(t)] = True
        return {"values": values, "mask": mask}


def test_queues_encode_in_worker_threads_and_keep_items_apart():
    threads = set()

    def encode(modality, values, mask):
        threads.add(threading.current_thread().name)
        return values[..., None].repeat(1, 1, 3) * 2, mask

    with ModalityQueues({"vec": VectorProcessor()}, encode, max_batch=4) as queues:
        futures = [queues.submit({"vec": [float(i)] * (i + 1)}, item=i) for i in range(6)]
        results = [queues.gather(f, timeout=10)["vec"] for f in futures]
        bad = queues.submit({"vec": [-1.0, 2.0]}, item=7)
        with pytest.raises(InputError, match="batch item 7.*negative"):
            queues.gather(bad, timeout=10)
        with pytest.raises(ValueError, match="no encoder for modality"):
            queues.submit({"image": "x.png"})
    for i, r in enumerate(results):
        assert r.mask.sum() == i + 1
        assert torch.equal(r.tokens[: i + 1], torch.full((i + 1, 3), 2.0 * i))
    assert threads == {"mmr1-vec-encoder"}


def test_queues_async_front():
    import asyncio

    def encode(modality, values, mask):
        return values[..., None], mask

    async def main(queues):
        return await asyncio.gather(*(queues.encode_async({"vec": [float(i), 1.0]}) for i in range(3)))

    with ModalityQueues({"vec": VectorProcessor()}, encode) as queues:
        out = asyncio.run(main(queues))
    assert [float(o["vec"].tokens[0, 0]) for o in out] == [0.0, 1.0, 2.0]


def test_queue_workers_take_their_own_thread_count():
    """intra_op_threads applies in the workers only: the caller's PyTorch thread count is left as it was."""
    seen = []

    def encode(modality, values, mask):
        seen.append(torch.get_num_threads())
        return values[..., None], mask

    before = torch.get_num_threads()
    with ModalityQueues({"vec": VectorProcessor()}, encode, intra_op_threads=1) as queues:
        queues.gather(queues.submit({"vec": [1.0]}), timeout=10)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="intra_op_threads=0"):
        ModalityQueues({"vec": VectorProcessor()}, encode, intra_op_threads=0)


def test_queues_dropped_without_close_stop_their_workers():
    """The workers hold the queue, processor and encode function, not the ModalityQueues: dropping it stops them
    once collected (and frees what `encode` holds, e.g. a model); close() stops them at once, and twice is fine."""
    import gc
    import weakref

    class Encoder:
        def encode(self, modality, values, mask):
            return values[..., None], mask

    owner = Encoder()
    owner_ref = weakref.ref(owner)
    queues = ModalityQueues({"vec": VectorProcessor()}, owner.encode)
    queues.gather(queues.submit({"vec": [1.0]}), timeout=10)
    workers = list(queues._threads)
    del queues, owner
    gc.collect()
    for t in workers:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in workers) and owner_ref() is None

    queues = ModalityQueues({"vec": VectorProcessor()}, Encoder().encode)
    queues.close()
    queues.close()
    assert not any(t.is_alive() for t in queues._threads)
    with pytest.raises(RuntimeError, match="closed"):
        queues.submit({"vec": [1.0]})


@pytest.mark.parametrize("close_first", [False, True])
def test_exit_while_a_worker_encodes_waits_for_that_batch_and_drops_the_queued_ones(close_first):
    """A script ending while a worker is inside PyTorch's kernels exits with status 0, not an abort (134) as the
    daemon worker takes the GIL back in a finalizing interpreter; the inputs still queued are not encoded. Also
    after a close() that stopped waiting for its workers (given 0.1 s here) while they had inputs queued."""
    script = textwrap.dedent("""
        import sys, threading, torch
        import fusion.queues
        from fusion.queues import ModalityQueues
        from test_fusion import VectorProcessor
        started = threading.Event()
        def encode(modality, values, mask):
            print("encode", flush=True)
            started.set()
            a = torch.randn(800, 800)
            for _ in range(40):
                a @ a  # about a second with the GIL released
            return values[:, :, None], mask
        queues = ModalityQueues({"vec": VectorProcessor()}, encode, max_batch=1)
        futures = [queues.submit({"vec": [float(i)]})["vec"] for i in range(3)]
        started.wait()
        if sys.argv[1] == "close_first":
            fusion.queues._stop_workers.__defaults__ = (0.1,)  # close() waits 0.1 s for its workers
            queues.close()
        print("exit", flush=True)
    """)
    proc = run_python("-c", script, "close_first" if close_first else "exit", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["encode", "exit"]  # one batch encoded; the two queued inputs were dropped
