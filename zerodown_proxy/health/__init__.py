"""The proxy's own view of instance health: active checks (`active.py`) and passive outlier
ejection (`outlier.py`). The HTTP balancer consults both; the HSMS proxy reads `is_down`."""
