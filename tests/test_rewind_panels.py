"""The Rewind view's text panels (issue 10 B.3): the layers × heads mask of a plan and the per-layer bars,
drawn as characters with integer axes — no bar at 0, no merged layers, no axis past the head count."""

from __future__ import annotations

from diffract_tui.views.rewind import bars_text, index_header, mask_text, tick_step


def test_bars_one_line_per_layer_zero_has_no_bar_and_full_is_all_heads() -> None:
    lines = bars_text((0, 4, 1, 0), heads=4, width=40, color=False).plain.splitlines()
    assert [l.split()[0] for l in lines[:4]] == ["L0", "L1", "L2", "L3"]   # adjacent layers stay apart
    assert "█" not in lines[0] and lines[0].rstrip().endswith("0/4")
    assert "█" not in lines[3]
    full, one = lines[1].count("█"), lines[2].count("█")
    assert full == 31 and one == round(full / 4)                        # scale: all 4 heads = the full bar
    assert max(len(l) for l in lines) <= 40
    assert lines[4].strip() == "└ heads rewound of 4 per layer"


def test_mask_rows_are_layers_with_integer_head_axis_and_kv_marked() -> None:
    lines = mask_text(2, 4, {(0, 0): True, (1, 2): False}, width=30, height=12, color=False).plain.splitlines()
    assert lines[0] == "   0 1 2 3"
    assert lines[1].split() == ["L0", "◆", "·", "·", "·"]
    assert lines[2].split() == ["L1", "·", "·", "■", "·"]


def test_mask_of_a_deep_model_turns_to_fit_80_columns() -> None:
    rewound = {(29, 8): False, (0, 0): True}
    lines = mask_text(30, 9, rewound, width=40, height=14, color=False).plain.splitlines()
    assert lines[0].split() == ["0", "5", "10", "15", "20", "25"]          # integer layer ticks, every 5
    assert len(lines) == 1 + 9 + 1                                         # rows = the 9 heads
    assert lines[1].startswith("h0  ◆") and lines[9].startswith("h8") and lines[9].rstrip().endswith("■")
    assert max(len(l) for l in lines[:-1]) <= 40


def test_tick_steps_never_let_labels_touch() -> None:
    assert tick_step(4, 2) == 1 and tick_step(12, 2) == 2 and tick_step(30, 1) == 5 and tick_step(128, 1) == 5
    header = index_header(128, 1, 4)
    assert all(part.isdigit() for part in header.split())
