"""The evaluation behind scripts/evaluate.py (the CLI), one concern per module:

    cells      what runs: policy lists, cost bands, sweep grids, cell specs -> Experiment, tasks
    runner     running tasks: the worker's run_task, the workload cache, the process pool
    sweeps     rate sweeps: the starting grid, then extension and bisection round by round
    aggregate  rows -> results: curves, per-seed ratios, max rps at SLO, verdicts
    tables     results -> docs/eval/tables.md (markdown)
    plots      results -> docs/eval/*.png (matplotlib), and the control-plane cost curve

Imported with scripts/ on sys.path (scripts/evaluate.py puts it there), beside eval_stats.
"""
