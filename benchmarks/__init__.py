"""fr_dist's benchmarks, run from the repository root as modules::

    python -m benchmarks.classifier --world-sizes 2 --num-classes 1000 --steps 3 --dim 128 --batch 16
    python -m benchmarks.train_throughput --smoke
    python -m benchmarks.data_loader | largest_run | plan_validation | plan_vs_measured | gpu_calibrate
    bash benchmarks/gpu_check.sh                      # the one-command GPU check (puts the repo on PYTHONPATH)

What they share (host facts, the atomic JSON writer, device memory snapshots, plot set-up, spawning
gloo ranks, the synthetic RecordIO set) lives in :mod:`benchmarks._common`.
"""
