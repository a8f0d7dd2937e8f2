"""The one Ray Train harness of the training stages: `lofi pretrain`, `lofi train`, `lofi train-head`.

A stage supplies a `StageLoop` (its model, what a batch and its loss are, how it validates)
and the harness does the rest, the same way for all three.

Driver (`fit`): one Ray Train V2 `TorchTrainer` with `ScalingConfig(num_workers, use_gpu)`,
`RunConfig(name=<stage>, storage_path=<run>/ray)`, `FailureConfig(run.max_failures)`,
`CheckpointConfig(num_to_keep=run.keep_checkpoints)` and the stage's Ray Datasets. Datasets
named "train..." are streamed and split equally over the workers by Ray's own
`DataConfig.configure` (`streaming_split(equal=True)`: DDP needs every worker to take the same
number of steps; a remainder row is dropped); the subclass splits the others (validation)
without dropping rows. Ray Data runs with preserve_order, so each worker's rows come in a
fixed order. Datasets within
`data.cache_max_mib` are read on the driver with pyarrow, with the same batch functions, and
handed over as in-memory Ray Datasets (`table_dataset`): epochs then skip the shards.

Worker (`worker_loop`), per epoch: seed, train (DDP from `prepare_model`: gloo on CPU, nccl
on GPU; a GradScaler for fp16 autocast; optional gradient clipping), validate on the
unwrapped model, step the StepLR scheduler, then `ray.train.report(metrics, checkpoint)`:
every epoch and always with a checkpoint, so `Result.metrics` is never None.

Input: every epoch reports `data_wait_sec`, the time the loop spent blocked in the stage's
batch iterator (Ray Data's `iter_torch_batches` of the shard datasets, the first batch's start of
the streaming execution included), and `data_wait_share`, that over the epoch's training time,
both of the worker that waited most (DDP steps at the slowest worker's pace), with each worker's
share as `data_wait_share_rank<r>` when there are several; and `rows_read_<dataset>` (summed
over workers; "train/<level>" counts as <level>): the rows taken from each training dataset, the
check that nothing is read that is not trained on. The progress line shows the share.

Batch size and learning rate: `batch_size` is global; a worker takes batch_size / num_workers
rows per step and DDP averages the gradients, so a step's gradient is the global batch's and
the learning rate is used as configured for any number of workers.

Checkpoints (`<run>/ray/<stage>/epoch-NNNN/`): rank 0 writes `state.pt` (model, optimizer,
scheduler, grad scaler, epoch, global batch counter, the stage's own state such as the
fidelity schedule, and `history`: every finished epoch's metrics, which `epoch_history` reads,
so pruned checkpoints lose none); each rank writes `rng-rank<r>.pt` (torch, CUDA, numpy, python RNG states);
Ray merges them. The unit of resumption is the epoch: a restarted worker group (a worker died;
up to run.max_failures times) or a rerun with the same run.name and run.storage continues
after the last reported epoch (Train V2 finds the run's checkpoints by name in its storage).

Determinism: the model is built from run.seed on every rank (the same initial weights in every
run); each epoch starts from seeds derived from (run.seed, epoch, rank); row order is fixed
(preserve_order; the shuffle buffer is seeded with run.seed + epoch); random choices inside a
TAL loss are seeded per video (`batches.video_seed`), whatever worker or batch the video lands
in; run.deterministic turns on torch.use_deterministic_algorithms (warn_only). So a resumed run
replays an uninterrupted one on the same number of workers. Across worker counts the results
agree (to float rounding) when each step's global batch holds the same videos, as with one
step per epoch or no shuffling: which rows a worker gets from Ray Data's split is not fixed.
Kernels without a deterministic version still vary on CUDA (G-TAD's sparse ops; warn_only
warns). The RNG states are saved as well, as a record and for code that draws outside the
epoch seeds.

Tracking: the stage's MLflow run is opened on the driver (so it exists, and ends FAILED or
KILLED, whatever the workers do) and handed to `fit(..., tracker=)`, which passes its id and the
tracking URI resolved on the driver to the workers. The rank-0 worker attaches to that run
(`Tracker.attach`: it never creates or ends it) and logs each epoch's numeric metrics at
step = epoch right after validation, so a long run can be watched in MLflow as it trains; with
psutil installed it also runs MLflow's system/* metrics sampler on its machine. Other ranks
never import MLflow. An unreachable server never stops training (pipelines.tracking). A restarted
worker group attaches again and logs from the epoch it resumes at; an epoch cut off between its
log and its checkpoint is logged again (the same step and values). After training, `fit` logs
from the epoch history the epochs the run lacks: all of them when the driver had no run
to hand over (MLflow unreachable at the start), else those the worker could not send (a SQLite
file it cannot reach, a queue lost with a killed worker). Then the driver logs the training
curves figure and the artifacts. The rank-0 worker prints one progress line per epoch.

Layout: `worker.py` (the loop, checkpoints, live tracking), `numerics.py` (seeding, all-reduce, RNG state), `driver.py` (the trainer, datasets,
results, tracking, summaries).

Test hook: with LOFI_TEST_PAUSE="<epoch>:<pid file>" in the driver's environment, the rank-0
worker, at the start of that epoch and only while the file does not exist, writes its PID
there and waits (up to 120 s) so that a test can kill it, or look at the run and then empty
(or delete) the file to let it go on.
"""

from pipelines.trainer.driver import (PAUSE_ENV, epoch_history, final_state, finish_stage, fit, fits_in_memory,
                                      log_epochs, log_missing_epochs, log_training, stage_tracker, summary_lines,
                                      table_dataset, torch_bytes, write_outputs)
from pipelines.trainer.numerics import all_reduce, peak_memory_bytes, rng_state, seed_epoch, set_rng_state
from pipelines.trainer.worker import (STATE_FILE, StageLoop, StepOutput, WorkerContext, build_optimizer, numeric,
                                      progress_line, say, worker_loop)

__all__ = [
    "finish_stage",
    "PAUSE_ENV", "STATE_FILE", "StageLoop", "StepOutput", "WorkerContext", "all_reduce", "build_optimizer",
    "epoch_history", "final_state", "fit", "fits_in_memory", "log_epochs", "log_missing_epochs", "log_training", "numeric", "peak_memory_bytes",
    "progress_line", "rng_state", "say", "seed_epoch", "set_rng_state", "stage_tracker", "summary_lines",
    "table_dataset", "torch_bytes", "worker_loop", "write_outputs",
]
