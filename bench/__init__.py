"""tagtune benchmarks: ratios measured side by side in one run (these machines drift 2-3x in speed).

    make bench                              # the whole suite on the embedded default → bench/results.json
    python -m bench.finetune_throughput     # one benchmark alone (each prints one JSON line + a summary)

Every benchmark runs the project's real code paths (stages.*, tagtune.generation, flows.pipeline).
"""
