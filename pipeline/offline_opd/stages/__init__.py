"""One module per DVC stage: thin entry points (args, run, main)."""
