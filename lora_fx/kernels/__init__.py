"""Custom ops (`lora_fx::`): schemas and registration in `ops.py`; DoRA's kernels in `dora.py`, BdLoRA's
block-diagonal product in `block_diag.py`;
per-row LoRA for mixed-adapter batches (`lora_shrink` / `lora_expand`) in `row_lora.py`."""
