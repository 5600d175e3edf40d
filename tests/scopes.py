"""Reuse scopes that must stay apart: None differs from 0 for both the LoRA id and the salt."""

from kvjax.cache import ReuseScope

DISTINCT_SCOPES = [
    ReuseScope(),
    ReuseScope(lora_id=0),
    ReuseScope(salt=0),
    ReuseScope(lora_id=0, salt=0),
    ReuseScope(lora_id=7, salt=11),
]
