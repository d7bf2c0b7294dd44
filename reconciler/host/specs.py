"""How a ``--gpu`` backend is written: the help text, light enough for the command line's parser.

The parser of every command shows it, so it lives apart from the backends
themselves (:mod:`.gpu` imports NVML's bindings and the simulator).
"""

SPEC_HELP = (
    "write --gpu nvml (NVIDIA GPUs), --gpu auto (NVML if available, else a CPU-only host), "
    "--gpu sim:8192 (one simulated 8192 MB GPU), --gpu sim:2x24576 (two of 24576 MB) "
    "or --gpu sim:path/to/gpus.yaml"
)
