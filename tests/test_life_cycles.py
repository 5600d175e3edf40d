"""Life cycles and layer groups: the reference's registry scenario (even layers windowed with
sinks, odd layers full), its stale-range arithmetic checked against a brute-force definition,
and the validation of per-layer attention."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvjax.cache.life_cycles import (
    LayerAttention,
    LayerGroups,
    LifeCycle,
    usable_prefix,
    windows_by_layer,
)

TPB = 4


def reference_layers(num_layers=6, window=8, sink_tokens=2):
    """The reference's `create_config`: even layers windowed with sinks, odd layers full."""
    return [
        LayerAttention(window, sink_tokens) if layer % 2 == 0 else LayerAttention()
        for layer in range(num_layers)
    ]


def test_even_windowed_odd_full_layers_form_two_groups():
    groups = LayerGroups(reference_layers(), TPB, max_seq_len=64)
    assert len(groups) == 2 and not groups.is_uniform
    assert groups.group_of_layer == [0, 1, 0, 1, 0, 1]
    assert groups.layers_of(0) == [0, 2, 4] and groups.layers_of(1) == [1, 3, 5]
    assert groups.life_cycles == [LifeCycle(8, 1), LifeCycle(None, 0)]
    assert "8/1 sink blocks: 3 layers" in repr(groups)


def test_windows_reaching_max_seq_len_are_full_attention():
    layers = [LayerAttention(64, 4), LayerAttention(), LayerAttention(100)]
    groups = LayerGroups(layers, TPB, max_seq_len=64)
    assert groups.is_uniform and groups.layers == (LayerAttention(),) * 3
    assert not LayerGroups([LayerAttention(63)], TPB, max_seq_len=64).is_uniform


def test_sinks_count_in_whole_blocks():
    # 5 sink tokens cover two 4-token blocks; 4 and 5 sink tokens are different life cycles.
    groups = LayerGroups([LayerAttention(16, 5), LayerAttention(16, 4)], TPB, 64)
    assert groups.life_cycles == [LifeCycle(16, 2), LifeCycle(16, 1)]


@pytest.mark.parametrize(
    ("history", "expected"),
    [(0, (0, 0)), (4, (1, 1)), (12, (1, 1)), (15, (1, 2)), (16, (1, 2)), (19, (1, 3))],
)
def test_stale_range_keeps_the_in_flight_tokens_window_whole(history, expected):
    """Window 8, one sink block: at h = 16 the token in flight sees positions 9..16, so block 2
    (8..11) is still live; at h = 19 it sees 12..19 and block 2 goes stale."""
    assert LifeCycle(8, 1).stale_range(history, TPB) == expected


@given(
    history=st.integers(0, 200),
    window=st.integers(1, 60),
    sink_blocks=st.integers(0, 5),
    tpb=st.integers(1, 9),
)
def test_stale_range_is_exactly_the_blocks_nothing_reads(history, window, sink_blocks, tpb):
    cycle = LifeCycle(window, sink_blocks)
    start, end = cycle.stale_range(history, tpb)
    num_blocks = -(-history // tpb)
    first_visible = history + 1 - window  # the in-flight token at `history` sees from here
    stale = [
        block
        for block in range(num_blocks)
        if block >= sink_blocks and (block + 1) * tpb <= first_visible
    ]
    assert list(range(start, end)) == stale
    # What a windowed group keeps is bounded by the sinks and the window, whatever the history.
    kept = min(num_blocks, sink_blocks) + len(cycle.needed_blocks(history, tpb))
    assert kept <= sink_blocks + -(-window // tpb) + 1


@given(history=st.integers(0, 200), sink_blocks=st.integers(0, 5))
def test_full_attention_never_goes_stale(history, sink_blocks):
    start, end = LifeCycle(None, 0).stale_range(history, TPB)
    assert start == end


def test_bad_layer_attention_is_refused_with_the_value():
    with pytest.raises(ValueError, match="sink_tokens=4 needs a window"):
        LayerAttention(None, 4)
    with pytest.raises(ValueError, match="window=0"):
        LayerAttention(0)
    with pytest.raises(ValueError, match="sink_tokens=-1"):
        LayerAttention(8, -1)
    with pytest.raises(ValueError, match="layer 1: 8 is not a LayerAttention"):
        LayerGroups([LayerAttention(), 8], TPB, 64)
    with pytest.raises(ValueError, match="at least one layer"):
        LayerGroups([], TPB, 64)


def test_windows_cycle_over_layers_as_tensorrt_llm_does():
    layers = windows_by_layer(5, [16, 16, None], sink_tokens=2)
    assert layers == [
        LayerAttention(16, 2), LayerAttention(16, 2), LayerAttention(),
        LayerAttention(16, 2), LayerAttention(16, 2),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="at least one window"):
        windows_by_layer(2, [])


def _reads_only_present(end, present, cycle, tpb):
    num_blocks = -(-end // tpb)
    _, stale_end = cycle.stale_range(end, tpb)
    needed = set(range(min(num_blocks, cycle.num_sink_blocks))) | set(range(stale_end, num_blocks))
    return all(present[ordinal] for ordinal in needed)


@given(
    present=st.lists(st.booleans(), min_size=1, max_size=20),
    cut=st.integers(0, 3),
    window=st.integers(1, 30),
    sink_blocks=st.integers(0, 3),
    tpb=st.integers(1, 6),
)
def test_usable_prefix_is_the_longest_match_end_reading_no_missing_page(
    present, cut, window, sink_blocks, tpb
):
    cycle = LifeCycle(window, sink_blocks)
    num_tokens = max(1, len(present) * tpb - min(cut, tpb - 1))  # may end mid-block
    pages = [object() if here else None for here in present]
    num_blocks, end = usable_prefix(pages, num_tokens, cycle, tpb)
    candidates = [num_tokens] + [
        k * tpb for k in range(len(present), -1, -1) if k * tpb < num_tokens
    ]
    expected = next(e for e in candidates if e == 0 or _reads_only_present(e, present, cycle, tpb))
    assert (num_blocks, end) == (-(-expected // tpb), expected)


def test_usable_prefix_keeps_a_match_whose_missing_pages_are_stale():
    cycle = LifeCycle(8, 1)
    pages = ["sink", None, None, "a", "b", "c"]  # blocks 1, 2 evicted
    assert usable_prefix(pages, 24, cycle, TPB) == (6, 24)  # needs blocks 0 and 4.. only
    assert usable_prefix(pages, 15, cycle, TPB) == (1, 4)  # would read block 2: back to 1 block
    assert usable_prefix([None, "a", "b"], 12, cycle, TPB) == (0, 0)  # the sink is gone
