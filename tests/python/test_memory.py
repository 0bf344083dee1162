"""The CPU output cache (qatx.memory): outputs of at least 128 KiB reuse freed blocks of the same
size, the limit bounds what is kept, and the outputs behave as ordinary tensors."""
import pytest
import torch

import qatx

S = torch.tensor([0.05])
Z = torch.tensor([0], dtype=torch.int32)


def fq(x):
    return qatx.fake_quantize_per_tensor_affine(x, S, Z, -128, 127)


@pytest.fixture
def cache_limit():
    previous = qatx.set_cpu_cache_limit(64 << 20)
    qatx.empty_cpu_cache()
    yield
    qatx.set_cpu_cache_limit(previous)


def test_a_freed_output_is_reused_by_the_next_output_of_its_size(cache_limit):
    x = torch.randn(64, 32, 32, 8)  # 2 MiB
    expected = fq(x).clone()
    y = fq(x)
    del y
    before = qatx.cpu_cache_stats()
    assert before["cached_bytes"] == x.numel() * 4
    y = fq(x)
    after = qatx.cpu_cache_stats()
    assert after["reused"] == before["reused"] + 1 and after["allocated"] == before["allocated"]
    assert after["cached_bytes"] == 0
    assert torch.equal(y, expected)


def test_small_outputs_and_other_sizes_take_new_memory(cache_limit):
    small = fq(torch.randn(1000))
    del small
    assert qatx.cpu_cache_stats()["cached_bytes"] == 0
    y = fq(torch.randn(256, 1024))
    del y
    before = qatx.cpu_cache_stats()
    z = fq(torch.randn(512, 1024))
    after = qatx.cpu_cache_stats()
    assert after["allocated"] == before["allocated"] + 1 and after["reused"] == before["reused"]
    assert after["cached_bytes"] == 256 * 1024 * 4
    del z


def test_the_limit_frees_the_oldest_blocks_first(cache_limit):
    qatx.set_cpu_cache_limit(3 << 20)
    a, b = fq(torch.randn(256, 1024)), fq(torch.randn(512, 1024))  # 1 MiB, 2 MiB
    c = fq(torch.randn(256, 1024))
    del a, b
    assert qatx.cpu_cache_stats()["cached_bytes"] == 3 << 20
    del c  # evicts a (the oldest), keeps b and c
    assert qatx.cpu_cache_stats()["cached_bytes"] == 3 << 20
    before = qatx.cpu_cache_stats()
    d = fq(torch.randn(512, 1024))
    assert qatx.cpu_cache_stats()["reused"] == before["reused"] + 1
    del d
    assert qatx.set_cpu_cache_limit(0) == 3 << 20
    assert qatx.cpu_cache_stats()["cached_bytes"] == 0
    e = fq(torch.randn(256, 1024))
    del e
    assert qatx.cpu_cache_stats()["cached_bytes"] == 0  # off: freed at once


def test_empty_cpu_cache_frees_only_blocks_not_in_use(cache_limit):
    x = torch.randn(512, 1024)
    kept = fq(x)
    expected = kept.clone()
    freed = fq(x)
    del freed
    assert qatx.empty_cpu_cache() == 2 << 20
    assert qatx.cpu_cache_stats()["cached_bytes"] == 0
    assert torch.equal(kept, expected)


def test_outputs_are_ordinary_tensors(cache_limit):
    x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    y = fq(x)
    assert y.stride() == x.stride()  # the input's layout, as before
    for t in (x.transpose(1, 3), x.transpose(1, 3)[..., :1].expand(8, 32, 32, 5)):  # permuted; not dense
        assert fq(t).stride() == torch.empty_like(t).stride()
        assert torch.equal(fq(t), fq(t.contiguous()))
    y.resize_(4, 1024, 256)  # larger: new memory through the same allocator
    y.fill_(1.0)
    assert y.sum().item() == 4 * 1024 * 256
    t = qatx.fake_quantize_per_tensor_affine(x.requires_grad_(), S, Z, -128, 127)
    t.sum().backward()  # the STE backward's gradient comes from the cache too
    assert x.grad.shape == x.shape and x.grad.stride() == x.stride()
    w = torch.randint(-127, 128, (256, 512), dtype=torch.int8)
    out = qatx.linear_int8(torch.randn(1024, 512), S, Z, -128, 127, w, torch.full((256,), 0.01),
                           torch.zeros(256, dtype=torch.int32))
    assert out.is_contiguous() and out.data_ptr() % 64 == 0


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        qatx.set_cpu_cache_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        qatx.set_cpu_cache_limit(1.5)


def test_the_profiler_sees_cached_outputs_while_they_live(cache_limit):
    x = torch.randn(256, 1024)
    y = fq(x)
    del y  # a cached block
    from torch.profiler import profile
    with profile(profile_memory=True) as prof:
        y = fq(x)  # reused block: no new memory, but an allocation to the profiler
        del y
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert 256 * 1024 * 4 in sizes and -256 * 1024 * 4 in sizes
