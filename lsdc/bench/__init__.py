"""`lsdc bench`: throughput of the cache build, the loader and a training step, each against a reference measured in
the same run, so every figure is a ratio that survives a noisy machine.

    prep_bench.bench_prep(data_dir, ...)    build vs its unavoidable work vs a v8-style epoch; 1 vs N workers; memory
    load_bench.bench_load(cache_path, ...)  train.data's loader for 0..N workers vs a raw read vs the v8-style loader
    train_bench.bench_train(cache_path, ...) training samples/s with the real model; loader headroom
    report.update_report(doc, result)       write a result into docs/benchmarks.md

This package sits above cache, prep and train and imports them inside functions only.
"""
