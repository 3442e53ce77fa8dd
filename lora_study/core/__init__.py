"""What every stage uses: errors, file IO, result paths, precision formats, metric names, and the job harness
(claiming the GPU before CUDA starts, logging each phase's time)."""
