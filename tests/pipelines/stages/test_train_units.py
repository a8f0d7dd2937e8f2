"""The pieces of the training stages that run without Ray: batches, per-video losses, RNG, CLI help."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from lofi.heads import HeadConfig, build_head, head_loss
from lofi.targets import make_targets
from pipelines.data.batches import (add_video_index, batch_targets, frames_tensor, index_videos, snippet_clips,
                               tal_batch_loss, video_labels_from_table, video_seed, video_slice)
from lofi_cli.commands import main as lofi_main
from pipelines.trainer import rng_state, seed_epoch, set_rng_state


def _clip_batch() -> dict[str, np.ndarray]:
    """Two rows of T=4 snippets (F=2) on a 10 s grid: snippet t spans [2.5 t, 2.5 (t + 1)) s."""
    times = np.array([[[2.5 * t + 0.625, 2.5 * t + 1.875] for t in range(4)]] * 2)  # frame times at sub-bin centres
    frames = np.zeros((2, 4, 2, 3, 3, 3), dtype=np.uint8)
    frames[:, :, :, 0, 0, 0] = np.arange(8).reshape(1, 4, 2)  # tag each snippet's frames with 2t, 2t + 1
    frames[1, :, :, 0, 0, 1] = 1  # and the row
    return {
        "frames": frames, "timestamps_sec": times, "num_valid_snippets": np.array([4, 3]),
        # row 0: class 2 over [0, 4] s holds centres 1.25 and 3.75; class 0 over [6, 9] s holds 6.25 and 8.75;
        # row 1: overlapping segments, class 1 first: centre 3.75 lies in both; snippet 3 is padding
        "segment_start_sec": np.array([np.array([0.0, 6.0]), np.array([3.0, 0.0])], dtype=object),
        "segment_end_sec": np.array([np.array([4.0, 9.0]), np.array([4.0, 5.0])], dtype=object),
        "segment_label_id": np.array([np.array([2, 0]), np.array([1, 0])], dtype=object),
    }


def test_snippet_clips_label_each_snippet_by_the_segment_holding_its_centre():
    out = snippet_clips(_clip_batch(), num_classes=3, background=True)
    # row 0: centres 1.25, 3.75, 6.25, 8.75 -> 2, 2, 0, 0; row 1: 1.25 -> 0 (only [0, 5]), 3.75 -> 1 (first), 6.25 -> bg
    assert out["label"].tolist() == [2, 2, 0, 0, 0, 1, 3]
    assert out["clip"].shape == (7, 2, 3, 3, 3) and out["clip"].dtype == np.uint8
    assert out["clip"][:, 0, 0, 0, 0].tolist() == [0, 2, 4, 6, 0, 2, 4]  # the clips are the snippets' frames
    assert out["clip"][:, 0, 0, 0, 1].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_snippet_clips_without_background_drop_snippets_outside_segments():
    out = snippet_clips(_clip_batch(), num_classes=3, background=False)
    assert out["label"].tolist() == [2, 2, 0, 0, 0, 1]
    empty = {**_clip_batch(), "num_valid_snippets": np.array([0, 0])}
    assert snippet_clips(empty, num_classes=3, background=False)["clip"].shape == (0, 2, 3, 3, 3)


def _label_table() -> pa.Table:
    return pa.table({
        "video_id": ["b", "a", "b"], "subset": ["validation", "training", "validation"],
        "duration_sec": [20.0, 10.0, 20.0],
        "segment_start_sec": [[5.0], [1.0, 6.0], [5.0]], "segment_end_sec": [[15.0], [4.0, 9.0], [15.0]],
        "segment_label": [["y"], ["x", "y"], ["y"]], "segment_label_id": [[1], [0, 1], [1]],
    })


def test_video_labels_index_sorted_ids_and_feed_make_targets():
    labels = video_labels_from_table(_label_table())  # the repeated row is a second chunk of video b
    index, by_index = index_videos(labels)
    assert index == {"a": 0, "b": 1}
    assert by_index[0].segments_sec == ((1.0, 4.0), (6.0, 9.0)) and by_index[1].labels == ("y",)
    batch = add_video_index(pa.table({"video_id": ["b", "a"], "x": [1, 2]}), index)
    assert batch.column("video_index").to_pylist() == [1, 0]
    head = HeadConfig(name="bmn")
    got = batch_targets([1, 0], by_index, num_snippets=10, head=head, num_classes=2)
    want = make_targets([(np.array([[5.0, 15.0]]), np.array([1]), 20.0),
                         (np.array([[1.0, 4.0], [6.0, 9.0]]), np.array([0, 1]), 10.0)], 10, 10, 2)
    for name in ("start", "end", "iou_map", "classes"):
        assert torch.equal(getattr(got, name), getattr(want, name))


def test_frames_tensor_checks_layout():
    frames = np.zeros((2, 3, 2, 4, 4, 3), dtype=np.uint8)
    assert frames_tensor({"frames": frames}).shape == (2, 3, 2, 4, 4, 3)
    assert frames_tensor({"frames": torch.from_numpy(frames)}).dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8 frames"):
        frames_tensor({"frames": frames.astype(np.float32)})


def _head_batch(num_videos: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = HeadConfig(name="bmn", hidden=16, num_sample=4)
    head = build_head(cfg, feature_dim=8, num_snippets=8, num_classes=3)
    features = torch.randn(num_videos, 8, 8)
    videos = [(np.array([[2.0 + i, 9.0 + i]]), np.array([i % 3]), 16.0) for i in range(num_videos)]
    return cfg, head, features, make_targets(videos, 8, 8, 3)


def test_tal_batch_loss_does_not_depend_on_how_the_batch_is_split():
    cfg, head, features, targets = _head_batch(4)
    seeds = [video_seed(7, 2, i) for i in range(4)]
    whole = tal_batch_loss(cfg, head(features), targets, seeds)
    halves = [tal_batch_loss(cfg, head(features[s]), video_slice_targets(targets, s), seeds[s])
              for s in (slice(0, 2), slice(2, 4))]
    for key, value in whole.items():
        assert torch.allclose(value, (halves[0][key] + halves[1][key]) / 2, rtol=1e-6), key
    # and it is the mean of each video's own loss under its own seed (computed here directly)
    direct = []
    for i in range(4):
        torch.manual_seed(seeds[i])
        direct.append(head_loss(cfg, video_slice(head(features), i), video_slice(targets, i))["total"])
    assert torch.allclose(whole["total"], torch.stack(direct).mean(), rtol=1e-6)


def video_slice_targets(targets, s: slice):
    return type(targets)(*(getattr(targets, n)[s] for n in ("start", "end", "iou_map", "classes")))


def test_tal_batch_loss_leaves_the_global_rng_alone():
    cfg, head, features, targets = _head_batch(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tal_batch_loss(cfg, head(features), targets, [1, 2])
    assert torch.equal(torch.rand(3), expected)


def test_video_seed_depends_on_seed_epoch_and_video_only():
    assert video_seed(0, 1, 5) == video_seed(0, 1, 5)
    assert len({video_seed(0, 1, 5), video_seed(1, 1, 5), video_seed(0, 2, 5), video_seed(0, 1, 6),
                video_seed(0, -1, 5)}) == 5


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    seed_epoch(3, 1, 0)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


@pytest.mark.parametrize("command", ["pretrain", "train", "train-head"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lofi_main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--config FILE", "--set KEY=VALUE", "run.name", "scaling.num_workers", "Config keys"):
        assert needle in text, needle


def test_missing_shards_is_one_clear_error(capsys, tmp_path):
    assert lofi_main(["train", "--set", f"run.storage={tmp_path}"]) == 2
    assert "data.shards is empty" in capsys.readouterr().err
    assert lofi_main(["pretrain", "--set", f"data.shards={tmp_path / 'nowhere'}"]) == 2
    assert "run `lofi prepare`" in capsys.readouterr().err
    assert lofi_main(["train-head", "--set", f"run.storage={tmp_path}"]) == 2
    assert "run `lofi extract`" in capsys.readouterr().err


def test_activation_memory_matches_a_direct_measurement_of_the_training_step():
    """The stage extrapolates from small probes; here one real step of TALModel is measured."""
    from lofi.fidelity import FidelityLevel
    from lofi.memory import measure_step, synthetic_targets
    from lofi.models.encoders import EncoderConfig, build_encoder
    from pipelines.config import PipelineConfig
    from lofi.memory_plan import saved_bytes_by_level
    from lofi.models.encoders import TALModel

    cfg = PipelineConfig(encoder=EncoderConfig(width=8, freeze_bn=True),
                         head=HeadConfig(name="bmn", hidden=16, num_sample=4))
    predicted = max(saved_bytes_by_level(cfg.stage2_encoder(), cfg.head, (FidelityLevel("lo", 4, 2, 32),
                                         FidelityLevel("tiny", 2, 2, 16)), num_classes=6, batch_size=3,
                                         head_snippets=8).values())
    encoder = build_encoder(cfg.encoder)
    model = TALModel(encoder, build_head(cfg.head, encoder.feature_dim, 8, 6), head_snippets=8).train()
    targets = synthetic_targets(3, 8, 8, 6)

    def step():
        frames = torch.randint(0, 256, (3, 4, 2, 32, 32, 3), dtype=torch.uint8)  # the costlier level
        return head_loss(cfg.head, model(frames), targets)["total"]

    measured = measure_step(step, [*model.parameters(), *model.buffers()]).saved_bytes
    assert predicted == pytest.approx(measured, rel=0.01)


class _FakeContext:
    """What TrainLoop.epoch_batches uses of a WorkerContext: the config and the dataset splits."""

    def __init__(self, cfg):
        self.cfg, self.opened = cfg, []

    def batches(self, name, epoch, train):
        self.opened.append(name)
        return iter([f"{name}#{i}" for i in range(5)])


@pytest.mark.parametrize("cycle", ["epoch", "batches"])
def test_train_batches_follow_the_fidelity_schedule(cycle):
    from lofi.fidelity import FidelitySchedule, FidelityScheduleConfig
    from pipelines.config import PipelineConfig
    from pipelines.stages.train import TrainLoop, TrainLoopConfig

    cfg = PipelineConfig(fidelity=FidelityScheduleConfig(kind="c_lofi", cycle=cycle, every_batches=2))
    loop = TrainLoop(TrainLoopConfig({}, ("a",), 8, None, {}))
    loop.schedule = FidelitySchedule(cfg.fidelity)
    ctx = _FakeContext(cfg)
    got = [(level.name, batch) for level, batch in loop.epoch_batches(ctx, epoch=1, global_batch=7)]
    if cycle == "epoch":  # epoch 1 of S -> T -> ST: every batch at T-LoFi, only its shards read
        assert got == [("t_lofi", f"train/t_lofi#{i}") for i in range(5)] and ctx.opened == ["train/t_lofi"]
    else:
        # global batches 7, 8.. are in 2-batch slots 3, 4, 4, 5, 5, 6, ...: S, T, T, ST, ST, S, S, ... Each level's
        # 5 batches are read once, in order, only at its turns; at global batch 21 T's pass is done, so its
        # turn goes to ST (slot 10 -> the next level), whose last batch ends the epoch: 3 x 5 steps.
        s, t, st = ([(name, f"train/{name}#{i}") for i in range(5)] for name in ("s_lofi", "t_lofi", "st_lofi"))
        assert got == [s[0], t[0], t[1], st[0], st[1], s[1], s[2], t[2], t[3], st[2], st[3], s[3], s[4], t[4], st[4]]
        assert sorted(ctx.opened) == ["train/s_lofi", "train/st_lofi", "train/t_lofi"]
    assert loop.epoch_level.name == got[-1][0]  # validation reports the level the epoch ended with


def test_stage2_resampling_keeps_snippet_centres_aligned():
    """A level with T=16 resampled to the head's T=32: a feature equal to its snippet's centre time
    must land on the centre time of the head's snippet (both grids cover the whole video)."""
    from lofi.models.encoders import TALModel

    duration = 37.3
    def centres(t: int) -> torch.Tensor:
        return (torch.arange(t, dtype=torch.float64) + 0.5) * duration / t

    model = TALModel(lambda frames: centres(16)[None, None, :], lambda features: features, head_snippets=32)
    out = model(torch.zeros(1))[0, 0]  # (32,)
    inner = slice(1, 31)  # the outermost half snippets lie beyond the coarse grid's first/last centre
    assert torch.allclose(out[inner], centres(32)[inner], atol=1e-9)
    model = TALModel(lambda frames: centres(24)[None, None, :], lambda features: features, head_snippets=32)
    out = model(torch.zeros(1))[0, 0]
    assert torch.allclose(out[2:30], centres(32)[2:30], atol=1e-9)
