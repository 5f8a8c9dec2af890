"""Workloads and per-request records, shared by `simulate`, `serve` and `bench`.

`builders.py` turns a trace (Azure LLM 2023/2024, ServeGen, a CSV file) into arrivals,
lengths and forecast history; `trace_name.py` decodes a trace's name; `concurrency.py` turns
busy intervals into per-window load and forecast history; `records.py` holds per-request
records, their summary and their `requests.csv` rows.
"""
