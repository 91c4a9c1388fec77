"""The progress bar at the end of training's and prepare_data's log lines."""

from __future__ import annotations

import pytest

from pipelines.common import progress


@pytest.mark.parametrize(
    ("done", "total", "per_item", "expected"),
    [
        (0, 200, 0.5, "[--------------------]   0% eta 0:01:40"),
        (60, 200, 0.53, "[######--------------]  30% eta 0:01:14"),
        (200, 200, 1.0, "[####################] 100% eta 0:00:00"),
        (7, 7000, 3.1, "[--------------------]   0% eta 6:01:18"),
        (250, 200, 1.0, "[####################] 100% eta 0:00:00"),  # resumed past the end
        (0, 0, 1.0, "[####################] 100% eta 0:00:00"),  # nothing to do
    ],
)
def test_bar_percent_and_eta(done: int, total: int, per_item: float, expected: str) -> None:
    assert progress(done, total, per_item) == expected
