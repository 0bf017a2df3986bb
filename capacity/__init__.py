"""Capacity planning: engine profiles, a discrete-event simulator that runs the real router, and the
heterogeneous-GPU planner behind ``pdserve profile``, ``pdserve simulate`` and ``pdserve plan``.

Pure: no Ray, vLLM or torch imports (measuring a profile on a real engine lives in ``workers/``)."""
