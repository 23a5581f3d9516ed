"""The layouts the distributed suite runs, by world size (data: name -> Layout)."""

from __future__ import annotations

from tests.distributed.harness import Layout

SAVE_AT = 3  # checkpoints written after this step; resumed runs train step SAVE_AT + 1

PP = {"pp": 2}
INTERLEAVED = {"pp_virtual_stages": 2, "pp_microbatches": 4}

WORLD_4 = {
    "zero1": Layout({"data_parallel": "zero1"}, save_at=SAVE_AT),
    "zero2": Layout({"data_parallel": "zero2"}, save_at=SAVE_AT),
    "zero3": Layout({"data_parallel": "zero3"}, save_at=SAVE_AT, record_batch=True),
    "hsdp": Layout({"dp_replicate": 2, "dp_shard": 2}),
    "fsdp_tp": Layout({"tp": 2}),
    "pp_fsdp": Layout({**PP, "pp_schedule": "1f1b"}, micro_batch=4, save_at=SAVE_AT),
    "pp_tp": Layout({**PP, "tp": 2, "pp_schedule": "gpipe"}, micro_batch=4),
}
# With -m slow: what the default world-4 run composes from parts already covered (ddp and interleaving at
# world size 2, offload under ZeRO-3 at world size 2).
WORLD_4_SLOW = {
    "ddp": Layout({"data_parallel": "ddp"}),
    "hsdp_zero2_offload": Layout({"dp_replicate": 2, "dp_shard": 2, "data_parallel": "zero2", "cpu_offload": True}),
    "pp_tp_interleaved": Layout({**PP, "tp": 2, "pp_schedule": "interleaved_1f1b", **INTERLEAVED}, micro_batch=8),
}

WORLD_2 = {
    "ddp": Layout({"data_parallel": "ddp"}),
    "zero3_cpu_offload": Layout({"data_parallel": "zero3", "cpu_offload": True}),
    "zero3_ac_full": Layout({"activation_checkpoint": "full"}),
    "zero3_ac_selective": Layout({"activation_checkpoint": "selective"}),
    "tp_sp_loss_parallel": Layout({"tp": 2}),
    "pp_gpipe": Layout({**PP, "pp_schedule": "gpipe"}, micro_batch=4),
    "pp_1f1b": Layout({**PP, "pp_schedule": "1f1b", "pp_microbatches": 4}, micro_batch=4),
    "pp_interleaved_1f1b": Layout({**PP, "pp_schedule": "interleaved_1f1b", **INTERLEAVED}, micro_batch=4),
    "pp_interleaved_zero_bubble": Layout({**PP, "pp_schedule": "interleaved_zb", **INTERLEAVED}, micro_batch=4),
    # resumed from checkpoints written by the 4-rank world (different layouts)
    "resume_zero3_as_tp": Layout({"tp": 2}, resume_from="zero3", record_batch=True),
    "resume_pp_as_zero3": Layout({"data_parallel": "zero3"}, resume_from="pp_fsdp", record_batch=True),
    "resume_zero1_as_pp": Layout({**PP, "pp_schedule": "1f1b"}, micro_batch=4, resume_from="zero1",
                                 record_batch=True),
    "resume_zero2_as_zero3": Layout({"data_parallel": "zero3"}, resume_from="zero2", record_batch=True),
}
# With -m slow: ZeRO-1/2/3 at world size 2 (the default world-4 run has them), TP without sequence or loss
# parallelism (the same plan minus two styles), the looped-BFS schedule (interleaving runs by default), and a
# second resume from a pipeline checkpoint.
WORLD_2_SLOW = {
    "zero1": Layout({"data_parallel": "zero1"}),
    "zero2": Layout({"data_parallel": "zero2"}),
    "zero3": Layout({"data_parallel": "zero3"}),
    "tp_plain": Layout({"tp": 2, "sequence_parallel": False, "loss_parallel": False}),
    "pp_looped_bfs": Layout({**PP, "pp_schedule": "looped_bfs", **INTERLEAVED}, micro_batch=4),
    "resume_pp_as_zero2": Layout({"data_parallel": "zero2"}, resume_from="pp_fsdp", record_batch=True),
}

# torch 2.13 only with gloo (torch 2.11: "Pair is not connected"), see ARCHITECTURE.md pitfall 10.
WORLD_2_NEW_TORCH = {
    "pp_zbv": Layout({**PP, "pp_schedule": "zbv", **INTERLEAVED}, micro_batch=4),
    "pp_dualpipev": Layout({**PP, "pp_schedule": "dualpipev", **INTERLEAVED}, micro_batch=4),
}

# PP x TP x DP needs 8 ranks (about 30 s on 2 cores).
WORLD_8 = {
    "pp_tp_fsdp": Layout({**PP, "tp": 2, "pp_schedule": "1f1b"}, micro_batch=4),
    "pp_tp_fsdp_interleaved_1f1b": Layout({**PP, "tp": 2, "pp_schedule": "interleaved_1f1b", **INTERLEAVED},
                                          micro_batch=4),
}

# Context parallelism, compared with one process on plain rows and on rows packed with documents (the
# mask must cross the chunks each rank holds). By default one cp layout at world size 2; the rest with -m slow.
CP_WORLD_2 = {"cp2_documents": Layout({"cp": 2}, documents=True)}
CP_WORLD_2_SLOW = {"cp2": Layout({"cp": 2}), "cp2_ddp": Layout({"cp": 2, "data_parallel": "ddp"})}
CP_WORLD_4 = {
    "cp4": Layout({"cp": 4}),
    "cp4_documents": Layout({"cp": 4}, documents=True),
    "fsdp_cp": Layout({"dp_shard": 2, "cp": 2}),
    "fsdp_cp_documents": Layout({"dp_shard": 2, "cp": 2}, documents=True),
    "tp_cp": Layout({"tp": 2, "cp": 2}),
}
