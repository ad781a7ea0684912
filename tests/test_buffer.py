"""ReplayBuffer semantics from first principles, statistics of its draws, checkpoints and bad
input. Kernels against the reference: tests/kernels/test_buffer.py."""

import io

import numpy as np
import pytest
import torch
from scipy import stats

import ebm_fast
from ebm_fast import ReplayBuffer, use_backend
from ebm_fast.noise import STREAM_BUFFER_REINIT_VALUES
from ebm_fast.reference.buffer_push import quantize
from ebm_fast.reference.buffer_sample import uint8_scales
from ebm_fast.reference.philox import philox_uniform_ref

P_MIN = 1e-3  # fixed seeds: these tests are deterministic; a real bias gives p far below this


def _stored(buffer):
    return buffer.state_dict()["storage"]


def test_exported():
    assert ebm_fast.ReplayBuffer is ReplayBuffer and "ReplayBuffer" in ebm_fast.__all__


def test_unwritten_slots_give_fresh_uniform_init_noise():
    buffer = ReplayBuffer(16, (2, 3), init_range=(0.5, 2.5), seed=9)
    x, idx = buffer.sample(5)
    assert x.shape == (5, 2, 3) and x.dtype == torch.float32 and idx.dtype == torch.int64
    u = philox_uniform_ref((5, 6), seed=9, step=0, stream=STREAM_BUFFER_REINIT_VALUES)
    torch.testing.assert_close(x.reshape(5, 6), 0.5 + 2.0 * u, rtol=0, atol=1e-6)
    assert len(buffer) == 0
    x2, _ = buffer.sample(5)
    assert not torch.equal(x, x2)  # the draw counter advanced


def test_write_back_then_sample_returns_the_stored_chains():
    buffer = ReplayBuffer(8, (4,), reinit_prob=0.0, seed=1)
    x, idx = buffer.sample(8)
    new = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    buffer.push(new, idx=idx)
    expected = {}
    for i in range(8):  # duplicates: the later chain wins
        expected[int(idx[i])] = new[i]
    assert len(buffer) == len(expected)
    stored = _stored(buffer)
    for slot, row in expected.items():
        assert torch.equal(stored[slot], row)
    again, idx2 = buffer.sample(64)
    for i in range(64):
        slot = int(idx2[i])
        if slot in expected:
            assert torch.equal(again[i], expected[slot])


def test_fifo_keeps_the_latest_items_in_ring_order():
    buffer = ReplayBuffer(5, (1,), policy="fifo")
    items = torch.arange(13, dtype=torch.float32)
    for chunk in (items[:2], items[2:9], items[9:10], items[10:]):  # one chunk beyond capacity
        buffer.push(chunk[:, None])
    stored = _stored(buffer)[:, 0]
    for slot in range(5):
        assert stored[slot] == max(t for t in range(13) if t % 5 == slot)
    assert int(buffer.state_dict()["count"][0]) == 13


def test_fifo_per_class_rings_are_independent():
    buffer = ReplayBuffer(6, (1,), n_classes=3, policy="fifo")
    buffer.push(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), y=torch.tensor([2, 0, 2, 2]))
    stored = _stored(buffer)[:, 0]
    assert stored.tolist() == [2.0, 0.0, 0.0, 0.0, 4.0, 3.0]
    assert buffer.state_dict()["count"].tolist() == [1, 0, 3]
    assert len(buffer) == 3


def test_per_class_sampling_stays_in_the_class_block():
    buffer = ReplayBuffer(30, (2,), n_classes=3, seed=4)
    y = torch.tensor([0, 1, 2] * 50)
    _, idx = buffer.sample(150, y=y)
    assert torch.equal(idx // 10, y)


def test_slot_draws_are_uniform():
    buffer = ReplayBuffer(50, (1,), seed=123)
    counts = torch.zeros(50)
    for _ in range(4):
        _, idx = buffer.sample(5000)
        counts += torch.bincount(idx, minlength=50)
    assert stats.chisquare(counts.numpy()).pvalue > P_MIN


@pytest.mark.parametrize("reinit_prob", [0.05, 0.3])
def test_reinit_fraction_matches_reinit_prob(reinit_prob):
    buffer = ReplayBuffer(64, (3,), init_range=(1.0, 2.0), reinit_prob=reinit_prob, seed=5)
    buffer.push(torch.zeros(64, 3))  # every slot written; init noise is in [1, 2)
    n = 20000
    x, _ = buffer.sample(n)
    reinit = x[:, 0] >= 1.0
    assert torch.equal(reinit, (x >= 1.0).all(1))  # a chain is reinitialised whole
    result = stats.binomtest(int(reinit.sum()), n, reinit_prob)
    assert result.pvalue > P_MIN


def test_reservoir_inclusion_probability_is_capacity_over_count():
    capacity, items, trials = 4, 20, 1500
    included = torch.zeros(items)
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, (1,), policy="reservoir", seed=trial, check_values=False)
        for start in range(0, items, 5):  # several pushes, several items per push
            buffer.push(torch.arange(start, start + 5, dtype=torch.float32)[:, None])
        stored = _stored(buffer)[:, 0].long()
        assert stored.unique().numel() == capacity
        included[stored] += 1
    expected = trials * capacity / items
    assert stats.chisquare(included.numpy(), [expected] * items).pvalue > P_MIN


@pytest.mark.parametrize("seen", [2**31 - 2, 2**31, 2**32 + 7, 2**40 + 1, 2**46 - 6])
def test_reservoir_slot_is_r_times_t_plus_1_over_2_32_in_exact_integers(seen):
    from ebm_fast.noise import MASK32, STREAM_BUFFER_RESERVOIR
    from ebm_fast.reference.buffer_push import push_targets
    from ebm_fast.reference.philox import philox_bits_ref

    slots = seen // 2  # a full reservoir: each draw j in [0, t] lands (j < slots) or is dropped
    targets, _ = push_targets(
        5, None, None, torch.tensor([seen]), slots, "reservoir", 3, 9, 0, "cpu"
    )
    r = philox_bits_ref((5,), seed=3, step=9, stream=STREAM_BUFFER_RESERVOIR).to(torch.int64)
    words = (r & MASK32).tolist()
    expected = [(word * (seen + rank + 1)) >> 32 for rank, word in enumerate(words)]  # exact
    assert targets.tolist() == [j if j < slots else -1 for j in expected]


def test_uint8_rounds_to_nearest_half_up_within_half_a_step():
    lo, hi = -1.0, 1.0
    step = uint8_scales(lo, hi)[0]
    x = torch.linspace(-1.2, 1.2, 4001)
    codes = quantize(x[:, None], torch.uint8, lo, hi, False, 0, 0, 0)[:, 0]
    back = lo + codes.float() * step
    inside = (x >= lo) & (x <= hi)
    assert (back - x)[inside].abs().max() <= step / 2 + 1e-6  # + float32 rounding of v
    assert codes[x < lo].eq(0).all() and codes[x > hi].eq(255).all()
    # Exact halfway points of a power-of-two grid round up.
    grid_lo, grid_hi = 0.0, 255 / 256
    halfway = (torch.arange(255, dtype=torch.float32) + 0.5) / 256
    up = quantize(halfway[:, None], torch.uint8, grid_lo, grid_hi, False, 0, 0, 0)[:, 0]
    assert torch.equal(up.long(), torch.arange(255) + 1)


def test_uint8_buffer_stores_codes_and_returns_dequantised_values():
    buffer = ReplayBuffer(32, (3, 8), storage="uint8", reinit_prob=0.0, seed=2)
    assert _stored(buffer).dtype == torch.uint8 and _stored(buffer).element_size() == 1
    x = torch.rand(32, 3, 8) * 2 - 1
    buffer.push(x)
    step = uint8_scales(-1.0, 1.0)[0]
    got, idx = buffer.sample(32)
    assert (got - x[idx]).abs().max() <= step / 2 + 1e-6  # + float32 rounding of v


def test_stochastic_rounding_is_unbiased():
    lo, hi = 0.0, 1.0
    step = uint8_scales(lo, hi)[0]
    value = 0.3 * step + 10 * step  # 30% of the way from code 10 to code 11
    x = torch.full((20000, 1), value)
    codes = quantize(x, torch.uint8, lo, hi, True, 7, 0, 0).float()
    assert set(codes.unique().tolist()) == {10.0, 11.0}
    assert stats.binomtest(int((codes == 11).sum()), 20000, 0.3).pvalue > P_MIN


def test_bfloat16_storage_halves_memory_and_rounds():
    buffer = ReplayBuffer(4, (5,), storage="bfloat16", reinit_prob=0.0)
    x = torch.randn(4, 5)
    buffer.push(x)
    assert _stored(buffer).element_size() == 2
    got, idx = buffer.sample(8)
    assert torch.equal(got, x[idx].to(torch.bfloat16).float())


def test_gaussian_and_callable_init():
    gaussian = ReplayBuffer(8, (1000,), init="gaussian", seed=3)
    x, _ = gaussian.sample(4)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05

    def ones(shape, *, device, dtype):
        return torch.ones(shape, device=device, dtype=dtype)

    custom = ReplayBuffer(8, (2, 2), init=ones, reinit_prob=0.0)
    x, _ = custom.sample(3)
    assert torch.equal(x, torch.ones(3, 2, 2))  # unwritten slots: init values
    assert "init=ones" in repr(custom)


def test_dtype_of_returned_batches():
    buffer = ReplayBuffer(4, (3,), dtype=torch.bfloat16, reinit_prob=0.0)
    buffer.push(torch.randn(4, 3, dtype=torch.float64))
    x, _ = buffer.sample(2)
    assert x.dtype == torch.bfloat16


def test_non_contiguous_push_equals_contiguous():
    x = torch.randn(6, 4).t()  # (4, 6) non-contiguous
    a = ReplayBuffer(4, (6,), seed=0)
    b = ReplayBuffer(4, (6,), seed=0)
    a.push(x)
    b.push(x.contiguous())
    assert torch.equal(_stored(a), _stored(b))


def test_ranks_draw_disjoint_noise():
    r0 = ReplayBuffer(1000, (4,), seed=3, rank=0)
    r1 = ReplayBuffer(1000, (4,), seed=3, rank=1)
    x0, i0 = r0.sample(64)
    x1, i1 = r1.sample(64)
    assert not torch.equal(i0, i1) and not torch.equal(x0, x1)
    u = philox_uniform_ref(
        (64, 4), seed=3, step=0, stream=STREAM_BUFFER_REINIT_VALUES, chain_offset=2**32
    )
    torch.testing.assert_close(x1.reshape(64, 4), -1 + 2 * u, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_state_dict_resumes_bit_identically(backend):
    def make():
        return ReplayBuffer(
            12,
            (2, 3),
            storage="uint8",
            n_classes=3,
            policy="reservoir",
            seed=77,
            stochastic_rounding=True,
            reinit_prob=0.2,
        )

    def cycle(buffer, t):
        y = torch.tensor([t % 3, (t + 1) % 3, 2, 0, 1])
        x, idx = buffer.sample(5, y=y)
        buffer.push(x * 0.9, y=y)
        buffer.push(x * 0.5, idx=idx)
        return x

    with use_backend(backend):
        a = make()
        for t in range(3):
            cycle(a, t)
        saved = io.BytesIO()
        torch.save(a.state_dict(), saved)
        expected = [cycle(a, t) for t in range(3, 6)]
        b = make()
        b.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
        got = [cycle(b, t) for t in range(3, 6)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert all(
        torch.equal(a.state_dict()[k], b.state_dict()[k])
        for k in ("storage", "written", "count", "draws", "seed")
    )


def test_load_state_dict_refuses_a_mismatch():
    state = ReplayBuffer(12, (2, 3), storage="uint8").state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(24, (2, 3), storage="uint8").load_state_dict(state)
    with pytest.raises(ValueError, match="storage"):
        ReplayBuffer(12, (2, 3), storage="float32").load_state_dict(state)
    with pytest.raises(ValueError, match="sample_shape"):
        ReplayBuffer(12, (3, 2), storage="uint8").load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer(12, (2, 3), storage="uint8").load_state_dict({"config": state["config"]})
    broken = dict(state, count=state["count"].float())
    with pytest.raises(ValueError, match="count"):
        ReplayBuffer(12, (2, 3), storage="uint8").load_state_dict(broken)


def test_bad_construction():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, (3,))
    with pytest.raises(ValueError, match="sample_shape"):
        ReplayBuffer(4, (3, 0))
    with pytest.raises(ValueError, match="storage"):
        ReplayBuffer(4, (3,), storage="int8")
    with pytest.raises(ValueError, match="n_classes"):
        ReplayBuffer(10, (3,), n_classes=3)
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(4, (3,), policy="lifo")
    with pytest.raises(ValueError, match="init_range"):
        ReplayBuffer(4, (3,), init_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="reinit_prob"):
        ReplayBuffer(4, (3,), reinit_prob=1.5)
    with pytest.raises(ValueError, match="init"):
        ReplayBuffer(4, (3,), init="laplace")
    with pytest.raises(TypeError, match="dtype"):
        ReplayBuffer(4, (3,), dtype=torch.int32)
    with pytest.raises(TypeError, match="capacity"):
        ReplayBuffer(True, (3,))
    with pytest.raises(TypeError, match="stochastic_rounding"):
        ReplayBuffer(4, (3,), stochastic_rounding="yes")
    with pytest.raises(ValueError, match="init_range"):
        ReplayBuffer(4, (3,), init_range=(float("nan"), 1.0))
    with pytest.raises(ValueError, match="seed"):
        ReplayBuffer(4, (3,), seed=2**64)
    assert ReplayBuffer(np.int64(4), (np.int32(3),), reinit_prob=np.float32(0.5)).capacity == 4


def test_bad_sample_and_push_arguments():
    plain = ReplayBuffer(8, (2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        plain.sample(0)
    with pytest.raises(TypeError, match="batch_size"):
        plain.sample(2.0)
    with pytest.raises(ValueError, match="y was given"):
        plain.sample(2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        plain.push(torch.zeros(4, 3, 2))
    with pytest.raises(TypeError, match="floating"):
        plain.push(torch.zeros(4, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="idx"):
        plain.push(torch.zeros(2, 2, 3), idx=torch.tensor([0, 8]))
    bad = torch.zeros(5, 2, 3)
    bad[1, 0, 0] = float("nan")
    bad[3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="2 of 5 chains"):
        plain.push(bad)
    assert len(plain) == 0  # refused pushes store nothing
    classes = ReplayBuffer(8, (2,), n_classes=4)
    with pytest.raises(ValueError, match="outside"):
        classes.sample(2, y=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="y .* required"):
        classes.push(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        classes.sample(2, y=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        classes.sample(2, y=torch.tensor([0.0, 1.0]))

    def wrong(shape, *, device, dtype):
        return torch.zeros(3)

    with pytest.raises(ValueError, match="init must return"):
        ReplayBuffer(4, (2,), init=wrong).sample(2)


def test_len_repr_and_to():
    buffer = ReplayBuffer(10, (3,), storage="uint8", n_classes=2)
    buffer.push(torch.zeros(3, 3), y=torch.tensor([0, 0, 1]))
    assert len(buffer) == 3 and buffer.capacity == 10
    text = repr(buffer)
    for part in (
        "capacity=10",
        "sample_shape=(3,)",
        "storage=uint8",
        "n_classes=2",
        "policy=fifo",
        "filled=3/10",
    ):
        assert part in text
    assert buffer.to("cpu") is buffer and buffer.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_and_push_do_not_synchronise_on_cuda():
    buffer = ReplayBuffer(
        1000,
        (3, 8, 8),
        device="cuda",
        n_classes=10,
        storage="uint8",
        policy="reservoir",
        check_values=False,
    )
    y = torch.randint(0, 10, (64,), device="cuda")
    buffer.sample(64, y=y)  # compile the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, idx = buffer.sample(64, y=y)
        buffer.push(x, idx=idx)
        buffer.push(x, y=y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiles_with_fullgraph_and_matches_eager():
    def make():
        return ReplayBuffer(
            16, (2, 3), storage="uint8", n_classes=2, policy="reservoir", seed=5, check_values=False
        )

    def cycle(buffer, y):
        x, idx = buffer.sample(4, y=y)
        buffer.push(x * 0.5, idx=idx)
        buffer.push(x, y=y)
        return x

    eager, compiled_buffer = make(), make()
    compiled = torch.compile(cycle, fullgraph=True, backend="aot_eager")
    y = torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        assert torch.equal(cycle(eager, y), compiled(compiled_buffer, y))
    for key in ("storage", "written", "count", "draws"):
        assert torch.equal(eager.state_dict()[key], compiled_buffer.state_dict()[key])


def test_huge_finite_pushes_are_accepted():
    buffer = ReplayBuffer(4, (3,))
    buffer.push(torch.full((4, 3), 3e38))  # their sum overflows; every value is finite
    assert len(buffer) == 4


def test_float64_pushes_beyond_float32_range_are_refused():
    buffer = ReplayBuffer(4, (3,))
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1, 2] = 1e39  # finite in float64, inf once rounded to float32 for storage
    with pytest.raises(ValueError, match="1 of 2 chains"):
        buffer.push(x)
    assert len(buffer) == 0


def test_seed_reads_back_every_64_bit_value():
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        assert ReplayBuffer(4, (1,), seed=seed).seed == seed


def test_default_seed_is_drawn_from_torchs_global_generator():
    torch.manual_seed(11)
    a = ReplayBuffer(8, (3,))
    torch.manual_seed(11)
    b = ReplayBuffer(8, (3,))
    c = ReplayBuffer(8, (3,))
    assert a.seed == b.seed != c.seed
    assert torch.equal(a.sample(4)[0], b.sample(4)[0])
    assert not torch.equal(a.sample(4)[0], c.sample(4)[0])


def _filled_state(**kwargs):
    buffer = ReplayBuffer(8, (2,), seed=0, **kwargs)
    buffer.push(torch.zeros(3, 2))
    return buffer.state_dict()


@pytest.mark.parametrize(
    "policy, field, value, match",
    [
        ("fifo", "written", torch.full((8,), 7, dtype=torch.uint8), "0 and 1"),
        ("fifo", "count", torch.tensor([-1]), "count.*>= 0"),
        ("fifo", "count", torch.tensor([5]), "unwritten"),  # 5 appended, 3 slots written
        ("reservoir", "count", torch.tensor([2**46]), "2\\*\\*46"),
        ("fifo", "draws", torch.tensor(-1), "draws"),
        ("fifo", "draws", torch.tensor(2**32), "draws"),
    ],
)
def test_load_state_dict_refuses_counters_no_buffer_could_reach(policy, field, value, match):
    state = _filled_state(policy=policy)
    state[field] = value
    buffer = ReplayBuffer(8, (2,), seed=0, policy=policy)
    with pytest.raises(ValueError, match=match):
        buffer.load_state_dict(state)
    assert len(buffer) == 0 and int(buffer.state_dict()["count"][0]) == 0  # nothing loaded


def test_load_state_dict_accepts_every_reachable_count():
    buffer = ReplayBuffer(8, (2,), seed=0, policy="reservoir")
    state = _filled_state(policy="reservoir")
    state["written"] = torch.ones(8, dtype=torch.uint8)
    state["count"] = torch.tensor([2**46 - 1])  # a full reservoir that has seen many items
    buffer.load_state_dict(state)
    assert len(buffer) == 8


def _ones(shape, *, device, dtype):
    return torch.ones(shape, device=device, dtype=dtype)


@pytest.mark.parametrize(
    "change",
    [
        {"init": "gaussian"},
        {"init": _ones},
        {"reinit_prob": 0.1},
        {"stochastic_rounding": True},
        {"dtype": torch.float64},
        {"storage": "bfloat16"},
        {"policy": "reservoir"},
        {"n_classes": 2},
        {"init_range": (-2.0, 2.0)},
        {"rank": 1},
    ],
)
def test_load_state_dict_refuses_every_configuration_difference(change):
    state = _filled_state()
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"differently configured.*{name}"):
        ReplayBuffer(8, (2,), seed=0, **change).load_state_dict(state)


def test_load_state_dict_takes_the_saved_seed():
    saved = ReplayBuffer(8, (2,), seed=2**64 - 5)
    resumed = ReplayBuffer(8, (2,), seed=3)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.seed == 2**64 - 5
    assert torch.equal(saved.sample(4)[0], resumed.sample(4)[0])


def test_y_is_refused_on_a_buffer_without_classes_with_or_without_idx():
    plain = ReplayBuffer(8, (2,), seed=0)
    _, idx = plain.sample(2)
    for kwargs in ({"y": torch.tensor([0, 1])}, {"idx": idx, "y": torch.tensor([0, 1])}):
        with pytest.raises(ValueError, match="no classes"):
            plain.push(torch.zeros(2, 2), **kwargs)
    assert len(plain) == 0


def test_write_back_checks_y_against_the_slots_class():
    classes = ReplayBuffer(8, (2,), n_classes=4, seed=0)
    y = torch.tensor([3, 1, 1])
    _, idx = classes.sample(3, y=y)
    classes.push(torch.ones(3, 2), idx=idx, y=y)  # y may come along: it matches
    assert len(classes) == idx.unique().numel()
    with pytest.raises(ValueError, match="2 entries of y are not the class"):
        classes.push(torch.ones(3, 2), idx=idx, y=torch.tensor([3, 0, 2]))


def test_repr_of_a_meta_buffer():
    text = repr(ReplayBuffer(8, (3,), device="meta", seed=0))
    assert "device=meta" in text and "filled=?/8" in text


def test_len_and_n_written_count_written_slots_not_capacity():
    buffer = ReplayBuffer(10, (3,), n_classes=2, seed=0)
    assert len(buffer) == buffer.n_written == 0 and buffer.capacity == 10
    buffer.push(torch.zeros(3, 3), y=torch.tensor([0, 0, 1]))
    assert len(buffer) == buffer.n_written == 3 and buffer.slots_per_class == 5


def test_per_class_buffer_without_y_draws_uniformly_over_all_slots():
    buffer = ReplayBuffer(30, (1,), n_classes=3, seed=8)
    _, idx = buffer.sample(30000)
    assert stats.chisquare(torch.bincount(idx, minlength=30).numpy()).pvalue > P_MIN
    assert torch.equal(buffer.classes_of(idx), idx // 10)
    with pytest.raises(ValueError, match="classes"):
        ReplayBuffer(4, (1,), seed=0).classes_of(idx)


def test_return_reinit_marks_exactly_the_reinitialised_chains():
    # Stored values are 0; init noise lies in [1, 2): a chain is reinitialised iff x >= 1.
    buffer = ReplayBuffer(64, (3,), init_range=(1.0, 2.0), reinit_prob=0.2, seed=6)
    buffer.push(torch.zeros(32, 3))  # slots 0..31 written, 32..63 never
    x, idx, reinit = buffer.sample(4000, return_reinit=True)
    assert reinit.dtype == torch.bool and reinit.shape == (4000,)
    assert torch.equal(reinit, x[:, 0] >= 1.0)
    assert reinit[idx >= 32].all()  # never-written slots always give init noise
    written = idx < 32
    assert stats.binomtest(int(reinit[written].sum()), int(written.sum()), 0.2).pvalue > P_MIN


def test_from_tensor_loads_a_jem_style_unconditional_buffer():
    replay_buffer = torch.rand(20, 3, 4, 4) * 2 - 1  # JEM: init_random(buffer_size)
    buffer = ReplayBuffer.from_tensor(replay_buffer, reinit_prob=0.0, seed=0)
    assert buffer.capacity == len(buffer) == 20 and buffer.sample_shape == (3, 4, 4)
    x, idx = buffer.sample(50)
    assert torch.equal(x, replay_buffer[idx])


def test_from_tensor_takes_jems_per_class_layout_or_labels():
    per_class = torch.arange(12, dtype=torch.float32)[:, None]  # 3 classes of 4 rows, in blocks
    jem = ReplayBuffer.from_tensor(per_class, n_classes=3, reinit_prob=0.0, seed=0)
    y = torch.tensor([2, 0, 1, 2])
    x, idx = jem.sample(4, y=y)
    assert torch.equal(idx // 4, y) and torch.equal(x[:, 0], idx.float())

    labels = torch.tensor([1, 0, 1, 0])
    rows = torch.tensor([[10.0], [20.0], [11.0], [21.0]])
    labelled = ReplayBuffer.from_tensor(rows, labels, n_classes=2, capacity=6, seed=0)
    assert _stored(labelled)[:, 0].tolist() == [20.0, 21.0, 0.0, 10.0, 11.0, 0.0]  # in order
    assert len(labelled) == 4
    with pytest.raises(ValueError, match="n_classes"):
        ReplayBuffer.from_tensor(rows, labels)
    with pytest.raises(ValueError, match="equal"):
        ReplayBuffer.from_tensor(rows, n_classes=3)


def test_from_tensor_recipe_for_an_igebm_list_buffer_keeps_its_fifo_order():
    class IGEBMBuffer:  # IGEBM's replay buffer: a list ring with a head (baselines' layout)
        def __init__(self, size):
            self._storage, self._maxsize, self._next_idx = [], size, 0

        def add(self, ims):
            for im in ims:
                if self._next_idx >= len(self._storage):
                    self._storage.append(im)
                else:
                    self._storage[self._next_idx] = im
                self._next_idx = (self._next_idx + 1) % self._maxsize

    old = IGEBMBuffer(5)
    old.add(np.arange(7, dtype=np.float32)[:, None] / 10)  # 0.0 .. 0.6: 0.0, 0.1 replaced
    rows = old._storage[old._next_idx :] + old._storage[: old._next_idx]  # the docs' recipe
    buffer = ReplayBuffer.from_tensor(
        torch.from_numpy(np.stack(rows)).float(),
        capacity=old._maxsize,
        init_range=(0.0, 1.0),
        seed=0,
    )
    old.add(np.array([[0.9]], dtype=np.float32))
    buffer.push(torch.tensor([[0.9]]))
    assert sorted(_stored(buffer)[:, 0].tolist()) == sorted(float(r[0]) for r in old._storage)
