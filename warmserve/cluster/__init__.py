"""The cluster's books, shared by the simulator and the serving runtime.

`books.py` keeps the page and instance records and turns each control-plane action into
neutral `effects.py` records; a driver (`warmserve.sim.cluster`, `warmserve.runtime.cluster`)
gives those effects their time or their worker commands; both answer the control plane's reads
through `reads.py`. Pure stdlib: no torch, no asyncio.
"""
