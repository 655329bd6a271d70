"""mmr1.cpu_threaded_batch: MKL batches cut into one slice per OpenMP thread give the products of one batched call;
a loop that cannot be built warns once and leaves the plain call in charge."""
import os
import warnings

import pytest
import torch

from mmr1 import cpu_grouped_gemm, cpu_threaded_batch


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_build():
    """function() is cached per process: forget it before and after, so each test builds (or fails) on its own."""
    cpu_threaded_batch.function.cache_clear()
    yield
    cpu_threaded_batch.function.cache_clear()


def _products(threaded: bool, monkeypatch, a, b, bt, dy, start, plan):
    monkeypatch.setattr(cpu_grouped_gemm, "MIN_GEMMS_PER_THREAD", 1 if threaded else 10**9)
    gemm = cpu_grouped_gemm.grouped_gemm
    return (gemm(a, b, plan), gemm(a, bt, plan, transpose_b=True), gemm(a, b, plan, out=start.clone()),
            cpu_grouped_gemm.grouped_weight_gemm(a, dy, plan, row_block=5))


def test_slices_on_threads_equal_one_batched_call(monkeypatch, two_threads):
    if not cpu_grouped_gemm.available(torch.empty(0)) or cpu_grouped_gemm.thread_slices() is None:
        pytest.skip("no MKL batched GEMM or no C compiler/libgomp in this environment")
    used = []
    real_slices = cpu_grouped_gemm.thread_slices
    monkeypatch.setattr(cpu_grouped_gemm, "thread_slices", lambda: used.append(1) or real_slices())
    g = torch.Generator().manual_seed(3)
    # 24 groups: empty ones, one holding a third of the rows (a slice may be that one GEMM alone).
    counts = torch.tensor([5, 0, 3, 40, 1, 7, 0, 2, 9, 4, 6, 1, 3, 0, 8, 2, 5, 7, 1, 3, 4, 6, 2, 1])
    M, E, K, N = int(counts.sum()), counts.numel(), 12, 7
    a = torch.randn(M, K + 2, generator=g)[:, :K]
    b, bt = torch.randn(E, K, N, generator=g), torch.randn(E, N, K, generator=g)
    dy, start = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    plan = cpu_grouped_gemm.GroupPlan(counts)
    threaded = _products(True, monkeypatch, a, b, bt, dy, start, plan)
    assert used, "the threaded slices were not used"
    plain = _products(False, monkeypatch, a, b, bt, dy, start, plan)
    for got, want in zip(threaded, plain):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    reference = torch.cat([r @ w for r, w in zip(a.split(counts.tolist()), b)])
    torch.testing.assert_close(threaded[0], reference, atol=1e-5, rtol=1e-5)


def test_loop_is_built_once_into_the_cache(monkeypatch, tmp_path, fresh_build):
    if cpu_threaded_batch.function() is None:
        pytest.skip("no C compiler or no libgomp in PyTorch's wheel here")
    cpu_threaded_batch.function.cache_clear()
    monkeypatch.setenv("MMR1_CACHE_DIR", str(tmp_path))
    assert cpu_threaded_batch.function() is not None
    built = [p for p in os.listdir(tmp_path) if p.endswith(".so")]
    assert len(built) == 1 and not [p for p in os.listdir(tmp_path) if not p.endswith(".so")]  # no leftovers
    stamp = os.stat(tmp_path / built[0]).st_mtime_ns
    cpu_threaded_batch.function.cache_clear()
    assert cpu_threaded_batch.function() is not None
    assert os.stat(tmp_path / built[0]).st_mtime_ns == stamp  # reused, not rebuilt


def test_unbuildable_loop_warns_once_and_products_stay_right(monkeypatch, tmp_path, fresh_build, two_threads):
    if not cpu_grouped_gemm.available(torch.empty(0)) or cpu_threaded_batch.openmp_runtime() is None:
        pytest.skip("no MKL batched GEMM or no libgomp in this torch build: nothing would be built")
    monkeypatch.setenv("MMR1_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_grouped_gemm, "MIN_GEMMS_PER_THREAD", 1)
    counts = torch.tensor([3, 0, 4, 2, 5, 1, 2, 3])
    a, b = torch.randn(int(counts.sum()), 6), torch.randn(8, 6, 4)
    plan = cpu_grouped_gemm.GroupPlan(counts)
    with pytest.warns(RuntimeWarning, match="could not build the threaded MKL batch loop"):
        out = cpu_grouped_gemm.grouped_gemm(a, b, plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning, no second build
        again = cpu_grouped_gemm.grouped_gemm(a, b, plan)
    reference = torch.cat([r @ w for r, w in zip(a.split(counts.tolist()), b)])
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threaded", [True, False])
def test_two_products_in_one_batch_equal_two_batches(monkeypatch, two_threads, threaded):
    """grouped_gemm_two: the pair (forward gate/up) and the sum (backward dx, the second GEMM of each group
    accumulating into the first's output, so a slice must never split a group's pair)."""
    if not cpu_grouped_gemm.available(torch.empty(0)):
        pytest.skip("no MKL batched GEMM in this torch build")
    monkeypatch.setattr(cpu_grouped_gemm, "MIN_GEMMS_PER_THREAD", 1 if threaded else 10**9)
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([4, 0, 9, 1, 30, 2, 0, 6, 3, 5, 7])  # uneven: work cuts fall inside a group's pair
    M, E, K, N = int(counts.sum()), counts.numel(), 10, 6
    a1, a2 = torch.randn(M, K, generator=g), torch.randn(M, K, generator=g)
    b1, b2 = torch.randn(E, K, N, generator=g), torch.randn(E, K, N, generator=g)
    bt1, bt2 = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    plan = cpu_grouped_gemm.GroupPlan(counts)
    gemm, two = cpu_grouped_gemm.grouped_gemm, cpu_grouped_gemm.grouped_gemm_two
    first, second = two(a1, b1, a1, b2, plan)
    torch.testing.assert_close(first, gemm(a1, b1, plan), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(second, gemm(a1, b2, plan), atol=1e-6, rtol=1e-6)
    for _ in range(3):  # the accumulation order inside a slice is what is being tested: repeat
        summed = two(a1, bt1, a2, bt2, plan, transpose_b=True, sum_products=True)
        reference = gemm(a1, bt1, plan, transpose_b=True) + gemm(a2, bt2, plan, transpose_b=True)
        torch.testing.assert_close(summed, reference, atol=1e-5, rtol=1e-5)
    # Operands whose strides differ take two batches and give the same.
    wide = torch.randn(M, K + 3, generator=g)[:, :K]
    torch.testing.assert_close(two(wide, bt1, a2, bt2, plan, transpose_b=True, sum_products=True),
                               gemm(wide, bt1, plan, transpose_b=True) + gemm(a2, bt2, plan, transpose_b=True),
                               atol=1e-5, rtol=1e-5)
