"""A new version goes live under load on a busy box: four clients call without pause, a
neighbour process spins on the CPU, and the version is pushed like TFX's Pusher does it
(saved_model.pb last). Zero failed requests and both versions answering are asserted; how long
the new version took to go live is a measurement, printed (run with -s), not asserted.
"""

from __future__ import annotations

import os

from serving import testing
from serving.loadtest import measure_swap

SIGNATURES = ("predict_images", "predict_1", "predict_2")


def test_new_version_goes_live_under_load_with_a_busy_neighbour(tmp_path):
    # A model that, like the pipeline's export, takes seconds to restore and warm up.
    model_dir = testing.export(testing.build_heavy_model(steps=300), str(tmp_path), 1)
    image = testing.encode_image((200, 30, 90), size=32, fmt="JPEG")
    testing.write_warmup(model_dir, [image], signatures=SIGNATURES)
    report = measure_swap(model_dir, image, neighbours=1, clients=4)
    print(
        f"\nversion 2 live {report.live_after_seconds:.1f} s after its saved_model.pb "
        f"(4 clients, 1 busy neighbour, load average {os.getloadavg()[0]:.1f}); "
        f"{report.summary()}; answers by version {report.versions_seen}"
    )
    assert report.errors == 0, report.error_examples
    assert report.swapped_to == 2
    assert set(report.versions_seen) == {1, 2}  # the old version answered, then the new one
    assert report.live_after_seconds is not None
