"""The data contracts every stage reads and writes: prompts, shards, codecs, sparse targets, parts."""
