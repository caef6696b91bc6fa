"""Command-line tools around the pipeline that are not DVC stages."""
