"""Run monitoring: `gigatron status RUN_DIR` and `gigatron report RUN_DIR` (cli.py).

    run_dir.py      tolerant readers of everything a run directory holds
    stragglers.py   find_stragglers(times_per_rank, threshold), called by the trainer
    status.py       the one-screen status (progress, ETA, loss trend, throughput vs the planner,
                    stragglers, restarts, last good checkpoint)
    report.py       a self-contained HTML page of inline SVG plots
"""
