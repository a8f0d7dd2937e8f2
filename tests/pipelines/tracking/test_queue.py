"""The offline queue: an unreachable or cut-off server never stops training, and what was queued
during an outage arrives in order when the server answers again (pipelines/tracking/queue.py).
Against real servers on loopback (conftest.py), a real refused port and a real silent one."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

from pipelines import plots
from pipelines.tracking import Tracker, TrackingConfig, TrackingWarning


@pytest.mark.slow
def test_unreachable_server_does_not_stop_training(tmp_path, dead_uri, stage_config):
    cfg = TrackingConfig(tracking_uri=dead_uri, retries=2, timeout_sec=1.0, register_model_as="m")
    import mlflow  # noqa: F401  (seconds on a busy machine; not what is measured here)

    model = torch.nn.Linear(4, 2)
    started = time.monotonic()
    with pytest.warns(TrackingWarning) as caught:
        with Tracker.start(cfg, "pipeline") as parent, parent.child("train") as run:
            run.log_config(stage_config)
            for epoch in range(20):
                run.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
                torch.save(model.state_dict(), tmp_path / f"epoch{epoch}.pt")  # the stage's own checkpoint
            run.log_figure(plots.training_curves({"loss": [1.0]}), "plots/curves.png")
            run.log_dict({"v": 1}, "predictions.json")
            run.log_torch_model(model, "encoder", input_example=torch.zeros(1, 4))
    elapsed = time.monotonic() - started
    # MLflow's two retries (0 s, then 2 s apart) when the parent starts and ends; the child, whose parent
    # is offline, asks the server once each time (a refused connection); queued calls cost nothing.
    assert elapsed < 15, f"tracking calls blocked training for {elapsed:.1f} s"
    assert len(list(tmp_path.glob("epoch*.pt"))) == 20 and parent.run_id is None and run.run_id is None
    messages = [str(w.message) for w in caught]
    assert any("cannot reach http://127.0.0.1" in m and "training goes on" in m for m in messages)
    # create, the params (one call: MLflow splits them), config.yaml, 20 epochs, figure, JSON, model, end
    assert any("(train)" in m and "27 call(s) were never sent" in m for m in messages)


@pytest.mark.slow
def test_an_offline_try_costs_one_short_request_not_the_retries(monkeypatch):
    """A server that accepts connections and never answers (a hung server, a half-open network)."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test; a tracker sets them for its process
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accepts: the kernel queues connections
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    cfg = TrackingConfig(tracking_uri=uri, retries=1, timeout_sec=1.0, offline_retry_sec=0.0)
    import mlflow  # noqa: F401  (not what is measured here)

    try:
        with pytest.warns(TrackingWarning) as caught:
            started = time.monotonic()
            run = Tracker.start(cfg, "train")  # one request and MLflow's one retry time out: offline
            went_offline = time.monotonic() - started
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
            tries = []
            for step in range(3):
                started = time.monotonic()
                run.log_metrics({"loss": 1.0}, step=step)  # offline_retry_sec=0: each call tries again
                tries.append(time.monotonic() - started)
            run.end()
    finally:
        silent.close()
    assert 1.9 < went_offline < 5, went_offline
    assert all(t < 1.8 for t in tries), f"an offline try waited {max(tries):.1f} s, more than one request"
    messages = [str(w.message) for w in caught]
    assert sum("cannot reach" in m for m in messages) == 1  # said once per outage
    assert any("5 call(s) were never sent" in m and "the run was never created" in m for m in messages)


class Relay:
    """A loopback TCP relay to the server that can be cut: a network outage, staged for real."""

    def __init__(self, target_port: int):
        self.port, self.target_port = 0, target_port
        self._sockets: list[socket.socket] = []
        self.up()
        self.port = self._listener.getsockname()[1]  # the same port when it comes back up

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)  # accept() wakes up to notice that down() closed it
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by down()
                return
            conn.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()


@pytest.mark.slow
def test_outage_is_queued_and_sent_when_the_server_answers_again(server_uri, runs_by_name):
    relay = Relay(int(server_uri.rsplit(":", 1)[1]))
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{relay.port}", experiment="outage", retries=1, offline_retry_sec=0.0)
    try:
        with Tracker.start(cfg, "train") as run:
            run.log_metrics({"loss": 0.0}, step=0)
            relay.down()
            with pytest.warns(TrackingWarning, match="cannot reach"):
                for step in range(1, 5):
                    run.log_metrics({"loss": float(step)}, step=step)
            relay.up()
            run.log_metrics({"loss": 5.0}, step=5)  # sends the queue first, in order
    finally:
        relay.down()
    from mlflow import MlflowClient

    history = MlflowClient(server_uri).get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(6)]
    assert runs_by_name(server_uri, "outage")["train"].info.status == "FINISHED"
