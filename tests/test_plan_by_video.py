"""The deployed run's plan by video length: validation tallies the manifest's duration_s
column (over Azurite, through the controller's own activity), and the plan activity hands it
to the backend, which plans segments, not items."""

from __future__ import annotations

import pytest

from batchctl import controller
from batchctl.contracts import RunOptions, RunRequest, RunState
from batchctl.services import Services

pytestmark = pytest.mark.azurite


def test_validation_tallies_durations_and_the_plan_spreads_segments(
    services: Services, run_id: str
) -> None:
    settings = services.settings

    def url(name: str) -> str:  # a blob of this account: the policy allows it unread
        return services.store.url(settings.media_container, name)

    rows = ["id,video,duration_s", f"long,{url('long.mp4')},1000"]
    rows += [f"s{index},{url(f's{index}.mp4')},20" for index in range(2)]
    services.store.ensure_containers(settings.manifests_container, settings.runs_container)
    services.store.upload_bytes(
        settings.manifests_container, f"{run_id}.csv", ("\n".join(rows) + "\n").encode()
    )
    options = RunOptions(segment_seconds=300, sec_per_video_s=0.5, mini_batch_size=1)
    request = RunRequest(run_id=run_id, manifest=f"{run_id}.csv", options=options)
    summary = controller.validate_manifest(services, request)
    assert summary.fatal is None and summary.valid == 3
    assert summary.media is not None
    # 1000 s in 300 s segments: 4 pieces (the last 100 s); the two short videos one each.
    assert (summary.media.pieces, summary.media.longest_piece_s) == (6, 300)
    assert summary.media.media_s == pytest.approx(1040)
    state = RunState(run_id=run_id, request=request, summary=summary)
    plan = controller.plan_run(services, state)
    # Three items, but six pieces: the session's two local nodes both work.
    assert plan.total_nodes == 2
