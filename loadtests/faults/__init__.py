"""Fault injection from outside the product: signals to engine processes (psutil) and a recorded run under
HTTP load. No product imports."""
