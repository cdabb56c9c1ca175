"""Train an equivariant classifier (or N-body regressor) by constraint relaxation from the command line.

    relaxeq-train --model vn_pointnet --dataset shapes --epochs 8            # relaxed (the default)
    relaxeq-train --model vn_pointnet --dataset shapes --epochs 8 --plain    # the unrelaxed baseline
    relaxeq-train --dataset modelnet40 --data-root ~/data/modelnet40_ply_hdf5_2048 --train-rotation z
    relaxeq-train --model steerable_cnn --dataset rotmnist --epochs 20        # C_8 steerable CNN on RotMNIST-5k
    relaxeq-train --model egnn --dataset nbody --epochs 100                   # relaxed E(n)-GNN, charged N-body (MSE)
    relaxeq-train --model segnn --dataset nbody --epochs 100                  # relaxed SEGNN (needs e3nn)
    relaxeq-train --resume runs/<run>                                         # continue an interrupted run
    torchrun --nproc-per-node 2 -m relaxeq_fast.train ...                    # data parallel (gloo / nccl)

What a run does: trains with θ on every relaxed layer following the θ schedule (exactly 0 at the end)
and the closed-form Lie-derivative / norm regularisers in the loss, evaluates every epoch, projects the
model to an exactly equivariant one, and reports that model's test accuracy and equivariance error.

The run directory holds config.json, metrics.csv (one row per epoch), checkpoint.pt (written after
every epoch, atomically, and only when every loss of the epoch was finite), model_projected.pt, the
plot training.png and summary.json. Resuming from checkpoint.pt reproduces the uninterrupted run's
metrics exactly on CPU: model, optimiser, lr and θ schedules, and every random generator (data order,
augmentation, dropout) are restored. Under torchrun every rank takes its slice of the same global
batch; batch-norm and regulariser statistics are those of the global batch (see
:mod:`relaxeq_fast.distributed`), so the result matches one process up to floating-point reduction
order (use --dtype float64 to compare), except for dropout masks (set --dropout 0 to compare).

Images (--model steerable_cnn, --dataset rotmnist): the rotation protocol maps aligned / z / so3 to
none / a random rotation / a random rotation of each image (the plane has one rotation axis, so z and
so3 coincide), by bilinear interpolation about the image centre (data.augment.rotate_images). The
RotMNIST digits are already rotated; a test rotation re-rotates the fixed test set once, by seeded
angles. The point augmentations (--augment) do not apply to images. The final equivariance error of
an image model is its invariance to exact quarter turns (torch.rot90: pixel permutations, to which a
C_N model with 4 | N is exactly invariant), not to interpolated rotations.

N-body (--model egnn / segnn, --dataset nbody): the models predict the particles' positions 1000 integration
steps ahead from positions, velocities and charges (:mod:`relaxeq_fast.data.nbody`); the loss and the metric
are the MSE (lower is better; the best epoch is the one with the lowest projected validation MSE), the
dataset's own 2000-system validation split is used (--val-fraction stays 0), the data seed is fixed (one
benchmark; --seed seeds the model and the training), and the final check is the E(3) equivariance of the
predicted positions. summary.json also gives test_mse_static, the MSE of predicting that nothing moves.

Modules: :mod:`.config` (settings, paper setups, validation), :mod:`.build` (model, data,
augmentation), :mod:`.task` (classification or regression: loss, metric, symmetry check), :mod:`.loop`
(the run), :mod:`.checkpoint`, :mod:`.report` (metrics, plots,
comparisons), :mod:`.cli` (relaxeq-train).
"""
from .build import build_model
from .cli import main, parse_args
from .config import MODELS, PAPER_SETUPS, ConfigError, NonFiniteLossError, TrainConfig, validate
from .loop import evaluate, train
from .report import compare_runs, format_summary, plot_history, relaxation_persistence

__all__ = ["TrainConfig", "ConfigError", "NonFiniteLossError", "MODELS", "PAPER_SETUPS", "train", "main",
           "build_model", "parse_args", "validate", "evaluate", "compare_runs", "plot_history", "format_summary",
           "relaxation_persistence"]
