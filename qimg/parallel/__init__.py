"""One picture across several processes (GPUs, or CPU processes for tests) on `torch.distributed`.

`ParallelConfig` ("ulysses=U,cfg=C") says how: C groups of ranks each run one guidance branch (CFG parallelism),
and within a group U ranks share the image tokens of every transformer call (Ulysses sequence parallelism: an
all-to-all over heads around attention). `Mesh` holds the process groups; `UlyssesSequence` is the transformer's
token layout; `run_tiles` splits VAE tiles across every rank. Every rank loads the whole pipeline and ends a run with
the same pictures; rank 0 writes them.
"""
