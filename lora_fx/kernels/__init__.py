"""Custom ops (`lora_fx::`): schemas and registration in `ops.py`, DoRA's kernels in `dora.py`."""
