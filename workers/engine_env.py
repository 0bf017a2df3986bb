"""Names of the environment variables pdserve sets for its engine processes and reads inside them.

workers/engine.py and workers/handoff.py build the environment before an engine starts; the vLLM plugin
(workers/vllm_plugin.py) and our NixlConnector (workers/nixl_connector.py) read it inside the engine's
processes. UCX's own variables, which the slab connector sets too, are in kvtransfer/config.py.
Standard library only: read in every vLLM process at plugin load.
"""

from __future__ import annotations

# shared-memory queue readers between vLLM's engine core and its workers (workers/vllm_plugin.py)
MQ_BUSY_LOOP_ENV = "PDSERVE_MQ_BUSY_LOOP_S"  # seconds a reader spins before sleeping; set = pdserve engine
MQ_RECHECK_ENV = "PDSERVE_MQ_RECHECK_MS"  # longest sleep before a reader re-checks the ring

# vLLM's NixlConnector as pdserve runs it (workers/nixl_connector.py)
NIXL_PROGRESS_THREAD_ENV = "PDSERVE_NIXL_PROGRESS_THREAD"  # "0": no UCX progress thread
NIXL_PROGRESS_DELAY_ENV = "PDSERVE_NIXL_PROGRESS_DELAY_US"  # the progress thread's poll timeout
KV_CACHE_HUGE_PAGES_ENV = "PDSERVE_KV_CACHE_HUGE_PAGES"  # "0": leave the paged KV caches as allocated

# CPU engines (device.malloc_reuse): glibc malloc keeps freed memory for reuse. No mmap per large block
# (each large torch temporary would come back as fresh pages, one page fault per 4 KiB, expensive under
# virtualisation) and no trimming of the heap back to the kernel. vLLM's CPU docs get the same effect
# from tcmalloc via LD_PRELOAD. Read by glibc at process start.
MALLOC_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
