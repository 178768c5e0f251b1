"""The run layer every command stands on (search, train, evaluate, export, latency, study):

- `files`: the run directory, one reader and one writer per file, and the one atomic writer;
- `session`: a run's life (start, continue with a settings check, checkpoints, history, TensorBoard),
  shared by the search and the training;
- `runtime`: the process (device, threads, determinism, mixed precision) and `timing` (a step's parts);
- `ranks`: the processes of a run under torchrun;
- `options`: configuration dataclasses whose field metadata is the command line;
- `provenance`: the machine, commit and date stamped on every results file, and its writer.

Nothing here imports a command, the search, the networks or the data."""
