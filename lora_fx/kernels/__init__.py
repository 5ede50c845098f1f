"""Custom operators (`torch.library`, namespace `lora_fx`). Every op schema lives in `ops.py`."""
