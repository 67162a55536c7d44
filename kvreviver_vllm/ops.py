"""The ops the backend calls. Call sites use ``ops.<name>`` only, so compiled
kernels can replace the PyTorch reference here without touching the backend.

No compiled kernel exists yet: every op is its reference in ``sketch.py``.
"""

from __future__ import annotations

from kvreviver_vllm import sketch

write_kv = sketch.write_kv
paged_attention = sketch.paged_attention
