"""The memory and throughput planner: `gigatron plan RECIPE [--search]` (cli.py).

    model_shape.py   ModelShape (family-agnostic) and model_shape(cfg)
    layout.py        Layout: degrees, micro-batching, recompute, accumulation mode
    hardware.py      GPU specs and every cost-model constant
    memory.py        memory per GPU by component (exact for the sharded state)
    throughput.py    projected step time, TFLOP/s per GPU, MFU
    search.py        the fastest layouts that fit
    published.py     published runs (Megatron-Core weak scaling, Llama 3 405B)
    calibration.py   the fit of the two fitted constants, and the projected-vs-published table
"""
