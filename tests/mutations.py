"""Mutation checks: each entry breaks the package in one small way and names the tests that must fail.

    python tests/mutations.py            # every mutation; a table of caught / MISSED; exit 1 if any missed
    python tests/mutations.py --list
    python tests/mutations.py theta_steps_twice lr_schedule_not_restored

A mutation is a literal text substitution in one source file, applied in place and always reverted
(the file is rewritten from the saved original, even on Ctrl-C). Python sources only: a C++/CUDA
mutation needs a rebuild and is recorded by hand in tests/README.md. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file -k expr"
    why: str


MUTATIONS = [
    # ---- the trainer's θ wiring, resume and configuration (tests/test_train.py, test_train_checkpoint.py,
    #      test_train_config.py) ----
    Mutation("theta_steps_twice", "relaxeq_fast/train/loop.py",
             'if theta is not None and cfg.theta_unit == "step":\n                theta.step()',
             'if theta is not None and cfg.theta_unit == "step":\n                theta.step()\n                theta.step()',
             ("tests/test_train.py -k theta_used",), "θ stepped twice per optimisation step"),
    Mutation("theta_epoch_steps_twice", "relaxeq_fast/train/loop.py",
             'if theta is not None and cfg.theta_unit == "epoch":\n            theta.step()',
             'if theta is not None and cfg.theta_unit == "epoch":\n            theta.step()\n            theta.step()',
             ("tests/test_train.py -k theta_used",), "θ stepped twice per epoch (--theta-unit epoch)"),
    Mutation("theta_total_plus_one", "relaxeq_fast/train/loop.py",
             "total = cfg.epochs * steps_per_epoch if", "total = 1 + cfg.epochs * steps_per_epoch if",
             ("tests/test_train.py -k theta_used",), "θ schedule built over total + 1 steps"),
    Mutation("theta_scaled_lambda_ignored", "relaxeq_fast/train/loop.py",
             "theta=theta_buffer if cfg.theta_scaled_lambda else None", "theta=None",
             ("tests/test_train.py -k theta_used",), "--theta-scaled-lambda has no effect"),
    Mutation("lr_schedule_not_restored", "relaxeq_fast/train/checkpoint.py",
             'lr_schedule.load_state_dict(ck["lr_schedule"])', "pass",
             ("tests/test_train_checkpoint.py -k resume_reproduces",),
             "resume keeps a fresh lr schedule (no-op load_state_dict)"),
    Mutation("validate_after_device", "relaxeq_fast/train/loop.py",
             "    validate(cfg, D.world_size() if D.is_distributed() else int(os.environ.get(\"WORLD_SIZE\", \"1\")))\n",
             "", ("tests/test_train_config.py -k bad_configuration",), "a config is used before it is validated"),
    Mutation("relax_lr_not_scaled", "relaxeq_fast/train/loop.py",
             'relax_group["lr"] = scheduled_lr * theta_value', 'relax_group["lr"] = scheduled_lr',
             ("tests/test_train.py -k relax_lr",), "--relax-lr theta leaves the relaxation's lr unscaled"),
    Mutation("relax_lr_not_restored", "relaxeq_fast/train/loop.py",
             '        step()\n        relax_group["lr"] = scheduled_lr\n',
             '        step()\n',
             ("tests/test_train.py -k relax_lr",), "--relax-lr theta leaks θ into the lr schedule"),
    Mutation("non_finite_guard_off", "relaxeq_fast/train/loop.py",
             "        if bad != self.NEVER:\n", "        if False:\n",
             ("tests/test_train_checkpoint.py -k non_finite",), "a non-finite loss is never reported"),
    Mutation("non_finite_step_misnamed", "relaxeq_fast/train/loop.py",
             "torch.full_like(self.first_bad, step)", "torch.full_like(self.first_bad, step + 1)",
             ("tests/test_train_checkpoint.py -k non_finite",), "the guard names the wrong step"),
    Mutation("host_read_in_step", "relaxeq_fast/train/loop.py",
             "        r_ld = sum(t.lie_derivative.detach() for t in terms)\n",
             "        r_ld = sum(t.lie_derivative.detach() for t in terms)\n        r_ld.item()\n",
             ("tests/test_train.py -k host",), "a .item() in the step (a host sync)"),
    Mutation("progress_bar_in_logs", "relaxeq_fast/progress.py",
             "    if stderr_is_terminal():\n", "    if True:\n",
             ("tests/test_train.py -k log_file",), "tqdm frames written into a log file"),
    Mutation("setup_stamp_ignores_sources", "scripts/setup.sh",
             "    find csrc -type f -print0", "    find csrc -maxdepth 0 -type f -print0",
             ("tests/test_setup_script.py",), "a changed .cpp does not rebuild"),
    Mutation("resume_settings_ignored", "relaxeq_fast/train/loop.py",
             "        if differ:\n", "        if False:\n",
             ("tests/test_train_checkpoint.py -k other_settings",), "settings given with --resume silently ignored"),
    Mutation("checkpoint_tmp_left_behind", "relaxeq_fast/train/checkpoint.py",
             "        if os.path.exists(tmp):\n            os.remove(tmp)\n", "",
             ("tests/test_train_checkpoint.py -k failed_checkpoint",), "a failed write leaves its temporary file"),
    Mutation("checkpoint_shape_unchecked", "relaxeq_fast/train/checkpoint.py",
             "        if not isinstance(ck, dict) or not keys <= set(ck):\n", "        if False:\n",
             ("tests/test_train_checkpoint.py -k broken_checkpoint",),
             "a file that is not a checkpoint crashes with a KeyError"),
    Mutation("backend_resolved_every_call", "relaxeq_fast/backend.py",
             "    hit = _resolved.get((device_type, name))\n", "    hit = None\n",
             ("tests/test_nn.py -k repeated",), "every op call resolves its backend again"),
    # ---- distributed helpers (tests/test_distributed.py) ----
    Mutation("moments_equal_weights", "relaxeq_fast/distributed.py",
             "global_mean = all_reduce(mean * (n / total))", "global_mean = all_reduce(mean * 0.5)",
             ("tests/test_distributed.py -k moments",), "ranks' means averaged with equal weights"),
    Mutation("moments_var_without_shift", "relaxeq_fast/distributed.py",
             "all_reduce((var + (mean - global_mean).square()) * (n / total))", "all_reduce(var * (n / total))",
             ("tests/test_distributed.py -k moments",), "global variance misses the between-rank term"),
    Mutation("sync_bn_biased_running_var", "relaxeq_fast/distributed.py",
             "var.detach() * (total / max(total - 1, 1))", "var.detach()",
             ("tests/test_distributed.py -k sync_batch_norm",), "running variance left biased"),
    Mutation("sync_bn_ignores_momentum", "relaxeq_fast/distributed.py",
             "m = self.momentum if self.momentum is not None else", "m = 0.1 if self.momentum is not None else",
             ("tests/test_distributed.py -k sync_batch_norm",), "momentum hard-coded to the default"),
    Mutation("input_stats_keep_local_rows", "relaxeq_fast/distributed.py",
             "m.last_rows = None  # this rank's rows only", "pass  # this rank's rows only",
             ("tests/test_distributed.py -k input_stats",), "the regulariser uses this rank's rows after the reduction"),
    Mutation("input_stats_unshared", "relaxeq_fast/distributed.py",
             "unique.setdefault(id(m.last_stats), m.last_stats)", "unique.setdefault(id(m), m.last_stats)",
             ("tests/test_distributed.py -k input_stats",),
             "fused maps stop sharing one statistics object (and are all-reduced twice)"),
    # ---- op parameters, the VN block, stats reducers (tests/test_vn*.py, test_nn.py, test_steerable_relaxed.py) ----
    Mutation("leaky_slope_hardcoded_triton", "triton_kernels/vn_leaky_relu.py",
             "    b = 1.0 - negative_slope\n", "    b = 1.0 - 0.2\n",
             ("tests/test_vn_leaky_relu.py -k nondefault and triton",), "Triton vn_leaky_relu ignores the slope"),
    Mutation("leaky_eps_hardcoded_triton", "triton_kernels/vn_leaky_relu.py",
             "    b = 1.0 - negative_slope\n", "    b = 1.0 - negative_slope\n    eps = 1e-6\n",
             ("tests/test_vn_leaky_relu.py -k nondefault and triton",), "Triton vn_leaky_relu ignores eps"),
    Mutation("regularizer_cross_term_dropped_triton", "triton_kernels/relaxation_regularizer.py",
             "T = cas_out[:, None] * WG - _sandwich(WG, irreps_out, irreps_in, gens)", "T = cas_out[:, None] * WG",
             ("tests/test_relaxation_regularizer_triton.py -k values_and_gradients and closed_form and dtype0",),
             "the two-product regulariser (Triton) drops the cross term Σ_k A_k,out (W G) A_k,inᵀ"),
    Mutation("regularizer_casimir_dropped_triton", "triton_kernels/relaxation_regularizer.py",
             "T = cas_out[:, None] * WG - _sandwich(WG, irreps_out, irreps_in, gens)",
             "T = -_sandwich(WG, irreps_out, irreps_in, gens)",
             ("tests/test_relaxation_regularizer_triton.py -k values_and_gradients and closed_form and dtype0",),
             "the two-product regulariser (Triton) drops the Casimir term Cas W G"),
    Mutation("se3t_projection_transposed_layout", "relaxeq_fast/interop/se3t.py",
             ".T.clone(memory_format=torch.contiguous_format)", ".T.clone()",
             ("tests/test_interop_se3t.py -k projection_restores",),
             "the projected LinearSE3 keeps transposed (non-contiguous) weights"),
    Mutation("se3t_bases_not_compared", "relaxeq_fast/models/se3_transformer.py",
             "        if differ:\n", "        if False:\n",
             ("tests/test_interop_se3t.py -k other_kernel_bases",),
             "SE3TransformerNBody loads weights made under other library kernel bases"),
    Mutation("triton_ops_defined_twice_on_reload", "triton_kernels/_common.py",
             "            if not hasattr(getattr(torch.ops, ns), name):\n", "            if True:\n",
             ("tests/test_relaxed_linear_triton.py -k reloaded",),
             "a reloaded Triton module defines its ops again"),
    Mutation("bn_momentum_hardcoded", "relaxeq_fast/functional.py",
             "        _update_running_stats(running_mean, running_var, mean, var, rows, momentum)\n        invstd",
             "        _update_running_stats(running_mean, running_var, mean, var, rows, 0.1)\n        invstd",
             ("tests/test_vn_batch_norm.py -k nondefault",), "vn_batch_norm's running stats ignore the momentum"),
    Mutation("bn_eps_hardcoded", "relaxeq_fast/functional.py",
             "        invstd = torch.rsqrt(var + eps)\n", "        invstd = torch.rsqrt(var + 1e-5)\n",
             ("tests/test_vn_batch_norm.py -k nondefault",), "vn_batch_norm ignores eps in training"),
    Mutation("reducer_skipped_reference", "relaxeq_fast/functional.py",
             "        mean, var, rows = stats_reducer(mean, var, rows)\n        _update_running_stats(running_mean, "
             "running_var, mean, var, rows, momentum)\n        norm_bn",
             "        _update_running_stats(running_mean, running_var, mean, var, rows, momentum)\n        norm_bn",
             ("tests/test_vn_batch_norm.py -k reducer",), "the reference backend skips the stats_reducer"),
    Mutation("reducer_skipped_native", "relaxeq_fast/functional.py",
             "        if stats_reducer is not None:\n            mean, var, rows = stats_reducer(mean, var, rows)\n", "",
             ("tests/test_vn_batch_norm.py -k reducer",), "the native/Triton path skips the stats_reducer"),
    Mutation("vn_batch_norm_eps_swapped", "relaxeq_fast/vn.py",
             "self.momentum, self.eps, self.norm_eps, stats_reducer", "self.momentum, self.norm_eps, self.eps, stats_reducer",
             ("tests/test_vn.py -k independent",), "VNBatchNorm passes eps and norm_eps swapped"),
    Mutation("vn_block_drops_eps", "relaxeq_fast/vn.py",
             "            p = self.batchnorm(p)\n        return F.vn_leaky_relu(p, d, self.negative_slope, self.eps)",
             "            p = self.batchnorm(p)\n        return F.vn_leaky_relu(p, d, self.negative_slope)",
             ("tests/test_vn.py -k independent",), "VNLinearLeakyReLU drops its eps"),
    Mutation("equivariant_bias_flipped", "relaxeq_fast/nn.py",
             "                parts.append(bias[k:k + m])", "                parts.append(bias[k:k + m].flip(0))",
             ("tests/test_nn.py -k independent",), "scalar biases in the wrong slots (still equivariant)"),
    Mutation("field_bn_not_recentred", "relaxeq_fast/steerable/norm.py",
             "                mean, var, n = self.stats_reducer(mean, var, n)\n"
             "                xc = x - mean[self.field_of].view(1, -1, 1, 1)\n",
             "                mean, var, n = self.stats_reducer(mean, var, n)\n",
             ("tests/test_steerable_relaxed.py -k field_batch_norm",), "FieldBatchNorm keeps the local mean after the reducer"),
    Mutation("field_bn_momentum_hardcoded", "relaxeq_fast/steerable/norm.py",
             "                self.running_var.lerp_(var.detach() * unbiased, self.momentum)",
             "                self.running_var.lerp_(var.detach() * unbiased, 0.1)",
             ("tests/test_steerable_relaxed.py -k field_batch_norm",), "FieldBatchNorm ignores its momentum"),
    Mutation("field_nonlinearity_bias_sign", "relaxeq_fast/steerable/nonlinear.py",
             "        gate = (torch.relu(norm + b) / norm)", "        gate = (torch.relu(norm - b) / norm)",
             ("tests/test_steerable_relaxed.py -k field_nonlinearity",), "FieldNonLinearity's bias sign flipped"),
    # ---- the study runner (tests/test_study.py) ----
    Mutation("study_population_std", "relaxeq_fast/study/report.py",
             "sum((v - m) ** 2 for v in values) / (len(values) - 1)", "sum((v - m) ** 2 for v in values) / len(values)",
             ("tests/test_study.py -k by_hand",), "population instead of sample standard deviation"),
    Mutation("study_diverged_not_failed", "relaxeq_fast/study/grid.py",
             'return {**row, "failed": state == "diverged"}', 'return {**row, "failed": False}',
             ("tests/test_study.py -k diverged",), "a diverged run does not count as failed"),
    # ---- issue 16: P_eq, the complement, nearest projection, layer_mean (tests/test_relax_space.py) ----
    Mutation("intertwiner_trace_not_normalised", "relaxeq_fast/nn.py",
             "out.append(blk.diagonal(dim1=-3, dim2=-1).sum(-1) / d)",
             "out.append(blk.diagonal(dim1=-3, dim2=-1).sum(-1))",
             ("tests/test_relax_space.py -k intertwiners",), "P_eq's block traces not divided by 2l+1"),
    Mutation("complement_forward_not_shifted", "relaxeq_fast/nn.py",
             "weights = [w - self.theta * p for w, p in zip(weights, proj_w)]",
             "weights = [w + 0 * p for w, p in zip(weights, proj_w)]",
             ("tests/test_relax_space.py -k complement_forward",), "complement forward keeps P_eq W_r"),
    Mutation("complement_regulariser_on_full_weights", "relaxeq_fast/nn.py",
             "        W, b = self.relaxation_weights()\n        return relaxation_regularizers(W, b,",
             "        W, b = self.weight_relax, self.bias_relax\n        return relaxation_regularizers(W, b,",
             ("tests/test_relax_space.py -k vanish_exactly",), "R_N of the complement computed on W_r"),
    Mutation("grouped_regulariser_on_full_weights", "relaxeq_fast/vn.py",
             "W_rs, b_rs = zip(*(m.relaxation_weights() for m in group))",
             "W_rs, b_rs = zip(*((m.weight_relax, m.bias_relax) for m in group))",
             ("tests/test_relax_space.py -k grouped",), "grouped layers regularise W_r, not its complement"),
    Mutation("nearest_not_folded", "relaxeq_fast/nn.py",
             "                w.add_(self.theta * p)", "                w.add_(0 * p)",
             ("tests/test_relax_space.py -k nearest",), "project('nearest') drops θ P_eq W_r"),
    Mutation("steerable_complement_not_shifted", "relaxeq_fast/steerable/conv.py",
             "kernel, b = self.expand(self.weight - self.theta * shift.view(-1, *[1] * (self.weight.dim() - 1)))",
             "kernel, b = self.expand(self.weight)",
             ("tests/test_relax_space.py -k steerable_complement_forward",), "complement conv keeps P_eq B"),
    Mutation("layer_mean_without_sqrt", "relaxeq_fast/regularizer.py",
             'if reduction in ("paper", "layer_mean"):', 'if reduction in ("paper",):',
             ("tests/test_relax_space.py -k layer_mean",), "layer_mean loses the paper's square root"),
    # ---- issue 27: the smoke plumes, RSteer, the forecast task ----
    Mutation("smoke_window_offset_dropped", "relaxeq_fast/data/smoke.py",
             "INPUT_OFFSET = 2  #", "INPUT_OFFSET = 0  #",
             ("tests/test_smoke.py -k windows",), "windows start at frame s, not at s + 2 as the public code's"),
    Mutation("smoke_domain_from_train_sims", "relaxeq_fast/data/smoke.py",
             "domain_rows = [k - 1 for k in DOMAIN_SIMS if k <= spec.n_sims]",
             "domain_rows = [k - 1 for k in TRAIN_SIMS if k <= spec.n_sims]",
             ("tests/test_smoke.py -k windows",), "test-domain windows taken from the training simulations"),
    Mutation("rotate_fields_wrong_sense", "relaxeq_fast/data/smoke.py",
             "torch.stack((-out[..., 1, :, :], out[..., 0, :, :]), dim=-3)",
             "torch.stack((out[..., 1, :, :], -out[..., 0, :, :]), dim=-3)",
             ("tests/test_smoke.py -k rotate_fields",), "the vectors turned the other way from the grid"),
    Mutation("rollout_without_feedback", "relaxeq_fast/models/smoke.py",
             "window = torch.cat((window[:, 2:], pred), 1)", "window = window",
             ("tests/test_smoke_models.py -k rollout",), "each step predicted from the same input window"),
    Mutation("rsteer_penalty_rows_only", "relaxeq_fast/steerable/rsteer.py",
             "return (horizontal.sum() + vertical.sum()) / (horizontal.numel() + vertical.numel())",
             "return horizontal.sum() / horizontal.numel()",
             ("tests/test_smoke_models.py -k penalised",), "RSteer's penalty ignores vertical neighbours"),
    Mutation("forecast_loss_mean_over_steps", "relaxeq_fast/train/task.py",
             "return TF.mse_loss(out, y) * y.shape[1]", "return TF.mse_loss(out, y)",
             ("tests/test_train_smoke.py -k training_loss",), "the loss averages the steps' MSE instead of summing"),
    Mutation("auxiliary_loss_ignored", "relaxeq_fast/train/loop.py",
             "        task = task + model.auxiliary_loss()", "        pass",
             ("tests/test_train_smoke.py -k training_loss",), "RSteer's coefficient penalty left out of the loss"),
    Mutation("rmse_without_sqrt", "relaxeq_fast/train/task.py",
             'return math.sqrt(mean) if self.metric == "rmse" else mean', "return mean",
             ("tests/test_train_smoke.py -k rmse_of_its_saved_model",), "the reported RMSE is the MSE"),
    # ---- issue 28: learnt per-layer θ under the constraint θ = 0 ----
    Mutation("dual_step_skipped", "relaxeq_fast/train/loop.py",
             "    if dual is not None:\n        dual.dual_step()\n", "",
             ("tests/test_train_dual.py -k logs_per_layer",), "the multipliers never take their dual step"),
    Mutation("dual_ascent_sign_flipped", "relaxeq_fast/relaxation.py",
             "self.multipliers.copy_((self.multipliers + self.dual_lr * self.constraint()).clamp_min(0))",
             "self.multipliers.copy_((self.multipliers - self.dual_lr * self.constraint()).clamp_min(0))",
             ("tests/test_dual_theta.py -k monotone",), "dual descent instead of ascent"),
    Mutation("dual_penalty_not_in_loss", "relaxeq_fast/train/loop.py",
             "objective = loss + dual.penalty() if dual is not None else loss", "objective = loss",
             ("tests/test_train_dual.py -k logs_per_layer",), "Σ μ_ℓ θ_ℓ² left out of the loss"),
    Mutation("multipliers_not_saved", "relaxeq_fast/relaxation.py",
             'return {"multipliers": self.multipliers.clone()}',
             'return {"multipliers": torch.zeros_like(self.multipliers)}',
             ("tests/test_train_dual.py -k resume",), "μ not saved in the checkpoint"),
    Mutation("elastic_slack_ignored", "relaxeq_fast/relaxation.py",
             "return self.thetas().to(self.multipliers.dtype).square() - self.multipliers / self.slack_cost",
             "return self.thetas().to(self.multipliers.dtype).square()",
             ("tests/test_dual_theta.py -k slackened",), "elastic's dual step without the slack (plain dual ascent)"),
    Mutation("elastic_projected_at_the_end", "relaxeq_fast/train/loop.py",
             'keeps_relaxation = getattr(dual, "keeps_relaxation", False)', "keeps_relaxation = False",
             ("tests/test_train_dual.py -k elastic_run",), "the elastic model is projected like a dual one"),
    Mutation("layer_error_against_drop", "relaxeq_fast/relaxation.py",
             'nearest = mod.project("nearest").eval()', 'nearest = mod.project("drop").eval()',
             ("tests/test_dual_theta.py -k independent_reference",),
             "the per-layer error counts the relaxation's equivariant part too"),
    # ---- issue 32: EGNN depth, study curves, the trainer's plot ----
    Mutation("egnn_chained_velocity", "relaxeq_fast/models/egnn.py",
             "h, x, _ = layer(h, x, vel, edge_attr)", "h, x, vel = layer(h, x, vel, edge_attr)",
             ("tests/test_egnn.py -k egnn_vel_update",), "each layer reads the previous layer's step, not the input v"),
    Mutation("egnn_norm_diff_ignored", "relaxeq_fast/models/egnn.py",
             "        if self.norm_diff:", "        if False:",
             ("tests/test_egnn.py -k egnn_vel_update",), "norm_diff=True leaves the differences unnormalised"),
    Mutation("study_axes_sorted_as_strings", "relaxeq_fast/study/report.py",
             "key=lambda kv: (_axes_order(kv[0][2]),", "key=lambda kv: (kv[0][2],",
             ("tests/test_study.py -k curves_aggregate",), "n_train=480 tabulated before n_train=96"),
    Mutation("training_plot_every_epoch", "relaxeq_fast/train/loop.py",
             "if last or time.perf_counter() - plotted_at >= PLOT_EVERY_S:", "if True:",
             ("tests/test_train_checkpoint.py -k throttled",), "training.png redrawn after every epoch"),
    Mutation("training_plot_stale_after_divergence", "relaxeq_fast/train/loop.py",
             "            if rank == 0 and history:\n"
             "                plot_history(history, plot_path, plot_title, metric)\n",
             "", ("tests/test_train_checkpoint.py -k non_finite",), "a diverged run's plot misses its last finite epochs"),
]


def _run_tests(selection: tuple[str, ...]) -> tuple[int, float]:
    rc_all, t0 = 0, time.perf_counter()
    for sel in selection:
        args = sel.split(" -k ", 1)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", args[0]]
        if len(args) == 2:
            cmd += ["-k", args[1]]
        rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode
        if rc not in (0, 1):  # 2-5: interrupted, internal error, usage error, nothing collected
            raise RuntimeError(f"{' '.join(cmd)}: pytest exit {rc} (not a test outcome)")
        rc_all = rc_all or rc
    return rc_all, time.perf_counter() - t0


def apply_and_test(m: Mutation) -> tuple[bool, float]:
    """True if the tests failed with the mutation in place (caught), and the seconds they took."""
    path = os.path.join(ROOT, m.path)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    count = original.count(m.old)
    if count != 1:
        raise RuntimeError(f"{m.name}: the text to replace occurs {count} times in {m.path}, expected once")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new))
        rc, seconds = _run_tests(m.tests)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    return rc == 1, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--baseline", action="store_true", help="first check the selected tests pass unmutated")
    a = p.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in a.names if n not in by_name]
    if unknown:
        p.error(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [by_name[n] for n in a.names] if a.names else MUTATIONS
    if a.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path}: {m.why}")
        return 0
    if a.baseline:
        for sel in sorted({s for m in chosen for s in m.tests}):
            rc, _ = _run_tests((sel,))
            if rc:
                print(f"baseline fails: {sel}", file=sys.stderr)
                return 2
    print("| mutation | file | tests | result | s |\n|---|---|---|---|---|")
    missed = 0
    for m in chosen:
        caught, seconds = apply_and_test(m)
        missed += not caught
        print(f"| {m.name} ({m.why}) | {m.path} | `{'`, `'.join(m.tests)}` | {'caught' if caught else 'MISSED'} "
              f"| {seconds:.0f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
