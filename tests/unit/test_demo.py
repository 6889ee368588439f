import io
import time

import pytest

from jobs.demo import Terminal, progress

pytestmark = pytest.mark.unit


def test_the_progress_bar_in_a_log_file_is_redrawn_only_when_the_count_moves():
    stream = io.StringIO()  # not a terminal: each redraw is one more "line" of a log
    epochs = [0]

    with progress(Terminal(stream), "train", 3, lambda: epochs[0]):
        time.sleep(2.5)  # two polls (once a second) at 0 epochs
        epochs[0] = 1
        time.sleep(2.5)  # two at 1
        epochs[0] = 3
    draws = [d.split("|")[0].strip() for d in stream.getvalue().split("\r") if d.strip()]
    # Drawn when opened, once at 1 epoch (not once a poll), and at 3 when it closes.
    assert draws == ["train:   0%", "train:  33%", "train: 100%"], stream.getvalue()
