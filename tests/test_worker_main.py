"""The worker's entry point: how a process launched several to a node finds its own GPU."""

from __future__ import annotations

from node_image.worker.__main__ import pin_launcher_rank


def test_a_launcher_rank_pins_the_process_to_its_gpu_and_names_it() -> None:
    pinned = pin_launcher_rank({"LOCAL_RANK": "3", "BATCHCTL_NODE_NAME": "gpu-node-7"})
    assert pinned == {"CUDA_VISIBLE_DEVICES": "3", "BATCHCTL_NODE_NAME": "gpu-node-7-p3"}


def test_without_a_launcher_rank_nothing_changes() -> None:
    assert pin_launcher_rank({"BATCHCTL_NODE_NAME": "n"}) == {}
    assert pin_launcher_rank({"LOCAL_RANK": "not-a-number"}) == {}


def test_an_explicit_device_choice_wins_over_the_rank() -> None:
    assert pin_launcher_rank({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0"}) == {}
