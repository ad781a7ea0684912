#!/usr/bin/env python
"""Mutation check: plant realistic bugs, one at a time, in a temporary copy of the repository and
check that the tests meant to catch each one fail.

Each mutant is (name, file, exact old snippet, new snippet, tests). The snippet must occur exactly
once in the file; a refactoring that moves or rewrites it is reported as "snippet not found" (or
"snippet ambiguous"), so the list is kept in step with the code rather than silently skipped.

    python scripts/mutants.py                 # every mutant, from the committed tree (HEAD)
    python scripts/mutants.py --worktree      # from the working tree, uncommitted edits included
    python scripts/mutants.py --only NAME ... # some of them
    python scripts/mutants.py --list          # names, files and tests only

The copy gets its own TORCH_EXTENSIONS_DIR (the unmutated C++ build, made once by the baseline
run and shared by the Python mutants; each C++ mutant builds its own), so the user's cached
build is never touched. The files of the checkout itself are never modified.
Exit status: 0 when every mutant was caught, 1 otherwise, 2 when the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, run with -x

    @property
    def is_cpp(self) -> bool:
        return self.path.endswith((".cpp", ".h"))


TRITON = "ebm_fast/kernels/triton/"
TRAINER = "ebm_fast/training/trainer.py"
TRAINER_DEFS = "tests/training/test_trainer_definitions.py"
STUDY = "ebm_fast/experiments/study/"
LOSSES = "ebm_fast/training/losses.py"
LOSS_DEFS = "tests/training/test_loss_definitions.py"
MLP_ROUTE = "ebm_fast/samplers/mlp_gradient.py"
MLP_FALLBACK = "tests/samplers/test_mlp_gradient_fallback.py"
HELD_OUT = "tests/training/test_held_out.py"
STUDY_ERRORS = "tests/experiments/test_study_errors.py"
MUTANTS = [
    # -- kernel index arithmetic
    Mutant(
        "triton_update_drops_the_tiles_chain_base",
        TRITON + "langevin_update.py",
        "chain = first_chain + local.to(tl.int32) // per_chain.to(tl.int32)",
        "chain = local.to(tl.int32) // per_chain.to(tl.int32)",
        ("tests/kernels/triton/test_langevin_update.py::test_update_across_several_programs",),
    ),
    Mutant(
        "triton_grid_ignores_the_alignment_shift",
        TRITON + "_launch.py",
        "(triton.cdiv(triton.cdiv(numel + shift, 4), groups),)",
        "(triton.cdiv(triton.cdiv(numel, 4), groups),)",
        ("tests/kernels/triton/test_philox.py::test_philox_out_across_program_tiles",),
    ),
    Mutant(
        "triton_buffer_gather_drops_the_column_offset",
        TRITON + "buffer_sample.py",
        "storage_ptr + slot[:, None] * features + j[None, :], mask=mask & ~reinit[:, None],",
        "storage_ptr + slot[:, None] * features + (j % BLOCK)[None, :], "
        "mask=mask & ~reinit[:, None],",
        ("tests/kernels/triton/test_buffer.py::test_sample_across_several_programs",),
    ),
    Mutant(
        "triton_buffer_push_drops_the_column_offset",
        TRITON + "buffer_push.py",
        "tl.store(storage_ptr + target[:, None] * features + j[None, :], row, mask=mask)",
        "tl.store(storage_ptr + target[:, None] * features + (j % BLOCK)[None, :], row, mask=mask)",
        ("tests/kernels/triton/test_buffer.py::test_push_across_several_programs",),
    ),
    Mutant(
        "triton_mala_copies_only_the_first_block",
        TRITON + "mala_accept.py",
        "        mask = copy_rows & (start + column < per_chain)\n"
        "        offset = row + start + column\n",
        "        mask = copy_rows & (column < per_chain)\n        offset = row + column\n",
        ("tests/kernels/triton/test_mala_accept.py",),
    ),
    Mutant(
        "triton_norm_partial_sums_step_by_block_not_chunk",
        TRITON + "langevin_update.py",
        "start = split.to(tl.int64) * chunk",
        "start = split.to(tl.int64) * BLOCK",
        (
            "tests/kernels/triton/test_langevin_update.py::"
            "test_norm_clip_scales_over_several_blocks_splits_and_scale_programs",
        ),
    ),
    # -- noise counters and streams
    Mutant(
        "triton_mala_uniform_ignores_chain_offset",
        TRITON + "mala_accept.py",
        "spec_uniform(seed, step, stream, chain_offset + chain)",
        "spec_uniform(seed, step, stream, chain)",
        ("tests/kernels/triton/test_mala_accept.py",),
    ),
    Mutant(
        "triton_buffer_slot_on_the_reinit_stream",
        TRITON + "buffer_sample.py",
        "STREAM_SLOT=STREAM_BUFFER_SLOT",
        "STREAM_SLOT=STREAM_BUFFER_REINIT_DECISION",
        ("tests/kernels/triton/test_buffer.py::test_sample_across_several_programs",),
    ),
    Mutant(
        "portable_philox_drops_the_counters_high_word",
        "ebm_fast/csrc/philox.h",
        "static_cast<uint32_t>(block >> 32), s.step,",
        "0u, s.step,",
        ("tests/kernels/cpp/test_parallel_paths.py::test_each_philox_path_matches_the_spec",),
    ),
    Mutant(
        "mala_accepts_on_the_proposal_stream",
        "ebm_fast/samplers/mala.py",
        "stream=STREAM_MALA_ACCEPT,",
        "stream=STREAM_PROPOSAL,",
        ("tests/samplers/test_mala_spec.py",),
    ),
    # -- step counters across calls
    Mutant(
        "sampler_reuses_the_last_step_of_a_call",
        "ebm_fast/samplers/base.py",
        "        self._step += n_steps\n",
        "        self._step += n_steps - 1\n",
        ("tests/samplers/test_mala_spec.py",),
    ),
    # -- clamp / clip order
    Mutant(
        "triton_update_clamps_before_adding_noise",
        TRITON + "langevin_update.py",
        "    new = (x - step_size * grad) + noise_scale * noise\n"
        "    if CLAMP_LO:\n"
        "        new = tl.maximum(new, clamp_lo, propagate_nan=tl.PropagateNan.ALL)\n"
        "    if CLAMP_HI:\n"
        "        new = tl.minimum(new, clamp_hi, propagate_nan=tl.PropagateNan.ALL)\n",
        "    new = x - step_size * grad\n"
        "    if CLAMP_LO:\n"
        "        new = tl.maximum(new, clamp_lo, propagate_nan=tl.PropagateNan.ALL)\n"
        "    if CLAMP_HI:\n"
        "        new = tl.minimum(new, clamp_hi, propagate_nan=tl.PropagateNan.ALL)\n"
        "    new = new + noise_scale * noise\n",
        ("tests/kernels/triton/test_langevin_update.py",),
    ),
    Mutant(
        "triton_norm_clip_scales_up_small_gradients",
        TRITON + "langevin_update.py",
        "bound = tl.maximum(norm, grad_clip, propagate_nan=tl.PropagateNan.ALL)",
        "bound = norm",
        ("tests/kernels/triton/test_langevin_update.py",),
    ),
    # -- per-chain parameters
    Mutant(
        "mala_proposal_ignores_the_temperature",
        "ebm_fast/samplers/mala.py",
        "(2 * eps * temperature).sqrt()",
        "(2 * eps).sqrt()",
        ("tests/samplers/test_mala_spec.py",),
    ),
    Mutant(
        "triton_mala_reads_chain_0s_step_size",
        TRITON + "mala_accept.py",
        "eps = (zeros + read_chain_param(step_size, chain, live, STEP_SIZE_MODE))[:, None]",
        "eps = (zeros + read_chain_param(step_size, chain * 0, live, STEP_SIZE_MODE))[:, None]",
        ("tests/kernels/triton/test_mala_accept.py",),
    ),
    # -- buffer slot draws and reinit
    Mutant(
        "triton_buffer_slot_by_modulo",
        TRITON + "buffer_sample.py",
        "slot = ((r.to(tl.uint64) * slots_per_class.to(tl.uint64)) >> 32).to(tl.int64)",
        "slot = (r.to(tl.uint64) % slots_per_class.to(tl.uint64)).to(tl.int64)",
        ("tests/kernels/triton/test_buffer.py::test_sample_across_several_programs",),
    ),
    Mutant(
        "triton_buffer_reads_unwritten_slots",
        TRITON + "buffer_sample.py",
        "reinit = (spec_uniform(seed, step, STREAM_DECISION, chain) < reinit_prob) | "
        "(written == 0)",
        "reinit = spec_uniform(seed, step, STREAM_DECISION, chain) < reinit_prob",
        ("tests/kernels/triton/test_buffer.py::test_sample_across_several_programs",),
    ),
    Mutant(
        "buffer_reinit_mask_forgets_unwritten_slots",
        "ebm_fast/reference/buffer_sample.py",
        "return (u < threshold) | (written[slots] == 0)",
        "return u < threshold",
        ("tests/test_buffer.py::test_return_reinit_marks_exactly_the_reinitialised_chains",),
    ),
    # -- reservoir and FIFO counts
    Mutant(
        "push_ignores_the_rank_within_the_batch",
        "ebm_fast/reference/buffer_push.py",
        "seen = count[cls] + rank",
        "seen = count[cls]",
        (
            "tests/test_buffer.py::test_fifo_keeps_the_latest_items_in_ring_order",
            "tests/kernels/test_buffer.py::test_push_matches_reference",
        ),
    ),
    Mutant(
        "reservoir_fills_one_slot_too_many",
        "ebm_fast/reference/buffer_push.py",
        "seen < slots_per_class,\n            base + seen,",
        "seen <= slots_per_class,\n            base + seen,",
        (
            "tests/kernels/test_buffer.py::test_push_matches_reference",
            "tests/test_buffer.py::test_reservoir_inclusion_probability_is_capacity_over_count",
        ),
    ),
    # -- MALA correction
    Mutant(
        "triton_mala_correction_sign_flipped",
        TRITON + "mala_accept.py",
        "log_alpha = -(energy_y - energy_x) / temp - total / (4 * temp)",
        "log_alpha = -(energy_y - energy_x) / temp + total / (4 * temp)",
        ("tests/kernels/triton/test_mala_accept.py",),
    ),
    Mutant(
        "reference_mala_correction_ignores_the_temperature",
        "ebm_fast/reference/mala_accept.py",
        "        x, y, grad_x, grad_y, step_size\n    ) / (4 * temp)",
        "        x, y, grad_x, grad_y, step_size\n    ) / 4",
        ("tests/ops/test_mala_accept.py", "tests/samplers/test_statistics.py"),
    ),
    Mutant(
        "cpp_mala_correction_sign_flipped",
        "ebm_fast/csrc/mala_accept.cpp",
        "const acc_t log_alpha = -(e_y - e_x) / temp - sum / (4 * temp);",
        "const acc_t log_alpha = -(e_y - e_x) / temp + sum / (4 * temp);",
        ("tests/kernels/cpp/test_parallel_paths.py::test_mala_accept_split_over_threads",),
    ),
    # -- state_dict fields
    Mutant(
        "buffer_load_state_dict_forgets_the_draw_counter",
        "ebm_fast/buffer.py",
        'for name in ("seed", "storage", "written", "count", "draws"):\n'
        '            getattr(self, f"_{name}").copy_(state[name])',
        'for name in ("seed", "storage", "written", "count"):\n'
        '            getattr(self, f"_{name}").copy_(state[name])',
        ("tests/test_buffer.py::test_state_dict_resumes_bit_identically",),
    ),
    Mutant(
        "sampler_load_state_dict_keeps_its_own_seed",
        "ebm_fast/samplers/base.py",
        "        self._seed = seed.clone()\n",
        "",
        ("tests/samplers/test_samplers.py::test_resume_continues_the_same_trajectories",),
    ),
    # -- the Trainer's update rules (tests/training/test_trainer_definitions.py)
    Mutant(
        "trainer_ema_weights_the_new_weights_by_the_decay",
        TRAINER,
        "get_ema_multi_avg_fn(self.ema_decay)",
        "get_ema_multi_avg_fn(1 - self.ema_decay)",
        (TRAINER_DEFS + "::test_ema_is_the_exponential_average_of_the_weights_after_each_step",),
    ),
    Mutant(
        "trainer_ema_updates_before_the_optimizer_step",
        TRAINER,
        "            self.optimizer.step()\n"
        "            if self.ema_model is not None:\n"
        "                self.ema_model.update_parameters(self.energy)\n",
        "            if self.ema_model is not None:\n"
        "                self.ema_model.update_parameters(self.energy)\n"
        "            self.optimizer.step()\n",
        (TRAINER_DEFS + "::test_ema_is_the_exponential_average_of_the_weights_after_each_step",),
    ),
    Mutant(
        "trainer_ema_updates_on_skipped_steps",
        TRAINER,
        "        if finite:\n"
        "            self.optimizer.step()\n"
        "            if self.ema_model is not None:\n"
        "                self.ema_model.update_parameters(self.energy)\n"
        "        else:\n",
        "        if finite:\n"
        "            self.optimizer.step()\n"
        "        if self.ema_model is not None:\n"
        "            self.ema_model.update_parameters(self.energy)\n"
        "        if not finite:\n",
        (TRAINER_DEFS + "::test_ema_skips_a_skipped_step",),
    ),
    Mutant(
        "trainer_clips_by_the_max_norm",
        TRAINER,
        "clip_grad_norm_(self.parameters, self.grad_clip)",
        'clip_grad_norm_(self.parameters, self.grad_clip, norm_type=float("inf"))',
        (TRAINER_DEFS + "::test_clipping_scales_the_gradient_by_its_total_l2_norm",),
    ),
    Mutant(
        "trainer_clips_by_the_l1_norm",
        TRAINER,
        "clip_grad_norm_(self.parameters, self.grad_clip)",
        "clip_grad_norm_(self.parameters, self.grad_clip, norm_type=1)",
        (TRAINER_DEFS + "::test_clipping_scales_the_gradient_by_its_total_l2_norm",),
    ),
    Mutant(
        "trainer_clips_each_parameter_by_its_own_norm",
        TRAINER,
        "torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)",
        "torch.stack([torch.nn.utils.clip_grad_norm_(p, self.grad_clip)\n"
        "                             for p in self.parameters]).norm()",
        (TRAINER_DEFS + "::test_clipping_scales_the_gradient_by_its_total_l2_norm",),
    ),
    Mutant(
        "trainer_logs_the_max_norm_without_a_clip",
        TRAINER,
        "norm = torch.nn.utils.get_total_norm(grads)",
        'norm = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))',
        (
            TRAINER_DEFS + "::test_without_a_clip_the_gradient_is_applied_as_is_and_its_l2_norm"
            "_logged",
        ),
    ),
    Mutant(
        "trainer_checks_only_the_loss_for_finiteness",
        TRAINER,
        "finite = bool(torch.isfinite(loss.detach() + norm))",
        "finite = bool(torch.isfinite(loss.detach()))",
        (TRAINER_DEFS + "::test_a_nonfinite_gradient_with_a_finite_loss_skips_the_whole_step",),
    ),
    Mutant(
        "trainer_checks_gradients_only_when_clipping",
        TRAINER,
        "norm = torch.nn.utils.get_total_norm(grads)",
        "norm = loss.detach() * 0",  # no pass over the gradients without a clip
        (TRAINER_DEFS + "::test_a_nonfinite_gradient_with_a_finite_loss_skips_the_whole_step",),
    ),
    # -- the data order between epochs (tests/training/test_data.py)
    Mutant(
        "data_same_order_every_epoch",
        "ebm_fast/training/data.py",
        "manual_seed(self.seed + self.epoch)",
        "manual_seed(self.seed)",
        ("tests/training/test_data.py",),
    ),
    Mutant(
        "data_keeps_the_first_epochs_order",
        "ebm_fast/training/data.py",
        "self.epoch, self.position, self._order = self.epoch + 1, 0, None",
        "self.epoch, self.position = self.epoch + 1, 0",
        ("tests/training/test_data.py",),
    ),
    Mutant(
        "data_reads_in_storage_order",
        "ebm_fast/training/data.py",
        "self._order = torch.randperm(self.size, generator=generator)",
        "self._order = torch.arange(self.size)",
        ("tests/training/test_data.py",),
    ),
    Mutant(
        "data_ends_the_epoch_one_batch_early",
        "ebm_fast/training/data.py",
        "if self.position + self.batch_size > self.size:",
        "if self.position + self.batch_size >= self.size:",
        ("tests/training/test_data.py",),
    ),
    # -- the study's standard errors (tests/experiments/test_study_errors.py)
    Mutant(
        "study_mean_se_divides_by_n",
        STUDY + "common.py",
        "float(t.std() / math.sqrt(len(t)))",
        "float(t.std() / len(t))",
        (STUDY_ERRORS + "::test_mean_se_by_hand",),
    ),
    Mutant(
        "study_mean_se_uses_the_population_std",
        STUDY + "common.py",
        "float(t.std() / math.sqrt(len(t)))",
        "float(t.std(correction=0) / math.sqrt(len(t)))",
        (STUDY_ERRORS + "::test_mean_se_by_hand",),
    ),
    Mutant(
        "study_curves_se_uses_the_population_std",
        STUDY + "e3_training.py",
        "(values.std(0) / math.sqrt(len(rows)))",
        "(values.std(0, correction=0) / math.sqrt(len(rows)))",
        (
            STUDY_ERRORS + "::test_e3_curves_budgets_and_paired_differences_are_mean_and_se_over"
            "_the_seeds",
        ),
    ),
    Mutant(
        "study_curves_se_is_the_standard_deviation",
        STUDY + "e3_training.py",
        "(values.std(0) / math.sqrt(len(rows)))",
        "values.std(0)",
        (
            STUDY_ERRORS + "::test_e3_curves_budgets_and_paired_differences_are_mean_and_se_over"
            "_the_seeds",
        ),
    ),
    Mutant(
        "study_difference_to_exact_ml_unpaired",
        STUDY + "e3_training.py",
        'zip(_at(ctx.runs[(method, 1.0)], "kl", iteration), exact)',
        'zip(_at(ctx.runs[(method, 1.0)], "kl", iteration), exact[::-1])',
        (
            STUDY_ERRORS + "::test_e3_curves_budgets_and_paired_differences_are_mean_and_se_over"
            "_the_seeds",
        ),
    ),
    Mutant(
        "study_persistent_ml_minus_cd_unpaired",
        STUDY + "e3_training.py",
        'zip(_excess(ctx, "persistent_ml", b), _excess(ctx, "cd", b))',
        'zip(_excess(ctx, "persistent_ml", b), _excess(ctx, "cd", b)[::-1])',
        (
            STUDY_ERRORS + "::test_e3_curves_budgets_and_paired_differences_are_mean_and_se_over"
            "_the_seeds",
        ),
    ),
    Mutant(
        "study_e2_se_is_the_subsets_spread",
        STUDY + "e2_cd_objective.py",
        "se = float(parts.std()) / subsets**0.5",
        "se = float(parts.std())",
        (STUDY_ERRORS + "::test_e2_se_is_the_spread_of_disjoint_subsets_over_sqrt_m",),
    ),
    Mutant(
        "study_e2_se_divides_by_m",
        STUDY + "e2_cd_objective.py",
        "se = float(parts.std()) / subsets**0.5",
        "se = float(parts.std()) / subsets",
        (STUDY_ERRORS + "::test_e2_se_is_the_spread_of_disjoint_subsets_over_sqrt_m",),
    ),
    Mutant(
        "study_e1_bootstrap_se_over_sqrt_resamples",
        STUDY + "e1_gradients.py",
        '"bias_se": float(bias[1:].std()) / scale,',
        '"bias_se": float(bias[1:].std()) / scale / BOOTSTRAP ** 0.5,',
        (STUDY_ERRORS + "::test_e1_bootstrap_errors_approach_the_gaussian_closed_forms",),
    ),
    Mutant(
        "study_e1_variance_se_scaled_once",
        STUDY + "e1_gradients.py",
        '"variance_se": float(variance[1:].std()) / scale**2',
        '"variance_se": float(variance[1:].std()) / scale',
        (STUDY_ERRORS + "::test_e1_bootstrap_errors_approach_the_gaussian_closed_forms",),
    ),
    # -- KLPersistentML's whole loss call (tests/training/test_loss_definitions.py)
    Mutant(
        "kl_term_weight_ignored", LOSSES, "extra = self.kl_weight * kl", "extra = kl", (LOSS_DEFS,)
    ),
    Mutant(
        "kl_term_sign_flipped",
        LOSSES,
        "extra = self.kl_weight * kl",
        "extra = -self.kl_weight * kl",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_term_sign_flipped",
        LOSSES,
        "extra = extra - self.entropy_weight * entropy",
        "extra = extra + self.entropy_weight * entropy",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_term_weighted_by_the_kl_weight",
        LOSSES,
        "extra = extra - self.entropy_weight * entropy",
        "extra = extra - self.kl_weight * entropy",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_is_the_log_of_the_mean_distance",
        LOSSES,
        "nearest_distances(x_kl, reference).log().mean()",
        "nearest_distances(x_kl, reference).mean().log()",
        (LOSS_DEFS,),
    ),
    Mutant(
        "kl_energy_not_frozen",
        LOSSES,
        "        with frozen_parameters(self.parameters):\n"
        "            return self.energies(x_kl).mean(), x_kl\n",
        "        return self.energies(x_kl).mean(), x_kl\n",
        (LOSS_DEFS,),
    ),
    Mutant(
        "kl_sample_detached_from_the_parameters",
        LOSSES,
        "differentiable_step(x_prev, step, chains=self.kl_chains)",
        "differentiable_step(x_prev, step, chains=self.kl_chains).detach()",
        (LOSS_DEFS,),
    ),
    Mutant(
        "kl_step_on_every_chain",
        LOSSES,
        "differentiable_step(x_prev, step, chains=self.kl_chains)",
        "differentiable_step(x_prev, step, chains=None)",
        (LOSS_DEFS,),
    ),
    # which chains the entropy term may use as neighbours
    Mutant(
        "entropy_references_drawn_after_the_push",
        LOSSES,
        "        reference = self._entropy_reference()\n"
        "        k = self.sampler.n_steps\n"
        "        x_prev = x0 if k == 1 else self._run(x0, stats, k - 1)\n"
        "        last_step = self.sampler.step  # the noise counter of the chains' last step\n"
        "        x = self.sampler.sample(x_prev, 1)\n"
        "        self.push_chains(x, slots, y)\n",
        "        k = self.sampler.n_steps\n"
        "        x_prev = x0 if k == 1 else self._run(x0, stats, k - 1)\n"
        "        last_step = self.sampler.step  # the noise counter of the chains' last step\n"
        "        x = self.sampler.sample(x_prev, 1)\n"
        "        self.push_chains(x, slots, y)\n"
        "        reference = self._entropy_reference()  # as ICD does\n",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_neighbours_include_the_chains",
        LOSSES,
        "nearest_distances(x_kl, reference)",
        "nearest_distances(x_kl, torch.cat([reference.to(x_kl.dtype), x_kl.detach()]))",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_neighbours_are_the_batchs_own_draws",
        LOSSES,
        "self._kl_inputs = (x_prev, last_step, reference)",
        "self._kl_inputs = (x_prev, last_step, None if reference is None else x0)",
        (LOSS_DEFS,),
    ),
    Mutant(
        "entropy_starts_at_the_threshold",
        LOSSES,
        "self.buffer.n_written > self.ENTROPY_MIN_FILLED",
        "self.buffer.n_written >= self.ENTROPY_MIN_FILLED",
        (LOSS_DEFS + "::test_below_the_fill_threshold_there_is_no_entropy_term",),
    ),
    # the step counter of the differentiated last step
    Mutant(
        "kl_last_step_counter_read_after_the_step",
        LOSSES,
        "        last_step = self.sampler.step  # the noise counter of the chains' last step\n"
        "        x = self.sampler.sample(x_prev, 1)\n",
        "        x = self.sampler.sample(x_prev, 1)\n        last_step = self.sampler.step\n",
        (LOSS_DEFS,),
    ),
    Mutant(
        "kl_last_step_counter_one_early",
        LOSSES,
        "last_step = self.sampler.step  #",
        "last_step = self.sampler.step - 1  #",
        (LOSS_DEFS,),
    ),
    Mutant(
        "kl_last_step_counter_of_this_call_only",
        LOSSES,
        "last_step = self.sampler.step  #",
        "last_step = k - 1  #",
        (LOSS_DEFS,),
    ),
    # -- the MLP route falls back to autograd for an altered layer
    #    (tests/samplers/test_mlp_gradient_fallback.py)
    Mutant(
        "mlp_route_ignores_forward_pre_hooks",
        MLP_ROUTE,
        "        module._forward_hooks\n        or module._forward_pre_hooks\n",
        "        module._forward_hooks\n",
        (MLP_FALLBACK,),
    ),
    Mutant(
        "mlp_route_ignores_a_replaced_forward",
        MLP_ROUTE,
        '        or module._backward_pre_hooks\n        or "forward" in module.__dict__\n',
        "        or module._backward_pre_hooks\n",
        (MLP_FALLBACK,),
    ),
    Mutant(
        "mlp_route_ignores_the_sequentials_own_hooks",
        MLP_ROUTE,
        "            or not self._layout_supported(self.modules)\n"
        "            or _altered(self.sequential)\n",
        "            or not self._layout_supported(self.modules)\n",
        (MLP_FALLBACK,),
    ),
    Mutant(
        "mlp_route_ignores_global_pre_hooks",
        MLP_ROUTE,
        '    "_global_forward_hooks",\n    "_global_forward_pre_hooks",\n',
        '    "_global_forward_hooks",\n',
        (MLP_FALLBACK,),
    ),
    # -- held-out points overlapping training points (tests/training/test_held_out.py)
    Mutant(
        "datasets_ring_restarts_the_callers_generator",
        "ebm_fast/datasets.py",
        "    angle = 2 * math.pi * torch.randint(modes, (_count(n),), generator=generator)",
        "    generator = torch.Generator().manual_seed(generator.initial_seed())  # a copy\n"
        "    angle = 2 * math.pi * torch.randint(modes, (_count(n),), generator=generator)",
        (HELD_OUT,),
    ),
    Mutant(
        "datasets_rings_restarts_the_callers_generator",
        "ebm_fast/datasets.py",
        "    radii_t = torch.tensor(radii, dtype=torch.float32)\n",
        "    generator = torch.Generator().manual_seed(generator.initial_seed())  # a copy\n"
        "    radii_t = torch.tensor(radii, dtype=torch.float32)\n",
        (HELD_OUT,),
    ),
    Mutant(
        "train_command_heldout_from_a_restarted_generator",
        "ebm_fast/commands/train.py",
        "toy.sample(HELD_OUT, generator)",
        "toy.sample(HELD_OUT, torch.Generator().manual_seed(args.seed))",
        (HELD_OUT + "::test_the_train_commands_held_out_points_are_not_training_points",),
    ),
    Mutant(
        "train_command_jem_training_set_overlaps_the_test_set",
        "ebm_fast/commands/train.py",
        "data = tuple(t[order[rows // 5",
        "data = tuple(t[order[rows // 6",
        (
            HELD_OUT + "::test_the_train_commands_jem_test_set_and_training_set_partition_the"
            "_images",
        ),
    ),
    Mutant(
        "study_heldout_drawn_from_a_restarted_generator",
        STUDY + "common.py",
        "(config.heldout_size, generator)",
        '(config.heldout_size, torch.Generator().manual_seed(self.seed_for("data")))',
        (HELD_OUT,),
    ),
]


def copy_repository(destination: Path, worktree: bool) -> None:
    """The committed tree (git archive HEAD) or the working tree's tracked and unignored files."""
    if not worktree:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
        return
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def plant(root: Path, mutant: Mutant) -> str | None:
    """Write the mutant into the copy; None, or why it could not be planted."""
    path = root / mutant.path
    if not path.is_file():
        return f"file {mutant.path} not found"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return (
            f"snippet {'not found' if count == 0 else f'ambiguous ({count} matches)'} in "
            f"{mutant.path}"
        )
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def run_pytest(root: Path, tests, env: dict, timeout: float) -> tuple[int, str]:
    """(pytest's exit code, its last summary line), stopping at the first failure."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return done.returncode, (failed[0] if failed else lines[-1] if lines else done.stderr[-300:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--worktree",
        action="store_true",
        help="copy the working tree (uncommitted edits included), not HEAD",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {m.path}\n    tests: {' '.join(m.tests)}")
        return 0

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ebm_fast_mutants_"))
    try:
        copy_repository(root, args.worktree)
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "PYTHONDONTWRITEBYTECODE": "1",
            "TORCH_EXTENSIONS_DIR": str(root / ".torch_extensions"),
            "HYPOTHESIS_PROFILE": "mutants",
        }  # dev's examples, no shrinking
        env.pop("EBM_FAST_DISABLE_CPP", None)
        baseline_tests = sorted({t for m in mutants for t in m.tests})
        print(f"baseline: the unmutated tests ({len(baseline_tests)} selections) ...", flush=True)
        code, summary = run_pytest(root, baseline_tests, env, args.timeout * 2)
        print(f"  {summary} ({time.perf_counter() - started:.0f} s)", flush=True)
        if code != 0:
            print("the unmutated tests fail: fix them before judging mutants")
            return 2

        outcomes = []
        for mutant in mutants:
            path = root / mutant.path
            original = path.read_text() if path.is_file() else None
            t0 = time.perf_counter()
            problem = plant(root, mutant)
            if problem is not None:
                outcome, detail = "NOT PLANTED", problem
            else:
                mutant_env = env
                if mutant.is_cpp:  # its own build; the shared one stays the unmutated one
                    mutant_env = {
                        **env,
                        "TORCH_EXTENSIONS_DIR": str(root / f".torch_extensions_{mutant.name}"),
                    }
                code, detail = run_pytest(root, mutant.tests, mutant_env, args.timeout)
                # 1: a test failed; 2: collection or import failed (also a catch).
                outcome = {0: "MISSED", 1: "caught", 2: "caught"}.get(code, "ERROR")
            if original is not None:
                path.write_text(original)
            seconds = time.perf_counter() - t0
            outcomes.append((mutant.name, outcome, seconds, detail))
            print(f"{outcome:>11}  {mutant.name}  ({seconds:.0f} s)  {detail}", flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    caught = sum(outcome == "caught" for _, outcome, _, _ in outcomes)
    print(
        f"\n{caught} of {len(outcomes)} mutants caught; total {time.perf_counter() - started:.0f} s"
    )
    for name, outcome, _, detail in outcomes:
        if outcome != "caught":
            print(f"  {outcome}: {name}: {detail}")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
