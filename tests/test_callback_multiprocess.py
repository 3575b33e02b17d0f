"""ElaPruningCallback under a real 2-process Accelerate/DDP run on CPU (tests/pruning_ddp_run.py)."""
import json

import pytest
from two_ranks import launch_two_ranks


@pytest.mark.slow
def test_two_processes_reduce_decide_once_and_end_with_identical_masks(tmp_path):
    r0, r1 = launch_two_ranks("pruning_ddp_run.py", tmp_path)

    # really two processes, under DDP, each with its own shard of the data
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] and r1["ddp"]
    assert r0["seen_indices"] and r1["seen_indices"]
    assert not set(r0["seen_indices"]) & set(r1["seen_indices"])

    # one decision, broadcast: identical history and mask everywhere; each window skipped a layer
    assert r0["history"] == r1["history"]
    assert r0["mask"] == r1["mask"] == r0["history"][-1]["skip_mask"]
    assert [h["window"] for h in r0["history"]] == [1, 2]
    assert sum(map(sum, r0["mask"])) == 2
    history = r0["history"]
    assert json.loads((tmp_path / "a" / "pruning_history.json").read_text())["decisions"] == history

    for k, h in enumerate(history):
        local0, local1 = r0["local_at_decisions"][k], r1["local_at_decisions"][k]
        for rank_result, local in ((r0, local0), (r1, local1)):
            # each rank's totals are exactly what its layers recorded (DDP's buffer broadcast did not
            # overwrite them): 2 steps x 2 micro-batches x 2 images, evaluation not counted
            tally = rank_result["tally_at_decisions"][k]
            for n, e in enumerate(h["layers"]):
                assert local[1][n] == tally[e["name"]][1] == 8
                assert local[0][n] == pytest.approx(tally[e["name"]][0], rel=1e-6)
        assert local0[0] != local1[0]  # different data, different statistics
        for n, e in enumerate(h["layers"]):
            assert e["samples"] == 16  # summed over both processes
            expected = (local0[0][n] + local1[0][n]) / (local0[1][n] + local1[1][n])
            assert e["d_t"] == pytest.approx(expected, rel=1e-9)

    # checkpoint-5 lies inside window 2: its state holds the partial sums of both ranks
    state = json.loads((tmp_path / "a" / "checkpoint-5" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["SpyingPruningCallback"]["attributes"]
    assert saved["partial_window"] == 1 and saved["windows_done"] == 1
    # (step 2's snapshot: the evaluation inside window 1 is a point where a "best" checkpoint may follow)
    assert sorted(r0["local_at_snapshots"]) == sorted(r1["local_at_snapshots"]) == ["2", "5"]
    snap0, snap1 = r0["local_at_snapshots"]["5"], r1["local_at_snapshots"]["5"]
    for n, e in enumerate(saved["partial_kl"]):
        assert e["count"] == snap0[1][n] + snap1[1][n] == 8
        assert e["sum"] == pytest.approx(snap0[0][n] + snap1[0][n], rel=1e-9)

    # resuming both processes from it ends with the same mask and decisions
    for r in (r0, r1):
        assert r["resumed_mask"] == r0["mask"]
        assert [h["window"] for h in r["resumed_history"]] == [1, 2]
        assert r["resumed_history"][0] == history[0]
        for la, lb in zip(history[1]["layers"], r["resumed_history"][1]["layers"]):
            assert (la["name"], la["skip"], la["samples"]) == (lb["name"], lb["skip"], lb["samples"])
            assert la["d_t"] == pytest.approx(lb["d_t"], rel=1e-5)

    # the same decision on every rank: the callback's warnings are said once, by rank 0, not once per GPU
    assert r0["warnings_said"] == [1, 1] and r1["warnings_said"] == [0, 0]

    # ddp_find_unused_parameters=False cannot work once layers are skipped: refused under DDP
    assert r0["ddp_check_raised"] and r1["ddp_check_raised"]
    # with activation checkpointing the Trainer would turn the search off: refused up front on every rank,
    # and with ddp_find_unused_parameters=True a checkpointed DDP run trains through a skip
    for r in (r0, r1):
        assert "with activation checkpointing" in r["gc_default_error"]
        assert r["gc_ddp"] and r["gc_mask"] is not None and sum(map(sum, r["gc_mask"])) == 1
    assert r0["gc_mask"] == r1["gc_mask"]
    # two forward passes per step (DDP broadcasts rank 0's buffers before each): every rank's totals are
    # still exactly what its own layers recorded, 2 steps x 2 passes x 2 images
    assert r0["two_forwards_history"] == r1["two_forwards_history"]
    for r in (r0, r1):
        (local,), (tally,) = r["two_forwards_local"], r["two_forwards_tally"]
        for n, e in enumerate(r["two_forwards_history"][0]["layers"]):
            assert local[1][n] == tally[e["name"]][1] == 8
            assert local[0][n] == pytest.approx(tally[e["name"]][0], rel=1e-6)
    assert r0["two_forwards_local"] != r1["two_forwards_local"]
    # save_pretrained called on every rank over an earlier save: the weights are still there
    assert "model.safetensors" in r0["shared_files"] and "config.json" in r0["shared_files"]
