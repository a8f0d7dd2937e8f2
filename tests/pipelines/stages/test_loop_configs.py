"""The stages' loop configs cross the Ray boundary as plain data and come back equal."""

from __future__ import annotations

from lofi.fidelity import FidelityLevel
from pipelines.data.batches import VideoLabel
from pipelines.data.feature_windows import Window
from pipelines.stages.pretrain import PretrainLoopConfig
from pipelines.stages.train import TrainLoopConfig
from pipelines.stages.train_head import HeadLoopConfig

VIDEO = VideoLabel("v1", "training", 30.0, ((1.0, 4.5),), (2,), ("grow",))
OTHER = VideoLabel("v2", "validation", 24.0, (), (), ())


def plain(value) -> bool:
    """Only what any process can rebuild without our classes: dicts, lists, tuples, scalars."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_stage2_loop_config_round_trips():
    loop = TrainLoopConfig({0: VIDEO, 7: OTHER}, ("bounce", "grow", "shrink"), 32,
                           FidelityLevel("full", 32, 4, 64), {"s_lofi": 123, "full": 456})
    data = loop.to_dict()
    assert plain(data)
    assert TrainLoopConfig.from_dict(data) == loop and loop.num_classes == 3
    no_val = TrainLoopConfig({0: VIDEO}, ("grow",), 8, None, {})
    assert TrainLoopConfig.from_dict(no_val.to_dict()) == no_val


def test_head_loop_config_round_trips_with_and_without_windows():
    whole = HeadLoopConfig({0: VIDEO}, ("grow",), 32, 128, True)
    windows = HeadLoopConfig({3: VIDEO}, ("grow",), 16, 128, True, windowed=True, videos=(OTHER,),
                             windows={3: Window("v2", 16, 4.0, 8.0)})
    for loop in (whole, windows):
        assert plain(loop.to_dict()) and HeadLoopConfig.from_dict(loop.to_dict()) == loop
    assert not whole.windowed and windows.windowed


def test_stage1_loop_config_round_trips():
    for weights in (None, (0.5, 1.5)):
        loop = PretrainLoopConfig(("a", "b"), {"val": "val_"}, weights)
        assert plain(loop.to_dict()) and PretrainLoopConfig.from_dict(loop.to_dict()) == loop
