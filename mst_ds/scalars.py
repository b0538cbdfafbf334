"""The names of the scalars a run logs (``metrics.jsonl``, TensorBoard, trackers), in one place: the loop,
metrics, health, report, study and the demo read them from here (a test checks that every name they
select is one of these). Pure names, no torch: ``mst-ds report`` reads runs without importing it.
"""

from __future__ import annotations

# What MSTModel.forward returns, averaged over ranks every step: the losses, ...
LOSSES = ("loss", "dino", "restore", "dino_weighted", "restore_weighted")
# ... what the forward measures beside them (teacher attention and output entropies: collapse watch), ...
FORWARD = ("mask_ratio", "center_norm", "attn_entropy", "teacher_entropy")
# ... and the run-health diagnostics of issue 10 (mst_ds.model.diagnostics computes them, mst_ds.health
# names their alerts).
COLLAPSE = ("teacher_entropy_rel", "teacher_usage_entropy_rel", "agreement", "teacher_cls_std")
DIAGNOSTICS = (*COLLAPSE, "attn_guidance")
MODEL_SCALARS = LOSSES + FORWARD + DIAGNOSTICS
ATTENTION = ("attn_entropy", "attn_guidance")
# Added by the loop at every logged step (mst_ds.health.RunHealth); the monitor's keys only where it ran.
SHARES = ("restore_loss_share", "restore_grad_share")
HEALTH_SCALARS = (*SHARES, "alerts")
MONITOR_SCALARS = ("monitor_knn_top1", "monitor_knn_top5", "monitor_s", "monitor_time_share")
# Throughput between two logged steps (issue 31; mst_ds.metrics.Throughput): images per second in all and
# per device, the share of the wall time the loop waited for the loader (rank 0), the highest peak memory
# of any device (GiB); the model FLOP utilisation only where a device peak is known (absent on CPU).
THROUGHPUT = ("img_per_s", "img_per_s_per_device", "data_wait_share", "peak_mem_gb")
MFU = "mfu"
# Every scalar logged every run.log_every steps (issue 4, Build 5).
SCALARS = MODEL_SCALARS + ("lr", "weight_decay", "momentum", "teacher_temp", "grad_norm", "loss_scale",
                           "skipped_steps", "nonfinite_steps", "corrupt_samples") + THROUGHPUT + HEALTH_SCALARS
